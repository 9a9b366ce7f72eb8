"""Do two configs' networks *predict* differently, more than a change of seed makes them?

Pure functions on held-out outputs (numpy arrays) and on the per-run frame of
``devicediff.analysis.stats`` (one row per finished run: ``config``, ``seed``, ``repeat`` and metric
columns). Nothing here reads a store.

* :func:`churn` — the fraction of inputs whose predicted class differs between two runs
  (the name of Milani Fard, Cormier, Canini & Gupta, "Launch and Iterate:
  Reducing Prediction Churn", NeurIPS 2016).
* :func:`output_distance` — a relative L2 distance for regression-like outputs (the autoencoder's
  reconstructions, PredNet's predicted frames), the analogue of churn there.
* :func:`churn_pairs` / :func:`churn_table` — every config's churn against the reference at the
  same seed, set against the *seed floor*: the reference against itself at another seed; and a
  verdict on whether the config changes predictions more than a seed change does.
* :func:`per_class_table` — per-class accuracy differences, paired by seed, with their own Holm
  family, so a shift confined to one class is seen and not drowned among the overall metrics
  (Pham et al., ASE 2020: implementation noise alone moved per-class accuracy far more than
  overall accuracy).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from itertools import combinations, product

import numpy as np
import pandas as pd
from scipy import stats

from devicediff.analysis.stats import holm

__all__ = ["churn", "output_distance", "churn_pairs", "churn_table", "per_class_table", "signflip_p_greater",
           "CHURN_COLUMNS", "PER_CLASS_COLUMNS", "MIN_SEEDS"]

#: the fewest paired seeds for a churn verdict: with 4, the one-sided sign-flip test's smallest p is
#: 1/16 > 0.05, so no verdict is possible at alpha = 0.05 anyway; 5 give 1/32.
MIN_SEEDS = 5
# Exact sign-flip enumeration up to 2**16 sign vectors; Monte Carlo beyond.
_EXACT_MAX_N = 16
_N_DRAWS = 9_999
_RTOL = 1e-12  # sums of the same numbers in another order differ in the last bits: ties

CHURN_COLUMNS = [
    "config", "reference", "n", "churn_mean", "churn_sd", "churn_min", "churn_max", "floor_mean", "floor_sd",
    "floor_min", "floor_max", "n_floor_pairs", "excess", "ratio", "p_more", "p_more_holm", "p_less",
    "p_less_holm", "verdict", "seeds_needed", "seeds_for", "note",
]
#: the power ``seeds_needed`` plans for, and the most seeds it names (as ``devicediff plan`` for the metrics)
POWER = 0.8
MAX_PLAN = 10_000
PER_CLASS_COLUMNS = [
    "config", "reference", "class", "metric", "n", "mean_ref", "mean_cfg", "diff", "t", "dof", "p", "p_holm",
    "verdict", "note",
]


# --------------------------------------------------------------------------------------------------
# pairwise distances


def _labels(pred, name: str) -> np.ndarray:
    a = np.asarray(pred)
    if a.ndim == 2:  # scores (N x K): the predicted class is the argmax
        a = a.argmax(axis=1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be predicted classes (N,) or scores (N, K), got shape {a.shape}")
    return a


def _same_inputs(a: np.ndarray, b: np.ndarray, mismatch: str, empty: str) -> None:
    """Raise ValueError(mismatch) unless a and b (1-D) have the same shape, ValueError(empty) if no inputs."""
    if a.shape != b.shape:
        raise ValueError(mismatch)
    if a.size == 0:
        raise ValueError(empty)


def churn(pred_a, pred_b) -> float:
    """Fraction of inputs whose predicted class differs between ``pred_a`` and ``pred_b``.

    Each is an array of predicted classes (N,) or of scores/probabilities/logits (N, K), whose
    argmax is then the predicted class. Both must cover the same N inputs in the same order."""
    a, b = _labels(pred_a, "pred_a"), _labels(pred_b, "pred_b")
    _same_inputs(a, b, f"churn: pred_a has {a.shape[0]} inputs, pred_b {b.shape[0]}; they must be the same inputs",
                 "churn: no inputs")
    return float(np.count_nonzero(a != b) / a.size)


def output_distance(out_a, out_b) -> float:
    """Relative L2 distance ``||a - b|| / sqrt((||a||^2 + ||b||^2) / 2)`` over all elements, in float64.

    Symmetric (a seed pair has no reference side), 0 for identical outputs, scale-free, at most 2
    (reached for ``b = -a``); 0 when both are all zeros. For regression-like outputs such as the
    autoencoder's reconstructions or PredNet's predicted frames of the same held-out inputs."""
    a = np.asarray(out_a, dtype=np.float64).ravel()
    b = np.asarray(out_b, dtype=np.float64).ravel()
    _same_inputs(a, b, f"output_distance: outputs have {a.size} and {b.size} values; they must be the same inputs",
                 "output_distance: no outputs")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    scale = math.sqrt((float(a @ a) + float(b @ b)) / 2.0)
    diff = float(np.linalg.norm(a - b))
    if scale == 0.0:
        return 0.0
    return diff / scale


# --------------------------------------------------------------------------------------------------
# the test


def signflip_p_greater(d, *, rng_seed: int = 0) -> float:
    """One-sided sign-flip (randomisation) p-value for H1: mean(d) > 0.

    Under H0 each difference is symmetric about 0, so every sign vector is equally likely;
    p = share of sign vectors whose mean is >= the observed one. Exact for n <= 16, else
    Monte Carlo with (1 + hits) / (1 + draws) (Phipson & Smyth 2010). NaN for n = 0."""
    d = np.asarray(d, dtype=float).ravel()
    n = d.size
    if n == 0:
        return math.nan
    obs = d.sum()
    tol = _RTOL * max(1.0, float(np.abs(d).sum()))
    if np.all(d == 0):
        return 1.0
    if n <= _EXACT_MAX_N:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
        sums = signs @ d
        return float(np.count_nonzero(sums >= obs - tol) / 2**n)
    rng = np.random.default_rng(rng_seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(_N_DRAWS, n))
    hits = np.count_nonzero(signs @ d >= obs - tol)
    return float((1 + hits) / (1 + _N_DRAWS))


# --------------------------------------------------------------------------------------------------
# tables


def _index(predictions: Mapping) -> dict[str, dict[int, object]]:
    by: dict[str, dict[int, object]] = {}
    for key, value in predictions.items():
        try:
            config, seed = key
        except (TypeError, ValueError):
            raise ValueError(f"predictions keys must be (config, seed) pairs, got {key!r}") from None
        by.setdefault(str(config), {})[int(seed)] = value
    return by


def _reference_runs(by: dict[str, dict[int, object]], reference: str) -> dict[int, object]:
    """The reference's {seed: predictions}; ValueError when it has none."""
    if reference not in by:
        raise ValueError(f"reference {reference!r} has no predictions; configs with predictions: {sorted(by)}")
    return by[reference]


def churn_pairs(predictions: Mapping, reference: str, *, distance: Callable = churn) -> pd.DataFrame:
    """Every pairwise distance ``churn_table`` uses, one row each (long form, for plots and export):

    * ``kind = "config"``: config c at seed s against the reference at seed s (``seed_b = seed``);
    * ``kind = "seed"``: the reference at seed s against the reference at seed s' > s (the floor).

    Columns: kind, config, reference, seed, seed_b, value."""
    by = _index(predictions)
    ref = _reference_runs(by, reference)
    rows = []
    for s, t in combinations(sorted(ref), 2):
        rows.append({"kind": "seed", "config": reference, "reference": reference, "seed": s, "seed_b": t,
                     "value": distance(ref[s], ref[t])})
    for config in sorted(by):
        if config == reference:
            continue
        for s in sorted(set(by[config]) & set(ref)):
            rows.append({"kind": "config", "config": config, "reference": reference, "seed": s, "seed_b": s,
                         "value": distance(by[config][s], ref[s])})
    return pd.DataFrame(rows, columns=["kind", "config", "reference", "seed", "seed_b", "value"])


def _sd(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if a.size >= 2 else math.nan


def churn_table(predictions: Mapping, reference: str, *, distance: Callable = churn, alpha: float = 0.05,
                min_seeds: int = MIN_SEEDS, rng_seed: int = 0) -> pd.DataFrame:
    """Per config: its churn against the reference at the same seed, against the seed-churn floor.

    ``predictions`` maps ``(config, seed)`` to that run's held-out predictions (classes, or scores
    whose argmax is the class; with ``distance=output_distance``, any outputs). One row per config
    other than the reference, columns ``CHURN_COLUMNS`` plus ``churn_s<seed>`` for every seed:

    * ``churn_mean/sd/min/max`` over the n seeds run by both the config and the reference, of
      c_s = distance(config at seed s, reference at seed s);
    * ``floor_*`` over all pairs s < s' of reference seeds of distance(reference s, reference s');
    * ``excess = churn_mean - floor_mean``, ``ratio = churn_mean / floor_mean``.

    The verdict. For each paired seed s, e_s = c_s - f_s where f_s is the mean floor distance of
    reference seed s to every other reference seed (so each config run is set against the seed
    changes *of its own reference run*). ``p_more`` is the one-sided sign-flip p of mean(e) > 0
    (:func:`signflip_p_greater`), ``p_less`` of mean(e) < 0; each is Holm-adjusted over the
    configs of the table. Then

    * ``more``: p_more_holm < alpha — the config changes predictions more than a seed change does;
    * ``less``: p_less_holm < alpha — the config's predictions stay closer to the reference's
      than another seed's do (e.g. bitwise-identical runs, or rounding that training did not
      amplify to seed scale);
    * ``inconclusive``: neither, and always when n < ``min_seeds`` (default 5: with 4 seeds the
      smallest attainable one-sided p is 1/16) or the reference has fewer than 2 seeds.

    An inconclusive row says how many paired seeds would decide it (``seeds_needed``, for the
    verdict ``seeds_for``, the direction of mean(e); also in its note): :func:`churn_seeds_needed`.

    Assumptions, to be read with the verdict: the e_s are independent across seeds and, under
    "no more than a seed change", symmetric about 0. The f_s share floor pairs (f_s and f_s'
    both contain distance(s, s')), a weak positive dependence that makes p somewhat optimistic
    with few seeds; ``more`` with p_more_holm near alpha deserves more seeds. "Inconclusive" is
    not "same": proving that churn is *at most* the floor needs an equivalence margin, which this
    rule does not set.
    """
    by = _index(predictions)
    ref = _reference_runs(by, reference)
    floor_vals, f_own = _seed_floor(ref, distance)
    all_seeds = sorted({s for cfg in by.values() for s in cfg})
    rows = [_churn_row(config, by[config], ref, floor_vals, f_own, reference=reference, distance=distance,
                       min_seeds=min_seeds, rng_seed=rng_seed)
            for config in sorted(by) if config != reference]
    return _churn_frame(rows, [f"churn_s{s}" for s in all_seeds], alpha, min_seeds)


def churn_seeds_needed(e, m: int, *, alpha: float = 0.05, min_seeds: int = MIN_SEEDS,
                       power: float = POWER) -> tuple[float, str]:
    """``(n, verdict)``: about how many paired seeds would give a churn row the verdict its seeds so far
    lean to (``"less"`` when mean(e) < 0, else ``"more"``), with ``m`` configs in the Holm family.

    At least the n at which the test can reach the level at all: the exact one-sided sign-flip p
    is never below 1/2^n, and Holm's first step compares it with alpha/m, so n >= log2(m/alpha)
    (and ``min_seeds``). Beyond that, a normal approximation of the test of mean(e) at level
    alpha/m with ``power``: n = ((z(1-alpha/m) + z(power)) sd(e) / |mean(e)|)^2, from the e_s so far
    (sd 0, all of one sign: the floor alone); NaN above ``MAX_PLAN``. NaN and ``""`` when the e_s
    lean nowhere (mean 0) or fewer than 2 are known. A plan, not a promise: the e_s of new seeds
    may differ."""
    e = np.asarray(e, dtype=float).ravel()
    e = e[np.isfinite(e)]
    if e.size < 2 or e.mean() == 0:
        return math.nan, ""
    level = alpha / max(m, 1)
    n = max(min_seeds, math.ceil(math.log2(1 / level)), e.size + 1)
    sd = float(e.std(ddof=1))
    if sd > 0:
        z = stats.norm.ppf(1 - level) + stats.norm.ppf(power)
        n = max(n, math.ceil((z * sd / abs(e.mean())) ** 2))
    return (float(n) if n <= MAX_PLAN else math.nan), "less" if e.mean() < 0 else "more"


def _seed_floor(ref: dict[int, object], distance: Callable) -> tuple[np.ndarray, dict[int, float]]:
    """The seed floor: distance(reference s, reference s') for every pair s < s' of reference seeds, and
    per seed s the mean of its distances to every other reference seed (empty with fewer than 2 seeds)."""
    ref_seeds = sorted(ref)
    floor: dict[tuple[int, int], float] = {}
    for s, t in combinations(ref_seeds, 2):
        floor[(s, t)] = floor[(t, s)] = float(distance(ref[s], ref[t]))
    floor_vals = np.array([floor[(s, t)] for s, t in combinations(ref_seeds, 2)], dtype=float)
    f_own = {s: float(np.mean([floor[(s, t)] for t in ref_seeds if t != s])) for s in ref_seeds} if len(ref_seeds) > 1 else {}
    return floor_vals, f_own


def _spread(prefix: str, a: np.ndarray) -> dict[str, float]:
    """``<prefix>_mean/sd/min/max`` of a (NaN when empty; sd NaN below 2 values)."""
    has = a.size > 0
    return {f"{prefix}_mean": float(a.mean()) if has else math.nan, f"{prefix}_sd": _sd(a),
            f"{prefix}_min": float(a.min()) if has else math.nan, f"{prefix}_max": float(a.max()) if has else math.nan}


def _churn_ratio(churn_mean: float, floor_mean: float) -> float:
    if floor_mean > 0:
        return churn_mean / floor_mean
    return math.nan if churn_mean == 0 or math.isnan(floor_mean) else math.inf


def _churn_row(config: str, runs: dict[int, object], ref: dict[int, object], floor_vals: np.ndarray,
               f_own: dict[int, float], *, reference: str, distance: Callable, min_seeds: int,
               rng_seed: int) -> dict:
    """One config's row of :func:`churn_table`, before Holm and verdict."""
    seeds = sorted(set(runs) & set(ref))
    c = np.array([float(distance(runs[s], ref[s])) for s in seeds], dtype=float)
    row: dict = {"config": config, "reference": reference, "n": len(seeds), **_spread("churn", c),
                 **_spread("floor", floor_vals), "n_floor_pairs": int(floor_vals.size)}
    row["excess"] = row["churn_mean"] - row["floor_mean"]
    row["ratio"] = _churn_ratio(row["churn_mean"], row["floor_mean"])
    for s, v in zip(seeds, c):
        row[f"churn_s{s}"] = float(v)
    e = c - np.array([f_own[s] for s in seeds]) if f_own else np.array([])  # churn over own seed floor
    p_more, p_less, notes = _churn_test(c, e, n_ref_seeds=len(ref), min_seeds=min_seeds, rng_seed=rng_seed)
    row.update(p_more=p_more, p_less=p_less, note="; ".join(notes), _e=e)
    return row


def _churn_test(c: np.ndarray, e: np.ndarray, *, n_ref_seeds: int, min_seeds: int,
                rng_seed: int) -> tuple[float, float, list[str]]:
    """(p_more, p_less, notes): one-sided sign-flip p of e_s = c_s - f_s above and below 0, NaN (with
    the reason in the notes) when there is no floor, a non-finite distance or too few seeds."""
    n = len(c)
    notes = []
    if n and np.all(c == 0):
        notes.append("predictions identical to the reference's at every seed")
    if n_ref_seeds < 2:
        notes.append("the reference has fewer than 2 seeds: no seed floor")
        return math.nan, math.nan, notes
    if not np.isfinite(c).all():
        notes.append("non-finite outputs (a diverged run?)")
        return math.nan, math.nan, notes
    if n < min_seeds:
        notes.append(f"n = {n} < {min_seeds} paired seeds: too few for a verdict")
        return math.nan, math.nan, notes
    return signflip_p_greater(e, rng_seed=rng_seed), signflip_p_greater(-e, rng_seed=rng_seed), notes


def _need_text(n: float, verdict: str) -> str:
    if not verdict:
        return ""
    many = f"more than {MAX_PLAN}" if math.isnan(n) else f"about {n:.0f}"
    return f"{many} paired seeds for a verdict of '{verdict}'"


def _churn_frame(rows: list[dict], seed_cols: list[str], alpha: float, min_seeds: int) -> pd.DataFrame:
    """The rows as :func:`churn_table`'s frame: Holm over the configs, verdicts, the seeds an
    inconclusive row needs, every seed column."""
    if not rows:
        return pd.DataFrame(columns=CHURN_COLUMNS + seed_cols)
    df = pd.DataFrame(rows)
    df["p_more_holm"] = holm(df["p_more"].to_numpy(dtype=float))
    df["p_less_holm"] = holm(df["p_less"].to_numpy(dtype=float))
    df["verdict"] = np.where(df["p_more_holm"] < alpha, "more",
                             np.where(df["p_less_holm"] < alpha, "less", "inconclusive"))
    need = [churn_seeds_needed(e, len(df), alpha=alpha, min_seeds=min_seeds) if v == "inconclusive"
            else (math.nan, "") for e, v in zip(df.pop("_e"), df["verdict"])]
    df["seeds_needed"] = [n for n, _ in need]
    df["seeds_for"] = [f for _, f in need]
    df["note"] = ["; ".join(x for x in (note, _need_text(n, f)) if x) for note, (n, f) in zip(df["note"], need)]
    for col in seed_cols:
        if col not in df:
            df[col] = math.nan
    return df[CHURN_COLUMNS + seed_cols].reset_index(drop=True)


def per_class_table(finals: pd.DataFrame, reference: str, *, alpha: float = 0.05,
                    pattern: str = r"^eval_acc_class_(\d+)$") -> pd.DataFrame:
    """Per-class accuracy differences (config - reference), paired by seed, one Holm family.

    ``finals`` is the per-run frame (``config``, ``seed``, optionally ``repeat`` — only ``repeat == 0``
    is used — and one column per class matching ``pattern``, e.g. ``eval_acc_class_3``; the group
    is the class). For every config other than the reference and every class: the seeds both ran
    with a finite value, their means, ``diff = mean_cfg - mean_ref``, and a paired t-test
    (``scipy.stats.ttest_rel``; Student 1908), with the two degenerate cases made exact: all
    differences zero -> p = 1, all equal and non-zero -> the exact two-sided sign-flip p, 2 / 2**n
    (not t = inf, p = 0, which two seeds would reach). ``p_holm`` is Holm (1979) over
    every config x class row of this table — its own family, apart from the overall metrics' —
    and ``verdict`` is ``differs`` if p_holm < alpha, else ``inconclusive`` (no margin is set, so
    "no difference" is never claimed); ``inconclusive`` too when fewer than 2 seeds pair up.
    Long form (columns ``PER_CLASS_COLUMNS``): pivot config x class for a heatmap of ``diff``."""
    rx = re.compile(pattern)
    classes = sorted(((int(m.group(1)), col) for col in finals.columns if (m := rx.match(str(col)))))
    if "repeat" in finals.columns:
        finals = finals[finals["repeat"] == 0]
    if reference not in set(finals["config"]):
        raise ValueError(f"reference {reference!r} has no runs; configs: {sorted(set(finals['config']))}")
    configs = [c for c in dict.fromkeys(finals["config"]) if c != reference]
    ref = finals[finals["config"] == reference].set_index("seed")
    rows = []
    for config, (k, col) in product(configs, classes):
        cfg = finals[finals["config"] == config].set_index("seed")
        both = pd.concat([ref[col].rename("ref"), cfg[col].rename("cfg")], axis=1, join="inner")
        both = both[np.isfinite(both["ref"].astype(float)) & np.isfinite(both["cfg"].astype(float))]
        x, y = both["cfg"].to_numpy(float), both["ref"].to_numpy(float)
        n = len(x)
        d = x - y
        row = {"config": config, "reference": reference, "class": k, "metric": col, "n": n,
               "mean_ref": float(y.mean()) if n else math.nan, "mean_cfg": float(x.mean()) if n else math.nan,
               "diff": float(d.mean()) if n else math.nan, "t": math.nan, "dof": math.nan, "p": math.nan,
               "note": ""}
        if n < 2:
            row["note"] = f"n = {n}: a paired test needs 2 seeds or more"
        elif np.all(d == d[0]):
            # ttest_rel divides by the sd of d, 0 here: identical runs (d = 0) are common in this tool.
            # A constant non-zero difference would give t = inf and p = 0 even with 2 seeds; take the exact
            # two-sided sign-flip p instead, 2 / 2**n (all n signs agree), which needs seeds to get small.
            row.update(t=0.0 if d[0] == 0 else math.copysign(math.inf, d[0]), dof=float(n - 1),
                       p=1.0 if d[0] == 0 else min(1.0, 2.0 ** (1 - n)),
                       note="identical in every seed" if d[0] == 0
                       else "the same difference in every seed: exact sign-flip p")
        else:
            res = stats.ttest_rel(x, y)  # paired t-test of x - y (scipy.stats.ttest_rel)
            row.update(t=float(res.statistic), dof=float(n - 1), p=float(res.pvalue))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=PER_CLASS_COLUMNS)
    df = pd.DataFrame(rows)
    df["p_holm"] = holm(df["p"].to_numpy(dtype=float))
    df["verdict"] = np.where(df["p_holm"] < alpha, "differs", "inconclusive")
    return df[PER_CLASS_COLUMNS].reset_index(drop=True)
