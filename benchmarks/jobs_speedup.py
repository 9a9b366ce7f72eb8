"""Local parallelism: wall time of one study with ``--jobs 1`` and with ``--jobs N``.

The study is ``--runs`` runs of one CPU config with ``--threads`` threads (one
run per seed) of the synthetic workload in ``examples/linear_regression.py``,
sized to be compute-bound (an MLP with a wide hidden layer); no data files, no
network. Each variant runs ``devicediff run`` in a fresh process into its own
store; the wall time includes everything a user waits for (interpreter and
torch start-up of the runner and of every worker). The script also checks that
both stores hold the same final weights, bit for bit.

    python benchmarks/jobs_speedup.py                      # 8 runs x 4 threads x 1500 steps, --jobs 1 vs --jobs 4
    python benchmarks/jobs_speedup.py --threads 1 --jobs 2 --runs 4 --steps 1000  # a 2-core machine

Needs only this repository and its Python dependencies (torch, numpy, pandas,
rich...); sets PYTHONPATH=src itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "examples" / "linear_regression.py"


def study_text(args) -> str:
    return f"""
name = "jobs-speedup"
description = "benchmarks/jobs_speedup.py: {args.runs} runs of one {args.threads}-thread CPU config"
reference = "cpu-{args.threads}t"

[workload]
name = "{WORKLOAD}:make"
n = {args.n}
dim = {args.dim}
hidden = {args.hidden}
batch_size = {args.batch}
lr = 0.001

[seeds]
count = {args.runs}

[budget]
steps = {args.steps}
metric_every = 50
eval_every_steps = {args.steps}

[[configs]]
name = "cpu-{args.threads}t"
device = "cpu"
threads = {args.threads}
"""


def run(study: Path, store: Path, jobs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "devicediff", "run", str(study), "--store", str(store), "--jobs", str(jobs), "-q"],
                       capture_output=True, text=True, env=env, cwd=store.parent)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"devicediff run --jobs {jobs} failed:\n{r.stderr[-3000:]}")
    return wall


def runs_of(store: Path) -> list[tuple]:
    con = sqlite3.connect(store)
    try:
        return con.execute("SELECT cell_key, state, final_sha256, train_time, wall_time, effective FROM runs ORDER BY cell_key").fetchall()
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4, help="runs at once in the parallel variant (default 4)")
    ap.add_argument("--threads", type=int, default=4, help="threads (and pinned cores) per run (default 4)")
    ap.add_argument("--runs", type=int, default=8, help="runs in the study (default 8)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    ap.add_argument("--n", type=int, default=8192, help="synthetic examples (default 8192)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    print(f"machine: {cores} usable cores ({physical or '?'} physical), load average {os.getloadavg()[0]:.1f}")
    print(f"study: {args.runs} runs x {args.threads} threads, {args.steps} steps, MLP {args.dim}-{args.hidden}-1, batch {args.batch}")
    if args.jobs * args.threads > cores:
        print(f"note: --jobs {args.jobs} x --threads {args.threads} > {cores} cores; runs will wait for cores")

    with tempfile.TemporaryDirectory(prefix="devicediff-jobs-") as d:
        d = Path(d)
        study = d / "jobs_speedup.toml"
        study.write_text(study_text(args))
        walls = {}
        for jobs in (1, args.jobs):
            walls[jobs] = run(study, d / f"jobs{jobs}.db", jobs)
            rows = runs_of(d / f"jobs{jobs}.db")
            train = sum(r[3] or 0 for r in rows)
            states = {r[1] for r in rows}
            print(f"--jobs {jobs}: wall {walls[jobs]:7.1f} s   (sum of per-run training time {train:6.1f} s; states {sorted(states)})")
        a, b = runs_of(d / "jobs1.db"), runs_of(d / f"jobs{args.jobs}.db")
        same = [x[2] for x in a] == [y[2] for y in b] and all(x[1] == "finished" for x in a + b)
        pinned = [json.loads(r[5]).get("placement", {}).get("cores") for r in b]
    speedup = walls[1] / walls[args.jobs]
    print(f"speed-up --jobs {args.jobs} vs --jobs 1: {speedup:.2f}x")
    print(f"final weights identical bit for bit between the two stores: {'yes' if same else 'NO'}")
    print(f"cores pinned per run with --jobs {args.jobs}: {pinned}")
    if args.json:
        print(json.dumps({"cores": cores, "physical": physical, "jobs": args.jobs, "threads": args.threads, "runs": args.runs,
                          "steps": args.steps, "wall_jobs1": walls[1], f"wall_jobs{args.jobs}": walls[args.jobs],
                          "speedup": speedup, "identical": same}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
