"""Calibration of devicediff's verdicts by simulation, on the shapes of real studies.

Model (one study): a reference and k other configs, n seeds, p metrics,

    value[c, s, j] = 10 + seed_effect[s, j] + shift[c, j] + impl_noise[c, s, j]

seed_effect (weight init, data order) is shared by every config that runs seed s; impl_noise (the
config's arithmetic) is independent per run. Both are correlated across the p metrics of a run
(rho = 0.9, as a run's losses, MSE and SSIM are). The sd ratio R = sd(paired differences) /
sd(reference across seeds) sets how much the arithmetic matters next to the seed: the reference's
total sd is 1, its impl noise sd min(R / sqrt 2, 0.7), the other configs' impl noise fills up R.
The family is k configs x p primary metrics (m = k p), Holm-adjusted as in ``stats.verdicts``.

Parts:

1. **Fixed n** (n = 3, 5, 10, 20; m = 1, 3, 12, 48; R = 0.1, 0.5, 1.0, 1.7), through the array core
   that ``stats.verdicts`` uses (``paired_core``, ``holm_rows``, ``decide_rows``):
   family-wise false ``differs`` when every config is alike; family-wise false ``equivalent`` when
   every config is shifted by exactly the margin, for a fixed margin (0.5 true reference sd) and for
   the seed-sd margin (0.5 x the reference's sd estimated in that study; shift = that margin);
   coverage of the 95% CI (normal and heavy-tailed t3 noise); the share of alike configs called
   ``equivalent`` (what the seed counts can show).
2. **End to end** through the public ``stats.verdicts`` on studies with an exact affine copy of the
   primary metric, data-only check metrics, a bitwise-identical config and correlated secondaries.
3. **Sequential** (``sequential.SequentialDesign`` + ``decide``): both error rates, the share
   decided and the mean seeds used, for a single comparison and for 3 configs (n_tests = 3).

    PYTHONPATH=src .venv/bin/python benchmarks/calibration.py
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import pandas as pd

from devicediff.analysis import stats
from devicediff.analysis.sequential import SequentialDesign, assess

NS = [3, 5, 10, 20]
FAMILIES = [(1, 1), (3, 1), (3, 4), (4, 12)]   # (configs, primary metrics): m = 1, 3, 12, 48
RATIOS = [0.1, 0.5, 1.0, 1.7]
RHO = 0.9
FRACTION = 0.5    # margin = 0.5 x reference sd


def noise_sds(ratio: float) -> tuple[float, float, float]:
    """(seed sd, reference impl sd, config impl sd) for reference total sd 1 and sd ratio R."""
    s_ref = min(ratio / math.sqrt(2), 0.7)
    s_cfg = math.sqrt(max(ratio**2 - s_ref**2, 0.0))
    return math.sqrt(1 - s_ref**2), s_ref, s_cfg


def correlated(rng, shape, p, law="normal"):
    """Standard noise of shape (*shape, p) with correlation RHO across the last axis."""
    def draw(size):
        if law == "t3":
            return rng.standard_t(3, size) / math.sqrt(3)
        return rng.standard_normal(size)
    common = draw((*shape, 1))
    return math.sqrt(RHO) * common + math.sqrt(1 - RHO) * draw((*shape, p))


def simulate(rng, studies, n, k, p, ratio, law="normal"):
    """(ref values (S, n, p), config values (S, k, n, p)) with no shift."""
    s_seed, s_ref, s_cfg = noise_sds(ratio)
    seed = s_seed * correlated(rng, (studies, n), p)
    ref = 10 + seed + s_ref * correlated(rng, (studies, n), p, law)
    cfg = 10 + seed[:, None] + s_cfg * correlated(rng, (studies, k, n), p, law)
    return ref, cfg


def family_verdicts(d, margin, alpha):
    """d: (S, k, n, p) paired differences, margin broadcastable to (S, k, p). Verdicts (S, m)."""
    S, k, n, p = d.shape
    core = stats.paired_core(np.moveaxis(d, 2, -1), margin)   # arrays of shape (S, k, p)
    pa = stats.holm_rows(core["p"].reshape(S, k * p))
    ta = stats.holm_rows(core["tost_p"].reshape(S, k * p))
    return stats.decide_rows(pa, ta, alpha), core


def chunks(total: int, size: int = 2500):
    while total > 0:
        yield min(size, total)
        total -= size


def fixed_n(args, rng):
    rows, cover = [], []
    for n in NS:
        for k, p in FAMILIES:
            for ratio in RATIOS:
                acc = np.zeros(4)
                for S in chunks(args.studies):
                    ref, cfg = simulate(rng, S, n, k, p, ratio)
                    d = cfg - ref[:, None]
                    margin = FRACTION * 1.0                       # true reference sd is 1
                    v0, core = family_verdicts(d, margin, args.alpha)
                    lo, hi = core["ci95_low"], core["ci95_high"]
                    cover.append({"n": n, "law": "normal",
                                  "hits": int(((lo <= 0) & (0 <= hi)).sum()), "total": lo.size})
                    # every config shifted by exactly the fixed margin, sign at random per config
                    sign = rng.choice([-1.0, 1.0], size=(S, k, 1, 1))
                    v1, _ = family_verdicts(d + sign * margin, margin, args.alpha)
                    # seed-sd margin: estimated from the reference in this study; shift = it
                    m_hat = FRACTION * ref.std(axis=1, ddof=1)           # (S, p)
                    m_hat = np.broadcast_to(m_hat[:, None, :], (S, k, p))
                    v2, _ = family_verdicts(d + sign * m_hat[:, :, None, :], m_hat, args.alpha)
                    acc += [(v0 == "differs").any(axis=1).sum(),
                            (v1 == "equivalent").any(axis=1).sum(),
                            (v2 == "equivalent").any(axis=1).sum(),
                            (v0 == "equivalent").mean(axis=1).sum()]
                acc /= args.studies
                rows.append({"n": n, "m": k * p, "R": ratio, "false differs": acc[0],
                             "false equiv, fixed": acc[1], "false equiv, seed-sd": acc[2],
                             "equiv when alike": acc[3]})
        for law in ["t3"]:   # heavy-tailed implementation noise: coverage only
            for ratio in RATIOS:
                for S in chunks(args.studies):
                    ref, cfg = simulate(rng, S, n, 3, 4, ratio, law)
                    core = stats.paired_core(np.moveaxis(cfg - ref[:, None], 2, -1), 0.5)
                    lo, hi = core["ci95_low"], core["ci95_high"]
                    cover.append({"n": n, "law": law, "hits": int(((lo <= 0) & (0 <= hi)).sum()),
                                  "total": lo.size})
    return pd.DataFrame(rows), pd.DataFrame(cover)


def end_to_end(args, rng):
    """Through stats.verdicts: affine copy, checks, an identical config, 6 correlated secondaries."""
    out = []
    for n in [3, 5, 10]:
        tally = {"studies": 0, "false differs, primary": 0, "false differs, secondary": 0,
                 "identical ok": 0, "checks ok": 0, "copy out of family": 0, "m primary": 0}
        for _ in range(args.e2e_studies):
            ref, cfg = simulate(rng, 1, n, 3, 7, 0.5)
            vals = {"ref": ref[0]} | {f"c{i}": cfg[0, i] for i in range(3)}
            vals["same"] = ref[0].copy()                       # bitwise identical config
            recs = []
            for c, v in vals.items():
                for s in range(n):
                    r = {"config": c, "seed": s, "repeat": 0, "final_eval_mse": v[s, 0]}
                    r |= {f"final_m{j}": v[s, j] for j in range(1, 7)}
                    recs.append(r)
            fr = pd.DataFrame(recs)
            fr["final_eval_loss"] = 19.5 * fr["final_eval_mse"]   # exact affine copy
            fr["final_baseline_mse"] = 0.0523                   # data-only checks
            fr["final_baseline_ssim"] = 0.6778
            v = stats.verdicts(fr, ["final_eval_mse"], "ref", robust=False)
            tally["studies"] += 1
            prim = v[(v.role == "primary") & v.in_family]
            sec = v[(v.role == "secondary") & v.in_family]
            tally["m primary"] = len(prim)
            tally["false differs, primary"] += bool((prim.verdict == "differs").any())
            tally["false differs, secondary"] += bool((sec.verdict == "differs").any())
            tally["identical ok"] += bool((v[v.config == "same"].verdict.isin(
                ["identical", "same on every run: yes"])).all())
            tally["checks ok"] += bool((v[v.role == "check"].verdict == "same on every run: yes").all()
                                       and set(v[v.role == "check"].metric)
                                       == {"final_baseline_mse", "final_baseline_ssim"})
            tally["copy out of family"] += bool((~v[v.metric == "final_eval_loss"].in_family).all())
        S = tally.pop("studies")
        m = tally.pop("m primary")
        out.append({"n": n, "studies": S, "primary family m": m,
                    **{k_: v_ / S for k_, v_ in tally.items()}})
    return pd.DataFrame(out)


def sequential(args, rng):
    rows = []
    designs = [(10, 1), (20, 2), (30, 3), (30, 5)]
    for max_seeds, batch in designs:
        for k in [1, 3]:
            design = SequentialDesign(max_seeds, batch, args.alpha, n_tests=k)
            for margin in [0.5, 1.0]:                     # in units of sd(differences)
                for shift_name, shift in [("0", 0.0), ("margin", margin), ("2 margins", 2 * margin)]:
                    S = args.seq_studies
                    d = rng.standard_normal((S, k, max_seeds))
                    sign = rng.choice([-1.0, 1.0], size=(S, k, 1))
                    d = d + sign * shift
                    dec = np.full((S, k), "", dtype=object)
                    used = np.zeros(S, int)
                    for li, n in enumerate(design.looks):
                        core = stats.paired_core(d[..., :n], margin)
                        difs = core["p"] < design.p_two[li]
                        eq = ~difs & (np.maximum(core["p_low"], core["p_high"]) < design.p_one[li])
                        last = li == design.n_looks - 1
                        new = np.where(difs, "differs", np.where(eq, "equivalent",
                                                                 "inconclusive" if last else ""))
                        open_ = dec == ""
                        dec[open_] = new[open_]
                        # the runner adds seeds while any config of the study is undecided
                        done_now = (dec != "").all(axis=1) & (used == 0)
                        used[done_now] = n
                    row = {"max seeds": max_seeds, "batch": batch, "configs": k,
                           "margin/sd": margin, "true shift": shift_name,
                           "differs": (dec == "differs").any(axis=1).mean() if shift == 0
                           else (dec == "differs").mean(),
                           "equivalent": (dec == "equivalent").any(axis=1).mean()
                           if shift == margin else (dec == "equivalent").mean(),
                           "decided": (dec != "inconclusive").mean(), "mean seeds": used.mean()}
                    rows.append(row)
    # spot check: the public decide()/assess() on a few studies gives the vectorized decisions
    design = SequentialDesign(10, 1, args.alpha)
    d = rng.standard_normal((50, 10)) + 0.7
    for i in range(50):
        for li, n in enumerate(design.looks):
            r = assess(li, d[i, :n], 0.5, design)["decision"]
            core = stats.paired_core(d[i, :n], 0.5)
            v = ("differs" if core["p"] < design.p_two[li] else
                 "equivalent" if max(core["p_low"], core["p_high"]) < design.p_one[li] else
                 "inconclusive" if li == design.n_looks - 1 else "continue")
            assert r == v, (i, li, r, v)
            if r != "continue":
                break
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=20_000, help="studies per fixed-n cell")
    ap.add_argument("--e2e-studies", type=int, default=300, help="studies per n, end to end")
    ap.add_argument("--seq-studies", type=int, default=20_000, help="studies per sequential cell")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=20240613)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    a = args.alpha
    fmt = {"display.width": 220, "display.max_columns": 30, "display.max_rows": 200,
           "display.float_format": "{:.3f}".format}
    t0 = time.perf_counter()
    print(f"devicediff verdict calibration; alpha {a}; seed {args.seed}; "
          f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}")

    grid, cover = fixed_n(args, rng)
    se = math.sqrt(a * (1 - a) / args.studies)
    print(f"\n1. Fixed n: {args.studies} studies per cell; metric correlation {RHO}; "
          f"Monte Carlo se of a rate near {a}: {se:.4f}")
    with pd.option_context(*[x for kv in fmt.items() for x in kv]):
        for col in ["false differs", "false equiv, fixed", "false equiv, seed-sd",
                    "equiv when alike"]:
            t = grid.pivot_table(index=["n", "m"], columns="R", values=col)
            t.columns = [f"R={r}" for r in t.columns]
            what = ("family-wise, all configs alike" if col == "false differs" else
                    "family-wise, every config shifted by the margin" if "false" in col else
                    "per comparison, alike configs: what n can show")
            print(f"\n  {col} ({what})")
            print("  " + t.to_string().replace("\n", "\n  "))
        c = cover.groupby(["n", "law"])[["hits", "total"]].sum()
        c["coverage"] = c["hits"] / c["total"]
        c = c["coverage"].unstack("law")
        print("\n  coverage of the 95% CI (per comparison, pooled over m and R)")
        print("  " + c.to_string().replace("\n", "\n  "))
    worst_d = grid["false differs"].max()
    worst_e = grid[["false equiv, fixed", "false equiv, seed-sd"]].to_numpy().max()
    lim = a + 3 * se    # 3 se: the worst of 64 cells, 16 of which sit at exactly alpha
    print(f"\n  worst family-wise false differs {worst_d:.4f}, worst family-wise false "
          f"equivalent {worst_e:.4f} (target <= {a}; OK up to {lim:.4f}): "
          f"{'OK' if max(worst_d, worst_e) <= lim else 'TOO HIGH'}")
    print(f"  coverage range {c.to_numpy().min():.4f} to {c.to_numpy().max():.4f} "
          f"(target 0.93-0.97): "
          f"{'OK' if 0.93 <= c.to_numpy().min() and c.to_numpy().max() <= 0.97 else 'OUT'}")
    print(f"  [{time.perf_counter() - t0:.0f} s]")

    e2e = end_to_end(args, rng)
    print(f"\n2. End to end through stats.verdicts: ref + 3 alike configs + 1 bitwise-identical "
          f"config; primary final_eval_mse, its copy final_eval_loss = 19.5 x it, 6 correlated "
          f"secondaries, 2 data-only baselines; R = 0.5")
    with pd.option_context(*[x for kv in fmt.items() for x in kv]):
        print("  " + e2e.to_string(index=False).replace("\n", "\n  "))
    print(f"  [{time.perf_counter() - t0:.0f} s]")

    seq = sequential(args, rng)
    sse = math.sqrt(a * (1 - a) / args.seq_studies)
    print(f"\n3. Sequential (O'Brien-Fleming-type alpha spending, t-calibrated levels): "
          f"{args.seq_studies} studies per row; se near {a}: {sse:.4f}. 'differs' at shift 0 and "
          "'equivalent' at shift = margin are the error rates (family-wise over the configs); "
          "other rows show power")
    with pd.option_context(*[x for kv in fmt.items() for x in kv]):
        print("  " + seq.to_string(index=False).replace("\n", "\n  "))
    e1 = seq.loc[seq["true shift"] == "0", "differs"].max()
    e2 = seq.loc[seq["true shift"] == "margin", "equivalent"].max()
    lim = a + 3 * sse   # the worst of 32 error-rate rows
    print(f"\n  worst false differs {e1:.4f}, worst false equivalent {e2:.4f} (target <= {a}; OK up "
          f"to {lim:.4f}): {'OK' if max(e1, e2) <= lim else 'TOO HIGH'}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
