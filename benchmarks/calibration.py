"""Calibration of devicediff's verdicts by simulation.

Each simulated study has a reference config and 3 others, 10 seeds each, and one metric:

    value[config, seed] = 10 + seed_effect[seed] + shift[config] + impl_noise[config, seed]

seed_effect ~ N(0, 1) (weight init, data order: shared by every config that runs that seed) and
impl_noise ~ N(0, 0.1^2) (the config's arithmetic, independent per run). In the *paired* variant all
configs run the same seeds, so differences cancel the seed effect, as in a real devicediff study. In
the *unpaired* variant every config runs its own seeds (seed effects drawn afresh), which is what a
study without shared seeds gets. Shifts are in units of the true seed sd, sqrt(1 + 0.1^2).

Every study goes through the public ``verdict_table`` (Holm over the 3 comparisons), exactly the code a
user runs. Printed: the family-wise rate of false ``differs`` (any null config called different),
per-comparison rates, the raw p < alpha rate (the test's own calibration, before Holm), the rate of
``equivalent`` in A/A, and the power (rate of ``differs``) for a planted shift in config "c".

    PYTHONPATH=src .venv/bin/python benchmarks/calibration.py --studies 2000
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from devicediff.analysis import stats

CONFIGS = ["ref", "a", "b", "c"]
N_SEEDS = 10
SEED_SD = 1.0
IMPL_SD = 0.1
TRUE_SEED_SD = math.sqrt(SEED_SD**2 + IMPL_SD**2)

# name, paired, shift of config "c" in true seed sds, implementation-noise law
SCENARIOS = [
    ("A/A paired, normal impl noise", True, 0.0, "normal"),
    ("A/A paired, heavy-tailed impl noise (t3)", True, 0.0, "t3"),
    ("A/A unpaired", False, 0.0, "normal"),
    ("shift 0.1 seed-sd, paired", True, 0.1, "normal"),
    ("shift 1 seed-sd, paired", True, 1.0, "normal"),
    ("shift 1 seed-sd, unpaired", False, 1.0, "normal"),
    ("shift = margin (0.5 seed-sd), paired", True, 0.5, "normal"),
    ("shift = margin (0.5 seed-sd), unpaired", False, 0.5, "normal"),
]


def impl_noise(rng: np.random.Generator, law: str, size) -> np.ndarray:
    if law == "t3":  # Student t with 3 df, scaled to sd IMPL_SD (var of t3 is 3)
        return rng.standard_t(3, size) * IMPL_SD / math.sqrt(3)
    return rng.normal(0, IMPL_SD, size)


def one_study(rng: np.random.Generator, paired: bool, shift: float, law: str) -> pd.DataFrame:
    k = len(CONFIGS)
    if paired:
        seed_eff = np.tile(rng.normal(0, SEED_SD, N_SEEDS), (k, 1))
        seeds = np.tile(np.arange(N_SEEDS), (k, 1))
    else:
        seed_eff = rng.normal(0, SEED_SD, (k, N_SEEDS))
        seeds = np.arange(k * N_SEEDS).reshape(k, N_SEEDS)  # no seed shared between configs
    shifts = np.array([0.0, 0.0, 0.0, shift * TRUE_SEED_SD])[:, None]
    values = 10.0 + seed_eff + shifts + impl_noise(rng, law, (k, N_SEEDS))
    return pd.DataFrame({
        "config": np.repeat(CONFIGS, N_SEEDS),
        "seed": seeds.ravel(),
        "repeat": 0,
        "metric": values.ravel(),
    })


def run_chunk(args) -> list[dict]:
    seed_seq, n, paired, shift, law, alpha, n_boot = args
    rng = np.random.default_rng(seed_seq)
    out = []
    for _ in range(n):
        table = stats.verdict_table(one_study(rng, paired, shift, law), ["metric"], "ref",
                                    alpha=alpha, n_boot=n_boot)
        t = table.set_index("config")
        out.append({c: (t.loc[c, "verdict"], t.loc[c, "p"]) for c in CONFIGS[1:]})
    return out


def summarize(results: list[dict], shift: float, alpha: float) -> dict:
    null = ["a", "b"] if shift else ["a", "b", "c"]
    verdicts = [r[c][0] for r in results for c in null]
    row = {
        "false differs, family": np.mean([any(r[c][0] == "differs" for c in null) for r in results]),
        "false differs, per comparison": np.mean([v == "differs" for v in verdicts]),
        "raw p < alpha, per comparison": np.mean([r[c][1] < alpha for r in results for c in null]),
        "equivalent, null configs": np.mean([v == "equivalent" for v in verdicts]),
        "power: differs, shifted": math.nan,
        "equivalent, shifted": math.nan,
    }
    if shift:
        row["power: differs, shifted"] = np.mean([r["c"][0] == "differs" for r in results])
        row["equivalent, shifted"] = np.mean([r["c"][0] == "equivalent" for r in results])
    return row


def chunks_for(i: int, scenario, args) -> list[tuple]:
    _, paired, shift, law = scenario
    n_chunks = max(4 * args.jobs, 1)
    sizes = [args.studies // n_chunks + (j < args.studies % n_chunks) for j in range(n_chunks)]
    seqs = np.random.SeedSequence([args.seed, i]).spawn(n_chunks)
    return [(s, n, paired, shift, law, args.alpha, args.n_boot) for s, n in zip(seqs, sizes) if n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=2000, help="simulated studies per scenario")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--n-boot", type=int, default=0,
                    help="bootstrap resamples per comparison (the verdict does not use the CI)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    work = [chunks_for(i, sc, args) for i, sc in enumerate(SCENARIOS)]
    flat = [w for ws in work for w in ws]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:  # one pool: workers import scipy once
            done = list(pool.map(run_chunk, flat))
    else:
        done = [run_chunk(w) for w in flat]
    rows, k = [], 0
    for (name, _, shift, _), ws in zip(SCENARIOS, work):
        results = [r for chunk in done[k:k + len(ws)] for r in chunk]
        k += len(ws)
        rows.append({"scenario": name, **summarize(results, shift, args.alpha)})
    elapsed = time.perf_counter() - t0

    table = pd.DataFrame(rows).set_index("scenario")
    se = math.sqrt(args.alpha * (1 - args.alpha) / args.studies)
    print(f"devicediff verdict calibration: {args.studies} studies per scenario, reference + 3 "
          f"configs, {N_SEEDS} seeds, seed sd {SEED_SD}, impl sd {IMPL_SD}, alpha {args.alpha}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.jobs} jobs; Python {platform.python_version()}; {elapsed:.0f} s")
    print(f"Monte Carlo standard error of a rate near {args.alpha}: {se:.4f}\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(table.to_string(na_rep="-"))
    worst = table["false differs, family"].max()
    status = "OK" if worst <= args.alpha + 2 * se else "TOO HIGH"
    print(f"\nworst family-wise false-differs rate: {worst:.3f} (target <= {args.alpha}) {status}")


if __name__ == "__main__":
    main()
