"""Cost of `devicediff diverge`: one lockstep step against plain training steps.

The budget (issue 4): one lockstep step may take no more than 3x (a plain
training step of config A + one of config B + one float64 reference step).

Measured two ways, each as a slope over steps so that process start, data
loading and evaluation cancel out:

* **wall**: in one ``diverge(study, A, B, steps=hi)``, the time between the
  parent's taking in step ``lo`` and step ``hi`` (both sides' files arrived and
  the earlier steps compared), divided by ``hi - lo``: what a user waits per
  step once both sides are running, with both workers, file I/O and the
  parent's comparison in it and process start-up (seconds, and varying by
  seconds on a GPU) out of it. Against it: plain training of A and of B in
  ordinary workers (``run_worker``, the worker's own ``train_time``, a slope
  over the same two budgets) and a float64 step of the same workload in a
  fresh process, where lockstep runs A's reference: on A's GPU, or on the CPU with A's
  thread count.
* **records**: the per-step clocks the sides report (``total`` of A and B and
  the parent's ``compare``) against the plain step each side times itself
  (its free-running copy's step is a plain training step) and its float64
  step.

    python benchmarks/diverge_cost.py                      # quick preset, cpu-1t vs cpu-2t
    python benchmarks/diverge_cost.py --a cpu-1t --b gpu --study tests/diverge/autoencoder_gpu.toml

Prints a JSON line per measurement and the ratios. ``--ratios`` instead
measures the classification ratios of pairs with and without planted faults
(the table in docs/diverge.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from devicediff.diverge.lockstep import diverge  # noqa: E402
from devicediff.executors.base import Task, worker_env  # noqa: E402
from devicediff.executors.local import run_worker  # noqa: E402
from devicediff.runner import build_job, python_for  # noqa: E402
from devicediff.study import load_study, parse_overrides  # noqa: E402

REF64 = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from devicediff.frameworks.torch.backend import load_workload
    from devicediff.frameworks.torch.lockstep import cast_floats
    from devicediff.job import Job
    from devicediff.spec import iter_batches, move_to
    job, n = Job.from_json(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(int(job.config.get("threads") or torch.get_num_threads()))
    torch.set_default_dtype(torch.float64)
    dev = torch.device("cuda" if job.config.get("device") == "cuda" else "cpu")  # where lockstep runs it
    wl = load_workload(job)
    model = wl.build_model(int(job.init_seed)).double().to(dev)
    opt = wl.make_optimizer(model)
    batches = list(iter_batches(wl.train_batches(int(job.data_seed), 0)))
    def step(b):
        opt.zero_grad(set_to_none=True)
        wl.loss(model, type(b)(move_to(cast_floats(b.data, torch.float64), dev), b.new_sequence)).backward()
        opt.step()
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for b in batches[:2]:
        step(b)  # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    sync()
    print(json.dumps({"ref64_step": (time.perf_counter() - t0) / n}))
    """
)


def plain_train_time(study, cfg_name: str, steps: int, workdir: Path) -> float:
    """``train_time`` of an ordinary run of ``steps`` steps (a fresh worker)."""
    from dataclasses import replace

    st = replace(study, budget=replace(study.budget, steps=steps, epochs=None, metric_every=10**6))
    cell = st.cell(st.config(cfg_name), 0)
    run_dir = workdir / f"plain-{cfg_name}-{steps}-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    job = build_job(st, cell, "bench", run_dir).with_(checkpoint_path=None, snapshots=False)
    task = Task(run_id="bench", job=job, cpus=cell.config.threads or 1, gpus=int(cell.config.is_gpu),
                log_path=str(run_dir / "worker.log"), python=python_for(cell.config))
    recs = []
    run_worker(task, worker_env(job, gpu_index=0 if cell.config.is_gpu else None), None, recs.append)
    done = recs[-1]
    if done.get("state") != "finished":
        raise SystemExit(f"plain run of {cfg_name} failed: {done.get('error')}")
    return float(done["train_time"])


def ref64_step(study, cfg_name: str, n: int, workdir: Path) -> float:
    cell = study.cell(study.config(cfg_name), 0)
    job = build_job(study, cell, "bench", workdir)
    env = worker_env(job)
    out = subprocess.run([sys.executable, "-c", REF64, job.to_json(), str(n)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ref64_step"]


def median(xs):
    return statistics.median(xs)


RATIO_CASES = (
    # (study, A, B, steps): plain rounding pairs first, planted faults after
    ("quick", "cpu-1t", "cpu-2t", 10),
    (str(ROOT / "tests/diverge/prednet_tiny.toml"), "cpu-1t", "cpu-2t", 4),
    (str(ROOT / "tests/diverge/autoencoder_small.toml"), "cpu-1t", "cpu-1t-drop-bias", 3),
    (str(ROOT / "tests/diverge/prednet_tiny.toml"), "cpu-1t", "cpu-1t-alias", 3),
)


def ratios() -> None:
    """The measurements behind the threshold (docs/diverge.md): the ratio of every
    tensor of pairs without a fault, and of the faulty tensors of planted faults."""
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="diverge_ratios_"))
    for i, (spec, a, b, steps) in enumerate(RATIO_CASES):
        payload = diverge(load_study(spec), a, b, steps=steps, workdir=work / str(i))
        rows = payload["rows"]
        r_ok = np.array([r["ratio"] for r in rows if r["cls"] == "rounding"])
        r_bad = np.array([r["ratio"] for r in rows if r["cls"] == "beyond rounding"])
        fb = payload["summary"]["first_beyond"]
        first_step = [r["ratio"] for r in rows if fb and r["step"] == fb["step"] and r["cls"] == "beyond rounding"]
        out = {
            "study": payload["study"], "a": a, "b": b, "steps": steps, "tensors": len(rows),
            "identical": sum(r["cls"] == "identical" for r in rows),
            "rounding": int(r_ok.size), "beyond": int(r_bad.size),
            "rounding_ratio_p50_p99_max": [float(np.percentile(r_ok, q)) for q in (50, 99, 100)] if r_ok.size else None,
            "beyond_ratio_min_first_step": min(first_step) if first_step else None,
            "max_rel_rounding_error": max(max(r["err_a"] or 0, r["err_b"] or 0) for r in rows),
            "line": payload["summary"]["line"],
        }
        print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", action="store_true", help="measure the ratio distributions behind the threshold")
    ap.add_argument("--study", default="quick")
    ap.add_argument("--a", default="cpu-1t")
    ap.add_argument("--b", default="cpu-2t")
    ap.add_argument("--lo", type=int, default=4, help="first step timed (and steps of the short plain runs)")
    ap.add_argument("--hi", type=int, default=24, help="last step timed (and steps of the long plain runs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-free", action="store_true", help="diverge(free=False): no free-running copies")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a workload parameter (JSON value), e.g. --set 'channels=[1,16,32]'")
    args = ap.parse_args()
    if args.ratios:
        return ratios()
    overrides = parse_overrides(args.set)
    study = load_study(args.study, overrides=overrides or None)
    work = Path(tempfile.mkdtemp(prefix="diverge_cost_"))
    n = args.hi - args.lo

    lock, plain_a, plain_b, ref, rec_ratio, breakdown = [], [], [], [], [], []
    for rep in range(args.repeats):
        seen: dict[int, set] = {}
        taken: dict[int, float] = {}

        def on_step(side: str, step: int, _total: int) -> None:
            seen.setdefault(step, set()).add(side)
            if len(seen[step]) == 2:
                taken[step] = time.perf_counter()

        payload = diverge(study, args.a, args.b, steps=args.hi, workdir=work / f"d{rep}", free=not args.no_free,
                          on_step=on_step)
        lock.append((taken[args.hi] - taken[args.lo]) / n)
        # per-step clocks of the long run, step 1 (warm-up, repeat) left out
        per = payload["per_step"][1:]
        tot = [st["timing"]["A"]["total"] + st["timing"]["B"]["total"] + st["timing"]["compare"] for st in per]
        # the plain step: the free-running copy's (a plain training step in the same process),
        # or without one the hooked config step
        plain = "free" if not args.no_free else "config"
        den = [st["timing"]["A"][plain] + st["timing"]["B"][plain] + st["timing"]["A"]["ref64"] for st in per]
        rec_ratio.append(sum(tot) / sum(den))
        breakdown.append({side: {k: median([st["timing"][side][k] for st in per])
                                 for k in ("sync", "config", "repeat", "ref64", "free", "gather", "wait", "write", "total")}
                          for side in ("A", "B")} | {"compare": median([st["timing"]["compare"] for st in per])})
        pa = (plain_train_time(study, args.a, args.hi, work) - plain_train_time(study, args.a, args.lo, work)) / n
        pb = (plain_train_time(study, args.b, args.hi, work) - plain_train_time(study, args.b, args.lo, work)) / n
        plain_a.append(pa)
        plain_b.append(pb)
        ref.append(ref64_step(study, args.a, max(n, 10), work))
        print(json.dumps({"repeat": rep, "lockstep_step_s": lock[-1], "plain_a_s": pa, "plain_b_s": pb,
                          "ref64_s": ref[-1], "records_ratio": rec_ratio[-1], "breakdown_s": breakdown[-1]}))

    denom = median(plain_a) + median(plain_b) + median(ref)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "study": study.name, "overrides": overrides, "a": args.a, "b": args.b, "free": not args.no_free, "steps": [args.lo, args.hi], "repeats": args.repeats,
        "lockstep_step_s": median(lock), "plain_a_step_s": median(plain_a), "plain_b_step_s": median(plain_b),
        "ref64_step_s": median(ref), "ratio_wall": median(lock) / denom, "ratio_records": median(rec_ratio),
    }
    print(json.dumps(result))
    print(f"lockstep step {result['lockstep_step_s'] * 1e3:.1f} ms vs plain A {result['plain_a_step_s'] * 1e3:.1f} ms "
          f"+ plain B {result['plain_b_step_s'] * 1e3:.1f} ms + float64 {result['ref64_step_s'] * 1e3:.1f} ms: "
          f"ratio {result['ratio_wall']:.2f} (wall), {result['ratio_records']:.2f} (per-step clocks); budget 3")


if __name__ == "__main__":
    main()
