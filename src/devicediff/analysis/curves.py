"""Curves over training steps: pure functions from stored records to DataFrames.

Three views of "how do the configs part ways over training", each a long DataFrame that a plot
draws directly:

- :func:`mean_curves`: per config and step, the mean of a metric over seeds with a 95% confidence
  band of that mean (Student t, ``mean +- t(0.975, n-1) * sd / sqrt(n)``): the figure of the
  original GPU-vs-CPU study, with its uncertainty stated.
- :func:`difference_curves`: per config and step, config minus reference. Paired by seed when
  the two share seeds (the same init and batches, so seed noise cancels), else the Welch
  difference of means. Relative columns divide by the reference mean at that step.
- :func:`weight_distances`: per run and eval step, the distance of its weights to those of the
  reference run of the same seed (L2 and L2 relative to the reference's norm), read from the
  flat float64 ``.npy`` snapshots; where only hashes exist, whether the bits are equal.

Only first runs (``repeat == 0``) enter the seed statistics, as in ``devicediff.analysis.stats``;
repeats of a cell measure implementation noise and show up in :func:`weight_distances`.
Non-finite values (a diverged run) are left out of means and counted in ``n_nan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["mean_curves", "difference_curves", "weight_distances", "weight_distance_summary", "load_snapshot"]

MEAN_COLUMNS = ["config", "step", "n", "n_nan", "mean", "sd", "lo", "hi"]
DIFF_COLUMNS = ["config", "reference", "step", "paired", "n", "ref_mean", "diff", "lo", "hi",
                "rel_diff", "rel_lo", "rel_hi", "ref_sd"]
WD_COLUMNS = ["config", "seed", "repeat", "run_id", "ref_run_id", "step", "equal", "l2", "rel", "source"]


def _first(long: pd.DataFrame) -> pd.DataFrame:
    return long[long["repeat"] == 0] if "repeat" in long.columns else long


def _tq(n: int, level: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, n - 1)) if n >= 2 else math.nan


def _configs(df: pd.DataFrame, order: list[str] | None) -> list[str]:
    present = list(pd.unique(df["config"]))
    if order is None:
        return present
    return [c for c in order if c in present] + [c for c in present if c not in order]


def mean_curves(long: pd.DataFrame, *, level: float = 0.95, order: list[str] | None = None) -> pd.DataFrame:
    """Mean over seeds per (config, step) with a ``level`` confidence band of the mean.

    ``long`` has columns ``config, seed, step, value`` (and ``repeat``; only ``repeat == 0`` is
    used), as ``devicediff.analysis.frames.curves`` returns. With one seed the band is NaN; with
    identical values it has width 0. Columns ``MEAN_COLUMNS``.
    """
    df = _first(long)
    rows = []
    for cfg in _configs(df, order):
        g = df[df["config"] == cfg]
        for step, s in g.groupby("step", sort=True):
            v = s["value"].to_numpy(dtype=float)
            ok = v[np.isfinite(v)]
            n = ok.size
            const = bool(n and np.all(ok == ok[0]))  # identical runs are common: keep them exact
            mean = float(ok[0]) if const else (float(ok.mean()) if n else math.nan)
            sd = (0.0 if const else float(ok.std(ddof=1))) if n >= 2 else math.nan
            half = _tq(n, level) * sd / math.sqrt(n) if n >= 2 else math.nan
            rows.append({"config": cfg, "step": int(step), "n": n, "n_nan": int(v.size - n), "mean": mean,
                         "sd": sd, "lo": mean - half, "hi": mean + half})
    return pd.DataFrame(rows, columns=MEAN_COLUMNS)


def _rel(x: float, ref: float) -> float:
    if not np.isfinite(ref) or ref == 0 or math.isnan(x):
        return math.nan
    return x / abs(ref)


def difference_curves(long: pd.DataFrame, reference: str, *, level: float = 0.95,
                      order: list[str] | None = None) -> pd.DataFrame:
    """Per config (not the reference) and step: config - reference, with a ``level`` CI.

    Paired on seeds where the two share at least two seeds at that step (t interval of the mean
    per-seed difference), else Welch's interval of the difference of means. ``ref_sd`` is the
    reference's sd across seeds at that step (the seed-noise yardstick); ``rel_*`` columns are
    divided by ``|ref_mean|``. Empty (with columns) when the reference has no values.
    """
    df = _first(long)
    df = df[np.isfinite(df["value"].to_numpy(dtype=float))]
    ref = df[df["config"] == reference]
    rows = []
    if ref.empty:
        return pd.DataFrame(rows, columns=DIFF_COLUMNS)
    ref_by_step = {int(k): g.groupby("seed")["value"].first() for k, g in ref.groupby("step")}
    for cfg in _configs(df, order):
        if cfg == reference:
            continue
        g = df[df["config"] == cfg]
        for step, s in g.groupby("step", sort=True):
            r = ref_by_step.get(int(step))
            if r is None or r.empty:
                continue
            c = s.groupby("seed")["value"].first()
            shared = c.index.intersection(r.index)
            ref_sd = float(r.std(ddof=1)) if len(r) >= 2 else math.nan
            if len(shared) >= 2:
                d = (c.loc[shared] - r.loc[shared]).to_numpy(dtype=float)
                n = d.size
                const = bool(np.all(d == d[0]))
                diff = float(d[0]) if const else float(d.mean())
                sd = 0.0 if const else float(d.std(ddof=1))
                half = _tq(n, level) * sd / math.sqrt(n)
                ref_mean = float(r.loc[shared].mean())
                paired = True
            else:
                cv, rv = c.to_numpy(dtype=float), r.to_numpy(dtype=float)
                n = min(cv.size, rv.size)
                diff = float(cv.mean() - rv.mean())
                ref_mean = float(rv.mean())
                paired = False
                if cv.size >= 2 and rv.size >= 2:
                    a, b = cv.var(ddof=1) / cv.size, rv.var(ddof=1) / rv.size
                    se = math.sqrt(a + b)
                    if se > 0:
                        dof = (a + b) ** 2 / (a**2 / (cv.size - 1) + b**2 / (rv.size - 1))
                        half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
                    else:
                        half = 0.0
                else:
                    half = math.nan
            lo, hi = diff - half, diff + half
            rows.append({"config": cfg, "reference": reference, "step": int(step), "paired": paired, "n": int(n),
                         "ref_mean": ref_mean, "diff": diff, "lo": lo, "hi": hi,
                         "rel_diff": _rel(diff, ref_mean), "rel_lo": _rel(lo, ref_mean),
                         "rel_hi": _rel(hi, ref_mean), "ref_sd": ref_sd})
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


def load_snapshot(path: str) -> np.ndarray | None:
    """A flat float64 weight snapshot, or None when the file is missing or unreadable
    (a store merged from another machine keeps the paths, not the files)."""
    if not isinstance(path, str) or not path:
        return None
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return np.asarray(a, dtype=np.float64).ravel()


def weight_distances(runs: pd.DataFrame, weights: pd.DataFrame, reference: str, *,
                     load: Callable[[str], np.ndarray | None] = load_snapshot) -> pd.DataFrame:
    """Distance of every run's weights to the reference run of the same seed, per eval step.

    ``runs``: ``run_id, config, seed`` (``repeat`` optional). ``weights``: ``run_id, step, sha256,
    path``. The anchor of a seed is its reference run with ``repeat == 0``; every other run of that
    seed (other configs, and repeats of the reference itself) is compared at the steps both have.

    ``equal``: the sha256 of the two snapshots agree (then ``l2 = rel = 0`` exactly, ``source``
    "hash"). Otherwise ``l2 = ||w - w_ref||_2`` and ``rel = l2 / ||w_ref||_2`` from the snapshot
    files (``source`` "snapshot"), or NaN where a file is missing (``source`` "hash"): the bits
    are known to differ, by how much is not. Columns ``WD_COLUMNS``.
    """
    if runs.empty or weights.empty:
        return pd.DataFrame([], columns=WD_COLUMNS)
    r = runs.copy()
    if "repeat" not in r.columns:
        r["repeat"] = 0
    anchors = r[(r["config"] == reference) & (r["repeat"] == 0)].drop_duplicates("seed").set_index("seed")["run_id"]
    w = weights.set_index(["run_id", "step"]).sort_index()
    by_run = {rid: g.droplevel(0) for rid, g in w.groupby(level=0)}
    rows: list[dict] = []
    for seed, group in r.groupby("seed", sort=True):
        if seed in anchors.index:
            rows.extend(_seed_distances(seed, group, anchors[seed], by_run, load))
    return _in_config_order(pd.DataFrame(rows, columns=WD_COLUMNS), list(pd.unique(r["config"])))


def _seed_distances(seed, group: pd.DataFrame, ref_id: str, by_run: dict[str, pd.DataFrame],
                    load: Callable[[str], np.ndarray | None]) -> list[dict]:
    """The :func:`weight_distances` rows of one seed: each of its runs (``group``) but the reference
    run ``ref_id`` against it, at the steps both have weights for."""
    theirs = by_run.get(ref_id)
    ref_cache: dict[str, np.ndarray | None] = {}  # a reference snapshot serves every config of its seed
    rows = []
    for _, run in group.iterrows():
        mine = by_run.get(run["run_id"])
        if run["run_id"] == ref_id or mine is None or theirs is None:
            continue
        for step in mine.index.intersection(theirs.index).sort_values():
            equal, l2, rel, source = _step_distance(mine.loc[step], theirs.loc[step], load, ref_cache)
            rows.append({"config": run["config"], "seed": seed, "repeat": int(run["repeat"]),
                         "run_id": run["run_id"], "ref_run_id": ref_id, "step": int(step), "equal": equal,
                         "l2": l2, "rel": rel, "source": source})
    return rows


def _step_distance(a: pd.Series, b: pd.Series, load: Callable[[str], np.ndarray | None],
                   ref_cache: dict) -> tuple[bool, float, float, str]:
    """(equal, l2, rel, source) of a run's weights ``a`` against the reference's ``b`` at one step
    (each with ``sha256`` and ``path``); see :func:`weight_distances`."""
    if a["sha256"] == b["sha256"]:
        return True, 0.0, 0.0, "hash"
    x, y = _load_cached(load, a["path"]), _load_cached(load, b["path"], ref_cache)
    if x is None or y is None or x.shape != y.shape:
        return False, math.nan, math.nan, "hash"  # the bits differ, by how much is not known
    with np.errstate(all="ignore"):
        l2 = float(np.linalg.norm(x - y))
        ny = float(np.linalg.norm(y))
    rel = l2 / ny if ny > 0 else (0.0 if l2 == 0 else math.inf)
    return False, l2, rel, "snapshot"


def _load_cached(load: Callable[[str], np.ndarray | None], path, cache: dict | None = None) -> np.ndarray | None:
    """``load(path)``, through ``cache`` when given; None for a missing path."""
    if not isinstance(path, str) or not path:
        return None
    if cache is None:
        return load(path)
    if path not in cache:
        cache[path] = load(path)
    return cache[path]


def _in_config_order(out: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """``out`` sorted by config (in ``order``), seed, repeat and step."""
    if len(out):
        out["_o"] = out["config"].map(order.index)
        out = out.sort_values(["_o", "seed", "repeat", "step"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return out


def weight_distance_summary(wd: pd.DataFrame) -> pd.DataFrame:
    """Per config and step over seeds (first runs and repeats): ``n``, ``n_equal`` (bitwise
    equal to the reference), ``n_known`` (distance computed), ``median_rel``, ``max_rel``."""
    cols = ["config", "step", "n", "n_equal", "n_known", "median_rel", "max_rel"]
    if wd.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (cfg, step), g in wd.groupby(["config", "step"], sort=False):
        rel = g["rel"].to_numpy(dtype=float)
        known = rel[~np.isnan(rel)]
        rows.append({"config": cfg, "step": int(step), "n": len(g), "n_equal": int(g["equal"].sum()),
                     "n_known": int(known.size), "median_rel": float(np.median(known)) if known.size else math.nan,
                     "max_rel": float(known.max()) if known.size else math.nan})
    return pd.DataFrame(rows, columns=cols).sort_values(["config", "step"], kind="stable").reset_index(drop=True)
