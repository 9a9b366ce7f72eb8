"""Study speed: wall time of a whole `devicediff run` against the runs' summed training time,
with warm workers (the default) and with one process per run (`--isolate`).

Each variant is `devicediff run PRESET` in a fresh process, into a fresh store, so the wall time
is what a user waits for: runner start-up, preflight, every worker, the final table. The script
prints, per variant, the wall time, Σ train_time, their ratio, the CPU seconds of the runner and its
workers (steadier than wall on a shared machine), the study's efficiency
(devicediff.analysis.efficiency: Σ(train + eval) / (wall × slots) and where the rest went),
whether the final weights equal the other variants' bit for bit, and the targets of issue #17.

    python benchmarks/study_speed.py                          # quick on this machine: warm and isolated, --jobs 1 and 2
    python benchmarks/study_speed.py --repeats 3              # alternate the variants 3 times (a loaded machine)
    python benchmarks/study_speed.py --jobs 1 --no-isolated --repeats 5 --src /tmp/before/src src   # A/B two trees
    # GPU host (docs/parallel.md): paper-autoencoder, compared with the stored H200 run's hashes
    DEVICEDIFF_MNIST=.devdata/mnist.pkl.gz python benchmarks/study_speed.py --preset paper-autoencoder \\
        --jobs 4 --gpu-slots 4 --no-isolated --reference docs/data/paper-autoencoder-h200.db --target-wall 60

Targets: quick ≤ 4× its summed train time and ≤ 10 s wall on the 2-core machine; paper-autoencoder
≤ 60 s on the GPU host with the same final-weight hashes as docs/data/paper-autoencoder-h200.db.

The runner is the real CLI (`devicediff.cli.main`); a small launcher wraps the executor it makes
to pass `isolate` (until `--isolate` is a CLI flag) and to keep each run's `done` timing, which
the store does not hold yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Runs `devicediff run ...` with the executor wrapped: isolate as asked, done records kept.
LAUNCHER = r"""
import json, os, sys
import devicediff.executors as ex
made = ex.make_executor
dones = {}
def make(kind="local", **kw):
    if kind == "local":
        kw["isolate"] = os.environ.get("SPEED_ISOLATE") == "1"
    e = made(kind, **kw)
    execute = e.execute
    def wrapped(tasks):
        for task, rec in execute(tasks):
            if rec.get("kind") == "done":
                dones[task.run_id] = rec.get("timing") or {}
            yield task, rec
    e.execute = wrapped
    return e
ex.make_executor = make
from devicediff.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open(os.environ["SPEED_TIMING"], "w") as f:
        json.dump(dones, f)
sys.exit(code)
"""


def run_variant(args, isolate: bool, jobs: int, workdir: Path, src: Path = SRC) -> dict:
    tag = f"{'isolated' if isolate else 'warm'}-j{jobs}" + ("" if src == SRC else f"@{src.parent.name}")
    store = workdir / f"{tag}-{time.time_ns()}.db"
    timing_file = store.with_suffix(".timing.json")
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SPEED_ISOLATE": "1" if isolate else "0", "SPEED_TIMING": str(timing_file)}
    cmd = [sys.executable, "-c", LAUNCHER, "run", args.preset, "--store", str(store), "-q", "--jobs", str(jobs)]
    if args.gpu_slots:
        cmd += ["--gpu-slots", str(args.gpu_slots)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the runner and every worker it waited for: less sensitive to other load than wall
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1, 3):  # 1: a verdict says "differs"; 3: some runs failed (reported below)
        sys.exit(f"{tag}: devicediff run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"tag": tag, "isolate": isolate, "jobs": jobs, "wall": wall, "cpu": cpu, "store": store,
            "timing": json.loads(timing_file.read_text()) if timing_file.exists() else {}}


def runs_frame(v: dict):
    import pandas as pd

    con = sqlite3.connect(v["store"])
    try:
        df = pd.read_sql_query("SELECT run_id, config, seed, repeat, state, wall_time, train_time, final_sha256 "
                               "FROM runs", con)
    finally:
        con.close()
    df["timing"] = df["run_id"].map(lambda r: v["timing"].get(r))
    return df


def hashes(df) -> dict:
    return {(r.config, int(r.seed), int(r.repeat)): r.final_sha256 for r in df.itertuples()}


def reference_hashes(path: str) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT config, seed, repeat, final_sha256 FROM runs WHERE state='finished'").fetchall()
    finally:
        con.close()
    return {(c, int(s), int(r)): h for c, s, r, h in rows}


def report(v: dict, slots: int, args) -> dict:
    from devicediff.analysis.efficiency import describe, efficiency

    df = runs_frame(v)
    eff = efficiency(df, v["wall"], slots)
    ok = (df["state"] == "finished").all()
    print(f"\n{v['tag']}: {len(df)} runs ({(df['state'] == 'finished').sum()} finished), wall {v['wall']:.1f} s, "
          f"Σ train {eff['train']:.2f} s, wall/Σtrain {eff['wall_per_train']:.1f}×, CPU {v['cpu']:.1f} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("  " + describe(eff))
    print("  seconds: " + ", ".join(f"{k} {s:.1f}" for k, s in eff["parts"].items()))
    if not ok:
        print("  NOT FINISHED: " + "; ".join(f"{r.config} seed {r.seed}: {r.state}" for r in df.itertuples()
                                             if r.state != "finished"))
    return {"wall": v["wall"], "ratio": eff["wall_per_train"], "eff": eff["efficiency"], "cpu": v["cpu"],
            "train": eff["train"], "hashes": hashes(df), "ok": ok}


def machine_line() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({cpu}), load average {load:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to try")
    ap.add_argument("--gpu-slots", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-isolated", action="store_true", help="skip the one-process-per-run variant")
    ap.add_argument("--src", nargs="+", default=None, metavar="DIR",
                    help="source trees (a checkout's src/ folder) to time against each other, alternating; "
                         "default: this checkout's")
    ap.add_argument("--reference", default=None, help="a store whose final hashes every variant must match")
    ap.add_argument("--target-ratio", type=float, default=None,
                    help="target: wall <= this × Σ train time (default: 4 for quick, none otherwise)")
    ap.add_argument("--target-wall", type=float, default=10.0, help="target: wall <= this many seconds")
    args = ap.parse_args()
    if args.target_ratio is None:
        args.target_ratio = 4.0 if args.preset == "quick" else float("inf")

    srcs = [Path(d).resolve() for d in args.src] if args.src else [SRC]
    print(f"machine: {machine_line()}; preset {args.preset}")
    modes = [False] + ([] if args.no_isolated else [True])
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="study_speed_") as tmp:
        for rep in range(args.repeats):
            for jobs in args.jobs:
                variants = [(src, isolate) for src in srcs for isolate in modes]
                for src, isolate in (variants if rep % 2 == 0 else variants[::-1]):  # alternate: A B B A ...
                    v = run_variant(args, isolate, jobs, Path(tmp), src)
                    results.setdefault(v["tag"], []).append(report(v, jobs, args))  # at most `jobs` runs at once
        print_summary(results, args)


def walls(rs: list[dict]) -> str:
    return ", ".join(f"{r['wall']:.1f}" for r in rs)


def print_summary(results: dict[str, list[dict]], args) -> None:
    ref = reference_hashes(args.reference) if args.reference else None
    first = next(iter(results.values()))[0]["hashes"]
    print(f"\nsummary ({args.preset}; medians over {args.repeats} repeat(s)); targets: wall <= {args.target_ratio:g}× "
          f"Σ train and <= {args.target_wall:g} s")
    print(f"{'variant':<14} {'wall s':>8} {'×train':>7} {'effic.':>7} {'CPU s':>7}  {'same bits':>9}  target")
    for tag, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        ratio = statistics.median(r["ratio"] for r in rs)
        eff = statistics.median(r["eff"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        same = all(r["hashes"] == first for r in rs)
        if ref is not None:
            same = same and all(r["hashes"] == {k: ref.get(k) for k in r["hashes"]} for r in rs)
        met = ratio <= args.target_ratio and wall <= args.target_wall and all(r["ok"] for r in rs)
        print(f"{tag:<14} {wall:8.1f} {ratio:7.1f} {100 * eff:6.0f}% {cpu:7.1f}  {'yes' if same else 'NO':>9}  "
              f"{'met' if met else 'missed'}  (walls: {walls(rs)})")
    if ref is not None:
        print(f"hashes compared with {args.reference}: {len(ref)} finished runs there")


if __name__ == "__main__":
    main()
