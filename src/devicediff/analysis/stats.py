"""Verdicts: is the difference between an execution config and the reference real?

Pure functions from a *per-run* DataFrame to DataFrames with conventional column names (the style of
pingouin). The per-run frame has one row per finished run and the columns

    run_id (str), config (str), seed (int), repeat (int), <metric> (float) ...

``repeat == 0`` is the first run of a (config, seed); ``repeat > 0`` re-runs the very same cell and so
measures implementation-only noise. A non-finite metric value (NaN, or +-inf) means the run diverged:
such runs are excluded from every test and counted in ``n_nan_*`` columns and in ``note``.

The verdict rule (see ``docs/statistics.md`` for the justification and the calibration):

* ``differs``      if the Holm-adjusted p of the primary test (paired t, else Welch t) is < alpha;
* ``equivalent``   else, if the Holm-adjusted TOST p (Schuirmann 1987) at +-margin is < alpha;
* ``inconclusive`` otherwise.

Holm (1979) runs over every comparison of the family (all configs x metrics in ``verdict_table``),
so the chance of any false ``differs`` in a study whose configs are all truly alike is <= alpha.

Sign convention everywhere: ``diff = config - reference`` (``x - y`` in the helpers, as in
``scipy.stats.ttest_rel(x, y)``).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "describe",
    "compare",
    "verdict_table",
    "noise_floor",
    "summary_sentence",
    "bootstrap_ci",
    "hedges_g",
    "holm",
    "tost_paired",
    "tost_welch",
    "seeds_needed",
    # issue #13: roles, t intervals, identical configs, affine copies
    "verdicts",
    "paired_core",
    "t_interval",
    "holm_rows",
    "decide_rows",
    "metric_roles",
    "affine_copies",
    "signflip_min_p",
    "VERDICT_COLUMNS",
]

# Exact sign-flip enumeration up to 2**16 = 65536 relabellings; Monte Carlo beyond.
EXACT_SIGNFLIP_MAX_N = 16
# Exact two-sample permutation when C(nx + ny, nx) is at most this; Monte Carlo beyond.
EXACT_PERM_MAX_SPLITS = 20_000
# Monte Carlo permutation draws; p = (1 + hits) / (1 + draws) (Phipson & Smyth 2010), never 0.
N_PERM = 9_999
# Two permutation statistics closer than this (relative) are ties: sums of the same numbers taken in
# another order differ in the last bits, and must still count as "at least as extreme".
_PERM_RTOL = 1e-12
TARGET_POWER = 0.8
MAX_SEEDS = 1_000_000

COLUMNS = [
    "config", "reference", "metric", "paired", "n", "n_ref", "n_cfg", "n_nan_ref", "n_nan_cfg",
    "mean_ref", "mean_cfg", "diff", "rel_diff", "ci_low", "ci_high", "test", "t", "dof", "p",
    "p_holm", "p_rank", "p_perm", "hedges_g", "margin", "tost_p", "tost_p_holm", "p_diverge",
    "verdict", "note", "n_seeds_needed",
]


# --------------------------------------------------------------------------------------------------
# small numeric helpers (all careful with zero variance: bitwise-identical configs are common here)



def seeds_phrase(n: int) -> str:
    """"in its one seed", "in both seeds", "in all 5 seeds"."""
    return "in its one seed" if n == 1 else "in both seeds" if n == 2 else f"in all {n} seeds"

def _arr(x, name: str = "x") -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values; drop diverged runs first")
    return a


def _const(a: np.ndarray) -> bool:
    return a.size > 0 and bool(np.all(a == a[0]))


def _mean(a: np.ndarray) -> float:
    # The mean of n copies of one float can be off by an ulp; identical runs must give exactly it.
    if a.size == 0:
        return math.nan
    return float(a[0]) if _const(a) else float(a.mean())


def _var(a: np.ndarray) -> float:
    if a.size < 2:
        return math.nan
    return 0.0 if _const(a) else float(a.var(ddof=1))


def _t_p(t: float, df: float) -> float:
    """Two-sided p of a t statistic, exact at t = 0 and t = +-inf."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if t == 0:
        return 1.0
    if math.isinf(t):
        return 0.0
    return float(min(1.0, 2.0 * stats.t.sf(abs(t), df)))


def _t_from(mean: float, se: float, df: float) -> tuple[float, float]:
    """(t, p) for H0: mean = 0, with se = 0 handled (t = 0 if mean = 0, else +-inf)."""
    if math.isnan(mean) or math.isnan(se):
        return math.nan, math.nan
    if se == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return t, _t_p(t, df)


def _paired_t(d: np.ndarray) -> tuple[float, float, float, float]:
    """Paired t on differences d: (t, df, p, se). Same as scipy.stats.ttest_rel, but defined at sd 0."""
    n = d.size
    if n < 2:
        return math.nan, math.nan, math.nan, math.nan
    se = math.sqrt(_var(d) / n)
    t, p = _t_from(_mean(d), se, n - 1)
    return t, float(n - 1), p, se


def _welch_parts(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(diff, se, df) of Welch's unequal-variance t (Welch 1947, Satterthwaite df)."""
    nx, ny = x.size, y.size
    if nx < 2 or ny < 2:
        return math.nan, math.nan, math.nan
    diff = _mean(x) - _mean(y)
    ax, ay = _var(x) / nx, _var(y) / ny
    se2 = ax + ay
    if se2 == 0:
        return diff, 0.0, float(nx + ny - 2)
    df = se2**2 / (ax**2 / (nx - 1) + ay**2 / (ny - 1))
    return diff, math.sqrt(se2), float(df)


def _welch_t(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Welch t of mean(x) - mean(y): (t, df, p, se). Same as scipy.stats.ttest_ind(equal_var=False)."""
    diff, se, df = _welch_parts(x, y)
    t, p = _t_from(diff, se, df)
    return t, df, p, se


def _bounds(margin) -> tuple[float, float]:
    if isinstance(margin, (tuple, list, np.ndarray)):
        low, upp = (float(v) for v in margin)
    else:
        m = float(margin)
        low, upp = -abs(m), abs(m)
    return low, upp


def _tost_parts(mean: float, se: float, df: float, low: float, upp: float):
    """Two one-sided t tests of H0: mean <= low or mean >= upp (Schuirmann 1987).

    Returns (t_low, p_low, t_upp, p_upp, p) with p = max(p_low, p_upp), as statsmodels' ttost_*.
    With se = 0 the data are exact: p = 0 inside the open interval (low, upp), 1 outside.
    """
    if any(math.isnan(v) for v in (mean, se, df, low, upp)):
        return (math.nan,) * 5
    if se == 0:
        def side(v):  # t = +-inf, or 0 when mean sits on the bound
            return 0.0 if v == 0 else math.copysign(math.inf, v)

        t_low, t_upp = side(mean - low), side(mean - upp)
        p_low = 0.0 if t_low > 0 else (0.5 if t_low == 0 else 1.0)
        p_upp = 0.0 if t_upp < 0 else (0.5 if t_upp == 0 else 1.0)
    else:
        t_low, t_upp = (mean - low) / se, (mean - upp) / se
        p_low = float(stats.t.sf(t_low, df))
        p_upp = float(stats.t.cdf(t_upp, df))
    return t_low, p_low, t_upp, p_upp, max(p_low, p_upp)


def _hedges_j(df: float) -> float:
    """Exact small-sample bias correction J(df) = G(df/2) / (sqrt(df/2) G((df-1)/2)) (Hedges 1981).

    J(df) ~= 1 - 3 / (4 df - 1), the approximation most texts print.
    """
    if math.isnan(df) or df < 2:
        return math.nan
    return math.exp(special.gammaln(df / 2) - 0.5 * math.log(df / 2) - special.gammaln((df - 1) / 2))


def _ratio(num: float, den: float) -> float:
    """num / den with 0/0 -> 0 (identical data) and x/0 -> +-inf, never a warning."""
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / den


# --------------------------------------------------------------------------------------------------
# public helpers


def hedges_g(x, y, *, paired: bool = False) -> float:
    """Hedges' g of mean(x) - mean(y): Cohen's d times the exact correction J(nx + ny - 2).

    Unpaired: d = diff / pooled sd (the Student t denominator), so d = t * sqrt(1/nx + 1/ny).
    Paired: d_av = mean(x - y) / sqrt((var x + var y) / 2) (Cumming 2012; Lakens 2013, eq. 10),
    i.e. the shift in units of the spread *across seeds*, not the sd of the differences (d_z): with
    shared seeds the differences can be tiny and d_z huge for a shift nobody would care about.
    Zero spread: g = 0 for identical means, +-inf otherwise. Inputs must be finite.
    """
    x, y = _arr(x, "x"), _arr(y, "y")
    nx, ny = x.size, y.size
    if nx < 2 or ny < 2:
        return math.nan
    if paired:
        if nx != ny:
            raise ValueError("paired hedges_g needs x and y of equal length")
        diff = _mean(x - y)
        s = math.sqrt((_var(x) + _var(y)) / 2)
    else:
        diff = _mean(x) - _mean(y)
        s = math.sqrt(((nx - 1) * _var(x) + (ny - 1) * _var(y)) / (nx + ny - 2))
    return _ratio(diff, s) * _hedges_j(nx + ny - 2)


def bootstrap_ci(x, y=None, *, paired: bool = False, n_boot: int = 2000, confidence: float = 0.95,
                 rng_seed=0) -> tuple[float, float]:
    """Percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) of a mean difference.

    ``y is None``: CI of mean(x). ``paired``: resample pairs, CI of mean(x - y). Else resample each
    group on its own, CI of mean(x) - mean(y). ``rng_seed`` is anything ``numpy.random.default_rng``
    takes; the same seed gives the same interval. ``n_boot = 0`` returns (nan, nan).
    """
    x = _arr(x, "x")
    if y is not None:
        y = _arr(y, "y")
    if n_boot <= 0 or x.size == 0 or (y is not None and y.size == 0):
        return math.nan, math.nan
    rng = np.random.default_rng(rng_seed)
    if y is None or paired:
        if paired and (y is None or y.size != x.size):
            raise ValueError("paired bootstrap needs x and y of equal length")
        d = x - y if paired else x
        if _const(d):
            return float(d[0]), float(d[0])
        boot = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    else:
        boot = (x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
                - y[rng.integers(0, y.size, (n_boot, y.size))].mean(axis=1))
    a = (1 - confidence) / 2
    low, high = np.quantile(boot, [a, 1 - a])
    return float(low), float(high)


def holm(pvals) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries are left out of the family and stay NaN.

    Sorted p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Same as ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]``.
    """
    p = np.asarray(pvals, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    ps = p[ok]
    m = ps.size
    if m == 0:
        return out
    order = np.argsort(ps, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def _tost_frame(diff, se, df, low, upp) -> pd.DataFrame:
    t_low, p_low, t_upp, p_upp, p = _tost_parts(diff, se, df, low, upp)
    return pd.DataFrame([{
        "bound_low": low, "bound_high": upp, "diff": diff, "se": se, "dof": df,
        "t_low": t_low, "p_low": p_low, "t_high": t_upp, "p_high": p_upp, "p": p,
    }])


def tost_paired(x, y, margin) -> pd.DataFrame:
    """Paired TOST (Schuirmann 1987) that mean(x - y) lies inside (-margin, +margin).

    ``margin`` is a positive number or a (low, high) pair. One row: bounds, diff, se, dof, the two
    one-sided t and p, and ``p`` = max of the two (equivalence shown at level alpha when p < alpha).
    Matches ``statsmodels.stats.weightstats.ttost_paired(x, y, low, high)``.
    """
    x, y = _arr(x, "x"), _arr(y, "y")
    if x.size != y.size:
        raise ValueError("tost_paired needs x and y of equal length")
    low, upp = _bounds(margin)
    d = x - y
    _, df, _, se = _paired_t(d)
    return _tost_frame(_mean(d), se, df, low, upp)


def tost_welch(x, y, margin) -> pd.DataFrame:
    """Unpaired TOST with Welch's se and df, that mean(x) - mean(y) lies inside (-margin, +margin).

    Matches ``statsmodels.stats.weightstats.ttost_ind(x, y, low, high, usevar="unequal")``.
    """
    x, y = _arr(x, "x"), _arr(y, "y")
    low, upp = _bounds(margin)
    diff, se, df = _welch_parts(x, y)
    return _tost_frame(diff, se, df, low, upp)


def _power(es: float, n, alpha: float, paired: bool) -> np.ndarray:
    """Two-sided t-test power from the noncentral t (as statsmodels' TTestPower / TTestIndPower).

    paired: one-sample t on n differences, df = n - 1, noncentrality es * sqrt(n).
    unpaired: two samples of n each, df = 2n - 2, noncentrality es * sqrt(n / 2).
    Vectorized over n.
    """
    n = np.asarray(n, dtype=float)
    df = n - 1 if paired else 2 * n - 2
    nc = es * np.sqrt(n if paired else n / 2)
    crit = stats.t.isf(alpha / 2, df)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def seeds_needed(effect_size: float, *, paired: bool = True, alpha: float = 0.05,
                 power: float = TARGET_POWER) -> float:
    """Smallest number of seeds giving ``power`` for a two-sided t test at ``alpha``.

    ``effect_size`` is the difference to detect over the sd of the paired differences (paired: one
    sample t, the count is of pairs) or over the sd within each config (unpaired: Student t, the
    count is seeds *per config*). It is ceil() of statsmodels' ``TTestPower().solve_power`` /
    ``TTestIndPower().solve_power``. NaN when undefined (effect 0 or NaN, or above ``MAX_SEEDS``).
    """
    es = abs(float(effect_size))
    if math.isnan(es) or es == 0:
        return math.nan
    if math.isinf(es):
        return 2.0
    # Start from the normal approximation n0 = k ((z_{1-alpha/2} + z_power) / es)^2 (k = 1 paired,
    # 2 per group unpaired; the t answer is a little above it) and scan a short window around it.
    z = stats.norm.isf(alpha / 2) + stats.norm.ppf(power)
    n0 = (z / es) ** 2 * (1 if paired else 2)
    if n0 > MAX_SEEDS:
        return math.nan
    start = max(2, int(n0) - 2)
    window = np.arange(start, start + 16)
    ok = _power(es, window, alpha, paired) >= power
    if ok.any() and (start == 2 or not ok[0]):
        return float(window[np.argmax(ok)])
    # Fallback (not met in practice): bisection, power growing with n.
    lo, hi = 1, 2
    while _power(es, hi, alpha, paired) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return math.nan
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _power(es, mid, alpha, paired) >= power:
            hi = mid
        else:
            lo = mid
    return float(max(hi, 2))


# --------------------------------------------------------------------------------------------------
# permutation and rank tests


def _signflip_p(d: np.ndarray, rng: np.random.Generator, n_perm: int = N_PERM) -> float:
    """Two-sided sign-flip permutation test of mean(d) = 0; exact for n <= 16, else Monte Carlo.

    Under H0 (config and reference exchangeable within a seed) each difference is as likely to have
    either sign. Statistic |sum(s * d)|, equivalent to |mean|.
    """
    n = d.size
    if n == 0:
        return math.nan
    if n <= EXACT_SIGNFLIP_MAX_N:
        codes = np.arange(2**n)[:, None] >> np.arange(n)
        signs = 1.0 - 2.0 * (codes & 1)          # row 0 is all +1: the observed labelling
        null = np.abs(signs @ d)
        return float(np.mean(null >= null[0] * (1 - _PERM_RTOL)))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n))
    obs = abs(float(np.ones(n) @ d))
    hits = int(np.sum(np.abs(signs @ d) >= obs * (1 - _PERM_RTOL)))
    return (1 + hits) / (1 + n_perm)


def _perm_ind_p(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_perm: int = N_PERM) -> float:
    """Two-sided two-sample permutation test of |mean(x) - mean(y)|; exact if few splits, else MC."""
    nx, ny = x.size, y.size
    if nx == 0 or ny == 0:
        return math.nan
    z = np.concatenate([x, y])
    total = z.sum()

    def stat(sx):
        return np.abs(sx / nx - (total - sx) / ny)

    if math.comb(nx + ny, nx) <= EXACT_PERM_MAX_SPLITS:
        idx = np.array(list(combinations(range(nx + ny), nx)))  # first row is the observed split
        null = stat(z[idx].sum(axis=1))
        return float(np.mean(null >= null[0] * (1 - _PERM_RTOL)))
    obs = stat(z[:nx].sum())
    perms = rng.permuted(np.tile(np.arange(nx + ny), (n_perm, 1)), axis=1)[:, :nx]
    hits = int(np.sum(stat(z[perms].sum(axis=1)) >= obs * (1 - _PERM_RTOL)))
    return (1 + hits) / (1 + n_perm)


def _quiet(fn, *args, **kw) -> float:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(fn(*args, **kw).pvalue)
        except ValueError:
            return math.nan
    return p


def _wilcoxon_p(d: np.ndarray) -> float:
    """Wilcoxon signed-rank p (scipy; zeros dropped, as R's wilcox.test). All zero -> 1."""
    if d.size == 0:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    return _quiet(stats.wilcoxon, d)


def _mwu_p(x: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney U two-sided p (scipy). All values equal -> 1."""
    if x.size == 0 or y.size == 0:
        return math.nan
    z = np.concatenate([x, y])
    if _const(z):
        return 1.0
    return _quiet(stats.mannwhitneyu, x, y, alternative="two-sided")


# --------------------------------------------------------------------------------------------------
# per-run frame handling


def _check(per_run: pd.DataFrame, metric: str) -> pd.DataFrame:
    missing = [c for c in ("config", "seed") if c not in per_run.columns]
    if missing:
        raise KeyError(f"per-run frame lacks column(s) {missing}")
    if metric not in per_run.columns:
        raise KeyError(f"metric {metric!r} is not a column of the per-run frame")
    df = per_run
    if "repeat" not in df.columns:
        df = df.assign(repeat=0)
    return df


def _first_runs(per_run: pd.DataFrame, metric: str) -> pd.DataFrame:
    df = _check(per_run, metric)
    first = df[df["repeat"] == 0]
    dup = first.duplicated(["config", "seed"])
    if dup.any():
        bad = first.loc[dup, ["config", "seed"]].drop_duplicates().head(3).values.tolist()
        raise ValueError(f"several repeat == 0 runs for the same (config, seed), e.g. {bad}")
    return first


def _seed_series(g: pd.DataFrame, metric: str) -> pd.Series:
    """One config's metric values indexed by seed, sorted by seed (so that results do not depend on
    row order)."""
    return pd.Series(g[metric].to_numpy(dtype=float), index=g["seed"].to_numpy()).sort_index()


def _by_config(first: pd.DataFrame, metric: str) -> dict[str, tuple[pd.Series, int]]:
    """{config: (finite metric values indexed by seed, count of non-finite ones)}, in input order."""
    out = {}
    for cfg, g in first.groupby("config", sort=False):
        s = _seed_series(g, metric)
        ok = np.isfinite(s.to_numpy())
        out[cfg] = (s[ok], int((~ok).sum()))
    return out


def _configs(df: pd.DataFrame) -> list[str]:
    return list(pd.unique(df["config"]))


def _require_reference(configs, reference: str) -> None:
    if reference not in configs:
        raise ValueError(f"reference config {reference!r} has no repeat == 0 runs")


def _margin_for(margin, metric: str):
    if isinstance(margin, Mapping):
        return margin.get(metric)
    return margin


def _sd(a: np.ndarray) -> float:
    return math.sqrt(_var(a)) if a.size >= 2 else math.nan


def _default_margin(ref: np.ndarray, margin_fraction: float) -> float:
    # A fraction of the seed-noise sd, i.e. the sd across seeds of the *reference* config (not
    # pooled with the candidate: a config that adds noise must not widen its own yardstick). It is
    # estimated from the data, so it carries sampling error.
    return margin_fraction * _sd(ref) if ref.size >= 2 else math.nan


def _stream(rng_seed, *names: str) -> np.random.Generator:
    # One independent stream per (config, metric), so results do not depend on row order.
    return np.random.default_rng([int(rng_seed)] + [zlib.crc32(n.encode()) for n in names])


def _paired_arm(cfg_s: pd.Series, ref_s: pd.Series, shared, rng, low: float, upp: float) -> dict:
    """The paired half of a compare row, on the seeds both ran: paired t, Wilcoxon, sign-flip, TOST."""
    x = cfg_s.loc[shared].to_numpy()
    y = ref_s.loc[shared].to_numpy()
    d = x - y
    notes = []
    dropped = (len(cfg_s) - len(shared)) + (len(ref_s) - len(shared))
    if dropped:
        notes.append(f"{dropped} run(s) without a same-seed partner left out")
    t, dof, p, se = _paired_t(d)
    diff = _mean(d)
    p_rank = _wilcoxon_p(d)
    p_perm = _signflip_p(d, rng)
    _, _, _, _, tost_p = _tost_parts(diff, se, dof, low, upp)
    if d.size >= 2 and not np.any(d):
        # Identity shows equivalence at any margin >= 0, even a zero one (a metric that
        # does not vary with the seed); the TOST formula alone could not reject at 0.
        tost_p = 0.0
        notes.append("bitwise identical to reference")
    return {"x": x, "y": y, "notes": notes, "test": "paired t", "t": t, "dof": dof, "p": p, "diff": diff,
            "p_rank": p_rank, "p_perm": p_perm, "tost_p": tost_p, "sd_unit": _sd(d), "n": d.size}


def _welch_arm(cfg_s: pd.Series, ref_s: pd.Series, shared, rng, low: float, upp: float, paired) -> dict:
    """The unpaired half of a compare row, on all runs: Welch t, Mann-Whitney U, permutation, TOST."""
    x, y = cfg_s.to_numpy(), ref_s.to_numpy()
    t, dof, p, se = _welch_t(x, y)
    diff = _mean(x) - _mean(y) if x.size and y.size else math.nan
    p_rank = _mwu_p(x, y)
    p_perm = _perm_ind_p(x, y, rng)
    _, _, _, _, tost_p = _tost_parts(diff, se, dof, low, upp)
    sd_unit = math.sqrt((_var(x) + _var(y)) / 2) if x.size >= 2 and y.size >= 2 else math.nan
    notes = []
    if paired is None:
        notes.append("fewer than 2 shared seeds: unpaired" if len(shared) else "no shared seeds: unpaired")
    return {"x": x, "y": y, "notes": notes, "test": "Welch t", "t": t, "dof": dof, "p": p, "diff": diff,
            "p_rank": p_rank, "p_perm": p_perm, "tost_p": tost_p, "sd_unit": sd_unit, "n": x.size}


def _divergence_test(cfg_nan: int, cfg_ok: int, ref_nan: int, ref_ok: int) -> tuple[float, str]:
    """Divergence is a result too: Fisher's exact p (2x2) that the config and the reference diverge
    at different rates, and a note ("" and p = 1 when neither diverged)."""
    if not (cfg_nan or ref_nan):
        return 1.0, ""
    note = (f"diverged (non-finite, excluded): {cfg_nan}/{cfg_nan + cfg_ok} runs "
            f"vs {ref_nan}/{ref_nan + ref_ok} for reference")
    return float(stats.fisher_exact([[cfg_nan, cfg_ok], [ref_nan, ref_ok]])[1]), note


def _compare_one(cfg: str, cfg_s: pd.Series, cfg_nan: int, ref_s: pd.Series, ref_nan: int, *, reference: str,
                 metric: str, low: float, upp: float, n_boot: int, rng_seed, paired) -> dict:
    """One row of :func:`compare` (config ``cfg`` against the reference), before Holm and verdict."""
    shared = ref_s.index.intersection(cfg_s.index).sort_values()
    use_paired = paired if paired is not None else len(shared) >= 2
    rng = _stream(rng_seed, cfg, metric)  # the permutation test draws first, then the bootstrap
    if use_paired:
        arm = _paired_arm(cfg_s, ref_s, shared, rng, low, upp)
    else:
        arm = _welch_arm(cfg_s, ref_s, shared, rng, low, upp, paired)
    x, y, notes, tost_p = arm["x"], arm["y"], arm["notes"], arm["tost_p"]
    if x.size < 2 or y.size < 2:
        notes.append("too few finite runs to test")
    if not upp > low and tost_p != 0.0:
        notes.append("margin is 0: equivalence cannot be shown")
    ci = (bootstrap_ci(x, y, paired=use_paired, n_boot=n_boot, rng_seed=rng)
          if x.size and y.size else (math.nan, math.nan))
    mean_ref, mean_cfg = _mean(y), _mean(x)
    g = (hedges_g(x, y, paired=use_paired) if x.size >= 2 and y.size >= 2 else math.nan)
    p_div, div_note = _divergence_test(cfg_nan, len(cfg_s), ref_nan, len(ref_s))
    if div_note:
        notes.append(div_note)
    half = (upp - low) / 2
    diff, p = arm["diff"], arm["p"]
    return {
        "config": cfg, "reference": reference, "metric": metric, "paired": bool(use_paired),
        "n": int(arm["n"]), "n_ref": int(y.size), "n_cfg": int(x.size),
        "n_nan_ref": ref_nan, "n_nan_cfg": cfg_nan,
        "mean_ref": mean_ref, "mean_cfg": mean_cfg, "diff": diff,
        "rel_diff": _ratio(diff, abs(mean_ref)),
        "ci_low": ci[0], "ci_high": ci[1], "test": arm["test"], "t": arm["t"], "dof": arm["dof"], "p": p,
        "p_holm": p, "p_rank": arm["p_rank"], "p_perm": arm["p_perm"], "hedges_g": g,
        "margin": half, "tost_p": tost_p, "tost_p_holm": tost_p, "p_diverge": p_div,
        "verdict": "", "note": "; ".join(notes), "n_seeds_needed": math.nan,
        # standardized margin for the power solve; dropped in _finalize
        "_es": _ratio(half, arm["sd_unit"]) if not math.isnan(half) else math.nan,
    }


def _compare_rows(per_run, metric, reference, *, margin, margin_fraction, n_boot, rng_seed,
                  paired) -> list[dict]:
    values = _by_config(_first_runs(per_run, metric), metric)
    _require_reference(values, reference)
    ref_s, ref_nan = values[reference]
    m = _margin_for(margin, metric)
    if m is None:
        m = _default_margin(ref_s.to_numpy(), margin_fraction)
    low, upp = _bounds(m)
    return [_compare_one(cfg, cfg_s, cfg_nan, ref_s, ref_nan, reference=reference, metric=metric, low=low,
                         upp=upp, n_boot=n_boot, rng_seed=rng_seed, paired=paired)
            for cfg, (cfg_s, cfg_nan) in values.items() if cfg != reference]


def _margin_notes(tost_p_adj: float, diff: float, margin: float, alpha: float) -> list[str]:
    """Notes on a ``differs`` row whose difference lies, or may lie, inside the equivalence margin."""
    if tost_p_adj < alpha:
        return ["significant but within margin"]
    if abs(diff) < margin:
        return ["significant; estimate inside margin, TOST not passed"]
    return []


def _finalize(rows: list[dict], alpha: float) -> pd.DataFrame:
    """Holm-adjust p and TOST p over all rows (one family), then verdict, notes and seeds needed."""
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    p_holm = holm([r["p"] for r in rows])
    tost_holm = holm([r["tost_p"] for r in rows])
    # Power for the seeds-needed column at the first Holm step, alpha / m: enough seeds for the
    # smallest p of the family to clear it (a slight overestimate for the later, laxer Holm steps).
    level = alpha / max(int(np.sum(~np.isnan(p_holm))), 1)
    out = []
    for r, ph, th in zip(rows, p_holm, tost_holm):
        r = dict(r, p_holm=ph, tost_p_holm=th)
        es = r.pop("_es")
        if ph < alpha:
            r["verdict"] = "differs"
        elif th < alpha:
            r["verdict"] = "equivalent"
        else:
            r["verdict"] = "inconclusive"
        n_need = math.nan
        if r["verdict"] == "inconclusive" and np.isfinite(es) and es > 0:
            n_need = seeds_needed(es, paired=r["paired"], alpha=level)
        r["n_seeds_needed"] = pd.NA if math.isnan(n_need) else int(n_need)
        extra = []
        if r["verdict"] == "differs":
            extra.extend(_margin_notes(th, r["diff"], r["margin"], alpha))
            if r["paired"] and 2.0 ** (1 - r["n"]) >= alpha:
                # the smallest two-sided p a sign-flip or signed-rank test can give is 2 / 2**n
                extra.append(f"n = {r['n']} too few for rank/permutation tests to reach "
                             f"p < {alpha:g} (smallest possible p {2.0 ** (1 - r['n']):.3g})")
            elif not (r["p_rank"] < alpha or r["p_perm"] < alpha):
                extra.append("rank and permutation tests not significant")
        elif not math.isnan(n_need):
            extra.append(f"~{int(n_need)} seeds for 80% power at the margin")
        if r["p_diverge"] < alpha:
            extra.append(f"divergence rates differ (Fisher p = {r['p_diverge']:.2g})")
        r["note"] = "; ".join([s for s in [r["note"], *extra] if s])
        out.append(r)
    df = pd.DataFrame(out, columns=COLUMNS)
    df["n_seeds_needed"] = pd.array(df["n_seeds_needed"].tolist(), dtype="Int64")
    return df


# --------------------------------------------------------------------------------------------------
# public study-level functions


def describe(per_run: pd.DataFrame, metric: str, *, include_repeats: bool = False) -> pd.DataFrame:
    """Per-config summary of one metric over first runs (``repeat == 0``, the seed distribution).

    Columns: config, n, mean, sd, median, min, max, n_nan (non-finite runs, excluded from the rest).
    ``include_repeats`` takes every run instead. Configs in order of first appearance.
    """
    df = _check(per_run, metric)
    if not include_repeats:
        df = df[df["repeat"] == 0]
    rows = []
    for cfg in _configs(df):
        v = df.loc[df["config"] == cfg, metric].to_numpy(dtype=float)
        ok = v[np.isfinite(v)]
        rows.append({
            "config": cfg, "n": int(ok.size), "mean": _mean(ok),
            "sd": _sd(ok),
            "median": float(np.median(ok)) if ok.size else math.nan,
            "min": float(ok.min()) if ok.size else math.nan,
            "max": float(ok.max()) if ok.size else math.nan,
            "n_nan": int(v.size - ok.size),
        })
    return pd.DataFrame(rows, columns=["config", "n", "mean", "sd", "median", "min", "max", "n_nan"])


def compare(per_run: pd.DataFrame, metric: str, reference: str, *, margin=None,
            margin_fraction: float = 0.5, alpha: float = 0.05, n_boot: int = 2000, rng_seed: int = 0,
            paired: bool | None = None) -> pd.DataFrame:
    """Compare every non-reference config with ``reference`` on one metric, first runs only.

    Pairing: when a config shares at least two seeds (finite in both) with the reference, the test
    is the paired t on per-seed differences (config - reference), with the Wilcoxon signed-rank
    (``p_rank``) and an exact sign-flip permutation test (``p_perm``; Monte Carlo above 16 pairs) as
    robustness columns; runs without a partner are left out (noted). Otherwise Welch's t, with
    Mann-Whitney U and a two-sample permutation test. ``paired=True/False`` forces either.

    ``margin``: equivalence half-width in metric units (a number, or a {metric: number} mapping);
    ``None`` means ``margin_fraction`` x the reference's sd across seeds. TOST at +-margin, paired
    when the test is. ``ci_low/ci_high``: 95% percentile bootstrap CI (``n_boot`` resamples, pairs
    resampled when paired; seeded per config and metric from ``rng_seed``) of the mean difference;
    descriptive only, the verdict does not use it. ``n_boot=0`` skips it (NaN).

    Holm runs over the rows returned here (one family); use :func:`verdict_table` for a study with
    several metrics. With a single other config, ``p_holm == p``. ``n_seeds_needed`` (inconclusive
    rows only): seeds (pairs, or per config when unpaired) for 80% power to detect a difference of
    the size of the *margin* with the same test, at level alpha / (number of comparisons).
    """
    rows = _compare_rows(per_run, metric, reference, margin=margin, margin_fraction=margin_fraction,
                         n_boot=n_boot, rng_seed=rng_seed, paired=paired)
    return _finalize(rows, alpha)


def verdict_table(per_run: pd.DataFrame, metrics: Sequence[str] | str, reference: str, *,
                  margin=None, margin_fraction: float = 0.5, alpha: float = 0.05, n_boot: int = 2000,
                  rng_seed: int = 0, paired: bool | None = None) -> pd.DataFrame:
    """:func:`compare` over several metrics, Holm-adjusted over all configs x metrics together.

    Holm (1979) controls the family-wise error over the whole table under any dependence between
    the tests (metrics of one run are strongly correlated; no independence is assumed): with all
    configs truly alike, P(any ``differs``) <= alpha. The TOST p-values are adjusted the same way,
    as a second family: P(any false ``equivalent``) <= alpha. Keywords as for :func:`compare`;
    ``margin`` may be a {metric: margin} mapping, since metrics have different units.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    rows = []
    for metric in metrics:
        rows.extend(_compare_rows(per_run, metric, reference, margin=margin,
                                  margin_fraction=margin_fraction, n_boot=n_boot,
                                  rng_seed=rng_seed, paired=paired))
    return _finalize(rows, alpha)


def noise_floor(per_run: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Seed noise vs implementation noise, per config.

    seed_sd: sd across seeds of the first runs (repeat == 0). impl_sd: pooled sd of the runs that
    repeat one (config, seed) cell, sqrt(sum of squared deviations from each cell's mean / sum of
    (n_cell - 1)) over cells with >= 2 finite runs (0.0 exactly when all repeats are bitwise equal;
    NaN when no cell is repeated). ratio = impl_sd / seed_sd. n_nan counts non-finite runs (all).
    """
    df = _check(per_run, metric)
    rows = []
    for cfg in _configs(df):
        sub = df[df["config"] == cfg]
        vals = sub[metric].to_numpy(dtype=float)
        n_nan = int((~np.isfinite(vals)).sum())
        sub = sub[np.isfinite(vals)]
        first = sub.loc[sub["repeat"] == 0, metric].to_numpy(dtype=float)
        seed_sd = _sd(first)
        ss, dof, groups = 0.0, 0, 0
        for _, g in sub.groupby("seed", sort=False):
            v = g[metric].to_numpy(dtype=float)
            if v.size < 2:
                continue
            groups += 1
            dof += v.size - 1
            if not _const(v):
                ss += float(((v - v.mean()) ** 2).sum())
        impl_sd = math.sqrt(ss / dof) if dof else math.nan
        ratio = math.nan if (math.isnan(impl_sd) or math.isnan(seed_sd) or seed_sd == 0) \
            else impl_sd / seed_sd
        rows.append({"config": cfg, "n_seeds": int(first.size), "seed_sd": seed_sd,
                     "n_repeat_groups": groups, "impl_sd": impl_sd, "ratio": ratio, "n_nan": n_nan})
    return pd.DataFrame(rows, columns=["config", "n_seeds", "seed_sd", "n_repeat_groups", "impl_sd",
                                       "ratio", "n_nan"])


# --------------------------------------------------------------------------------------------------
# plain language


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _pct(x: float, signed: bool = True) -> str:
    v = 100 * x
    if abs(v) >= 100:
        s = f"{v:+.0f}" if signed else f"{abs(v):.0f}"
    else:
        s = f"{v:+.2g}" if signed else f"{abs(v):.2g}"
    return s + "%"


def _p(p: float) -> str:
    if math.isnan(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _size(diff: float, mean_ref: float) -> str:
    if mean_ref != 0 and np.isfinite(mean_ref):
        return _pct(diff / abs(mean_ref))
    return f"{diff:+.3g}"


def summary_sentence(verdicts_df: pd.DataFrame, metric: str) -> str:
    """One plain-language line for one metric of a :func:`compare` / :func:`verdict_table` frame.

    e.g. "cpu-4t and cuda-cudnn are equivalent to cpu-1t within ±0.3% of final_eval_loss;
    cuda-tf32 differs: +1.2%, p = 0.003 (paired t, n = 10, Holm-adjusted)".
    Percentages are relative to the reference mean; p is the Holm-adjusted p of the verdict.
    """
    rows = verdicts_df[verdicts_df["metric"] == metric]
    if rows.empty:
        return f"no comparisons for {metric}"
    ref = rows["reference"].iloc[0]
    parts = []
    eq = rows[rows["verdict"] == "equivalent"]
    if not eq.empty:
        r0 = eq.iloc[0]
        if r0["mean_ref"] != 0 and np.isfinite(r0["mean_ref"]):
            width = "±" + _pct(r0["margin"] / abs(r0["mean_ref"]), signed=False)
        else:
            width = f"±{r0['margin']:.3g}"
        verb = "is" if len(eq) == 1 else "are"
        parts.append(f"{_join(list(eq['config']))} {verb} equivalent to {ref} within {width} "
                     f"of {metric}")
    for _, r in rows[rows["verdict"] != "equivalent"].iterrows():
        how = f"{r['test']}, n = {r['n']}" if r["paired"] else \
            f"{r['test']}, n = {r['n_cfg']} vs {r['n_ref']}"
        size = _size(r["diff"], r["mean_ref"])
        if r["verdict"] == "differs":
            within = " (within margin)" if "within margin" in r["note"] else ""
            parts.append(f"{r['config']} differs{within}: {size}, {_p(r['p_holm'])} "
                         f"({how}, Holm-adjusted)")
        else:
            more = ""
            if not pd.isna(r["n_seeds_needed"]):
                more = f"; ~{r['n_seeds_needed']} seeds needed"
            parts.append(f"{r['config']} is inconclusive: {size}, {_p(r['p_holm'])} ({how}{more})")
    return "; ".join(parts)


# ==================================================================================================
# Verdicts with roles (issue #13): primary / secondary / check metrics, t intervals, identical
# configs and affine copies out of the family, an explicit rule for zero-variance differences.
#
# The numeric core works on arrays of paired differences of shape (..., n), so that the calibration
# benchmark runs exactly this code on thousands of simulated studies at once.

VERDICT_COLUMNS = [
    "config", "machine", "metric", "role", "n", "diff", "ci95_low", "ci95_high", "ci90_low",
    "ci90_high", "p", "p_adj", "tost_p_adj", "margin", "margin_pct", "margin_source", "verdict",
    "note",
    # extra columns (after the documented ones): what planning and the report need
    "reference", "mean_ref", "sd_diff", "tost_p", "p_signflip", "in_family",
]
# A metric whose finite values over all runs spread by at most this (relative to its largest
# magnitude) is "the same on every run": data-only metrics computed in another summation order
# differ in the last bits (paper-prednet's baseline_mse spreads by 7e-18), trained metrics by 1e-3+.
CHECK_RTOL = 1e-6
# B is an exact affine copy of A when B - (a + k A) is at most this times the range of B on every run.
AFFINE_RTOL = 1e-9
# Paired differences whose spread is at most this times the magnitude of the values compared are
# "the same in every seed" (float64 rounding of x - y; 64 ulps).
ZERO_VAR_RTOL = 64 * float(np.finfo(float).eps)


def signflip_min_p(n) -> np.ndarray | float:
    """Smallest two-sided p a sign-flip (or Wilcoxon signed-rank) test can reach with n pairs: 2/2^n."""
    return 2.0 ** (1 - np.asarray(n, dtype=float)) if np.ndim(n) else 2.0 ** (1 - float(n))


def paired_core(d, margin=math.nan, scale=None) -> dict[str, np.ndarray]:
    """Paired-difference statistics on the last axis of ``d`` (finite, shape (..., n), n >= 2).

    Returns arrays (shape ``d.shape[:-1]``): ``n, diff, sd, se, df, t, p, ci95_low, ci95_high,
    ci90_low, ci90_high, p_low, p_high, tost_p, zero_var``.

    * ``p``: two-sided paired t (Student 1908), df = n - 1: ``scipy.stats.ttest_rel(x, y).pvalue``.
    * ``ci95_*``, ``ci90_*``: mean +- t_{1-a/2, n-1} * sd / sqrt(n), the intervals of
      ``ttest_rel(x, y).confidence_interval(0.95 / 0.90)``; the 90% interval is the one TOST uses.
    * ``tost_p``: max of the two one-sided t tests of H0: diff <= -margin and H0: diff >= +margin
      (Schuirmann 1987): ``statsmodels.stats.weightstats.ttost_paired(x, y, -margin, margin)[0]``.

    **Zero variance** (all n differences equal, ``zero_var``; "equal" allows rounding: their spread is
    at most ZERO_VAR_RTOL x ``scale``, the largest magnitude of the compared values, default
    max|d|. A shift added in float arithmetic to values of another size is not bitwise constant,
    and its t statistic would be 1e14 instead of inf): the t statistic is x/0 and would give
    p = 0 at any n, even 2. There is then no estimate of the noise, and the p-values come from the
    exact sign-flip test instead (H0: config and reference exchangeable within a seed; all n
    differences have one sign, the most extreme outcome): two-sided p = 2/2^n for a non-zero
    difference (1 when all are 0), one-sided p = 1/2^n for each TOST side the data lie inside
    (1 otherwise). The intervals are the inverted sign-flip test: the single point {diff} when the
    test can reject every other value (2/2^n < 0.05, n >= 6, for the 95% interval; 1/2^n < 0.05,
    n >= 5, for the 90% one), else (-inf, +inf). So p, the CIs and TOST always agree.
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    if n < 2:
        raise ValueError("paired_core needs at least 2 differences")
    exact, zero_var = _zero_var_masks(d, scale)
    # the mean of n copies of one float can be off by an ulp: use the value itself
    mean = np.where(exact, d[..., 0], d.mean(axis=-1))
    var = np.where(zero_var, 0.0, d.var(axis=-1, ddof=1))
    df = float(n - 1)
    se = np.sqrt(var / n)
    margin = np.abs(np.asarray(margin, dtype=float))
    res = _t_tests(mean, se, df, margin)
    if np.any(zero_var):
        res = _signflip_tests(res, zero_var, mean, n, margin)
    tost_p = np.maximum(res["p_low"], res["p_high"])
    shape = mean.shape
    return {
        "n": np.full(shape, n), "diff": mean, "sd": np.sqrt(var), "se": se, "df": np.full(shape, df),
        **res, "p": np.minimum(res["p"], 1.0),
        "tost_p": np.where(np.isnan(margin), np.nan, tost_p), "zero_var": zero_var,
    }


def _zero_var_masks(d: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """(exact, zero_var) on the last axis of ``d``: the differences are bitwise equal; they are equal
    up to ZERO_VAR_RTOL x ``scale`` (default max|d|). See :func:`paired_core`."""
    exact = np.all(d == d[..., :1], axis=-1)
    if scale is None:
        scale = np.abs(d).max(axis=-1)
    return exact, exact | (np.ptp(d, axis=-1) <= ZERO_VAR_RTOL * np.asarray(scale, dtype=float))


def _t_tests(mean, se, df: float, margin) -> dict[str, np.ndarray]:
    """Paired t results from the mean difference and its se: ``t, p`` (two-sided, not yet capped at
    1), the 95% and 90% t intervals, and the TOST sides ``p_low, p_high`` at +-margin."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / se
        q95, q90 = stats.t.isf(0.025, df), stats.t.isf(0.05, df)
        return {
            "t": t, "p": 2.0 * stats.t.sf(np.abs(t), df),
            "ci95_low": mean - q95 * se, "ci95_high": mean + q95 * se,
            "ci90_low": mean - q90 * se, "ci90_high": mean + q90 * se,
            "p_low": stats.t.sf((mean + margin) / se, df),
            "p_high": stats.t.cdf((mean - margin) / se, df),
        }


def _signflip_tests(res: dict, zero_var, mean, n: int, margin) -> dict[str, np.ndarray]:
    """``res`` (from :func:`_t_tests`) with its zero-variance entries replaced by the exact sign-flip
    test and its inverted intervals (the rule in :func:`paired_core`)."""
    two, one = 2.0 ** (1 - n), 2.0 ** (-n)
    w95 = np.where(two < 0.05, 0.0, np.inf)
    w90 = np.where(one < 0.05, 0.0, np.inf)
    exact = {
        "t": np.where(mean == 0, 0.0, np.copysign(np.inf, mean)),
        "p": np.where(mean == 0, 1.0, two),
        "ci95_low": mean - w95, "ci95_high": mean + w95,
        "ci90_low": mean - w90, "ci90_high": mean + w90,
        "p_low": np.where(mean > -margin, one, 1.0),
        "p_high": np.where(mean < margin, one, 1.0),
    }
    return {k: np.where(zero_var, exact[k], v) for k, v in res.items()}


def t_interval(x, y=None, confidence: float = 0.95) -> tuple[float, float]:
    """t-based CI of mean(x - y) (paired) or of mean(x) when ``y is None``; deterministic.

    Same as ``scipy.stats.ttest_rel(x, y).confidence_interval(confidence)`` (and
    ``scipy.stats.ttest_1samp(x, 0)`` for one sample) when the differences vary; with zero variance
    see :func:`paired_core` (the point, or (-inf, inf) when n is too small for that confidence).
    """
    x = _arr(x, "x")
    d = x if y is None else x - _arr(y, "y")
    if d.size < 2:
        return math.nan, math.nan
    a = 1 - confidence
    mean, var = _mean(d), _var(d)
    if var == 0:
        ok = 2.0 ** (1 - d.size) < a
        return (mean, mean) if ok else (-math.inf, math.inf)
    half = float(stats.t.isf(a / 2, d.size - 1)) * math.sqrt(var / d.size)
    return mean - half, mean + half


def holm_rows(p) -> np.ndarray:
    """Holm (1979) adjusted p along the last axis of a NaN-free array (one family per row)."""
    p = np.asarray(p, dtype=float)
    m = p.shape[-1]
    if m == 0:
        return p.copy()
    order = np.argsort(p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, axis=-1)
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps, axis=-1))
    out = np.empty_like(adj)
    np.put_along_axis(out, order, adj, axis=-1)
    return out


def decide_rows(p_adj, tost_p_adj, alpha: float = 0.05) -> np.ndarray:
    """The verdict rule: differs if p_adj < alpha, else equivalent if tost_p_adj < alpha, else
    inconclusive (arrays in, array of strings out)."""
    p_adj, tost_p_adj = np.asarray(p_adj), np.asarray(tost_p_adj)
    return np.where(p_adj < alpha, "differs",
                    np.where(tost_p_adj < alpha, "equivalent", "inconclusive"))


_NOT_METRICS = {"run_id", "config", "seed", "repeat", "state", "machine", "init_seed", "data_seed",
                "step", "cell_key", "init_sha256", "final_sha256", "workload", "study_id"}


def _fmt_num(x: float) -> str:
    return f"{x:+.3g}"


def _affine_fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """(k, c) when b == k a + c on every element within AFFINE_RTOL of b's range, else None."""
    if a.size < 3 or np.unique(a).size < 3:
        return None
    span_b = float(b.max() - b.min())
    if span_b == 0:
        return None
    A = np.column_stack([a, np.ones_like(a)])
    (k, c), *_ = np.linalg.lstsq(A, b, rcond=None)
    if k == 0 or np.max(np.abs(b - (k * a + c))) > AFFINE_RTOL * span_b:
        return None
    if abs(c) <= AFFINE_RTOL * float(np.abs(b).max()):
        c = 0.0  # rounding noise of the fit (the fit depends on the order of the rows in its last bits)
    return float(k), float(c)


def metric_roles(finals: pd.DataFrame, metrics: Sequence[str], primary: Sequence[str],
                 checks: Sequence[str] = ()) -> dict[str, str]:
    """{metric: "primary" | "secondary" | "check"}.

    Primary: listed in ``primary``. Check: listed in ``checks``, or (not primary) a metric whose
    finite values are the same on every run of every config and seed, within CHECK_RTOL (a data-only
    quantity, like the copy-last baseline; needs finite runs of at least 2 seeds). Secondary: the
    rest. A check row's verdict is "same on every run: yes" when the config's finite values equal
    the reference's in every seed within CHECK_RTOL (relative), else "... no".
    """
    roles = {}
    for m in metrics:
        if m in primary:
            roles[m] = "primary"
            continue
        if m in checks:
            roles[m] = "check"
            continue
        v = finals[m].to_numpy(dtype=float)
        ok = np.isfinite(v)
        same = False
        if ok.any() and finals.loc[ok, "seed"].nunique() >= 2:  # diverged runs do not count
            v = v[ok]
            same = float(v.max() - v.min()) <= CHECK_RTOL * float(np.abs(v).max())
        roles[m] = "check" if same else "secondary"
    return roles


def affine_copies(finals: pd.DataFrame, metrics: Sequence[str]) -> dict[str, tuple[str, float, float]]:
    """{copy: (kept_metric, k, c)} for metrics that are exact affine copies (copy = k kept + c on every
    run where both are finite) of an earlier metric in ``metrics``; the first of a group is kept."""
    out: dict[str, tuple[str, float, float]] = {}
    kept: list[str] = []
    for b in metrics:
        vb = finals[b].to_numpy(dtype=float)
        for a in kept:
            va = finals[a].to_numpy(dtype=float)
            ok = np.isfinite(va) & np.isfinite(vb)
            if not np.array_equal(ok, np.isfinite(vb)) or not np.array_equal(ok, np.isfinite(va)):
                continue  # not the same runs diverged: not a copy
            fit = _affine_fit(va[ok], vb[ok])
            if fit is not None:
                out[b] = (a, *fit)
                break
        else:
            kept.append(b)
    return out


def _machine_of(first: pd.DataFrame, cfg: str):
    if "machine" not in first.columns:
        return None
    ms = [str(m) for m in pd.unique(first.loc[first["config"] == cfg, "machine"]) if pd.notna(m)]
    return ",".join(ms) if ms else None


def verdicts(finals: pd.DataFrame, primary: Sequence[str] | str, reference: str, *,
             metrics: Sequence[str] | None = None, checks: Sequence[str] = (), margin=None,
             margin_fraction: float = 0.5, alpha: float = 0.05, robust: bool = True) -> pd.DataFrame:
    """Verdict of every config against ``reference`` on every metric, paired by seed.

    ``finals``: the per-run frame (config, seed, repeat, [machine], one float column per metric);
    first runs (``repeat == 0``) are used. ``primary``: the metric(s) of the confirmatory question.
    ``metrics``: all metrics to report (default: every numeric non-key column, primary first).
    ``checks``: metrics to treat as checks even if they vary. ``margin``: equivalence half-width, a
    number or {metric: number} (``margin_source`` "fixed"); else ``margin_fraction`` x the sd of the
    reference across seeds ("seed-sd").

    Roles and families (see :func:`metric_roles`): the confirmatory family is every testable
    (config, primary metric); the secondary metrics form a second, exploratory family. Holm (1979)
    adjusts the difference p and, separately, the TOST p within each family. Left out of the
    families: check metrics (verdict "same on every run: yes/no", never tested); configs bitwise
    identical to the reference on a metric in every seed (verdict "identical"); exact affine copies
    of another metric (:func:`affine_copies`; same test, the kept metric's adjusted p and verdict are
    copied, said in ``note``); rows with fewer than 2 paired seeds (inconclusive).

    Statistics (:func:`paired_core`): paired t p, t-based 95% and 90% CIs of the mean difference
    (config - reference), paired TOST at +-margin; an explicit rule for zero-variance differences.
    Verdict: differs if p_adj < alpha, else equivalent if tost_p_adj < alpha, else inconclusive.
    ``robust``: also the exact sign-flip p (``p_signflip``; Monte Carlo with a fixed seed above 16
    pairs) and a note on ``differs`` rows when it disagrees or cannot reach alpha at this n.

    Columns: VERDICT_COLUMNS (``config, machine, metric, role, n, diff, ci95_low, ci95_high,
    ci90_low, ci90_high, p, p_adj, tost_p_adj, margin, margin_pct, margin_source, verdict, note``,
    then ``reference, mean_ref, sd_diff, tost_p, p_signflip, in_family``).
    """
    primary, metrics = _verdict_metrics(finals, primary, metrics)
    first = _first_runs(finals, metrics[0]) if metrics else finals
    _require_reference(set(first["config"]), reference)
    configs = [c for c in _configs(first) if c != reference]
    roles = metric_roles(first, metrics, primary, checks)
    copies = affine_copies(first, [m for m in metrics if roles[m] != "check"])

    rows: list[dict] = []
    for metric in metrics:
        rows.extend(_metric_verdict_rows(first, metric, roles[metric], configs, reference, margin=margin,
                                         margin_fraction=margin_fraction, in_family=metric not in copies,
                                         robust=robust))
    _holm_families(rows, alpha)
    _copy_affine_verdicts(rows, copies, alpha)
    for r in rows:
        _finish_verdict_row(r, alpha, robust)
    out = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    out["n"] = out["n"].astype(int)
    out["in_family"] = out["in_family"].astype(bool)
    return out


def _verdict_metrics(finals: pd.DataFrame, primary: Sequence[str] | str,
                     metrics: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(primary, metrics) as lists: metrics defaults to every numeric non-key column, primary first,
    no duplicates; each must be a column of ``finals``."""
    if isinstance(primary, str):
        primary = [primary]
    primary = list(primary)
    if metrics is None:
        metrics = [c for c in finals.columns if c not in _NOT_METRICS
                   and pd.api.types.is_numeric_dtype(finals[c])]
    metrics = list(dict.fromkeys([*primary, *metrics]))  # primary first, no duplicates
    for m in metrics:
        _check(finals, m)
    return primary, metrics


def _verdict_margin(margin, metric: str, ref_ok: np.ndarray, margin_fraction: float) -> tuple[float, str]:
    """(margin, margin_source) of one metric: the given one ("fixed"), else from the seed sd."""
    m_fixed = _margin_for(margin, metric)
    if m_fixed is not None:
        return abs(float(m_fixed)), "fixed"
    return _default_margin(ref_ok, margin_fraction), "seed-sd"


def _metric_verdict_rows(first: pd.DataFrame, metric: str, role: str, configs: list[str], reference: str, *,
                         margin, margin_fraction: float, in_family: bool, robust: bool) -> list[dict]:
    """The rows of :func:`verdicts` for one metric, one per config, before Holm; notes in ``_notes``."""
    by = {c: _seed_series(g, metric) for c, g in first.groupby("config", sort=False)}
    ref = by[reference]
    ref_ok = ref[np.isfinite(ref.to_numpy())]
    mean_ref = _mean(ref_ok.to_numpy())
    marg, source = _verdict_margin(margin, metric, ref_ok.to_numpy(), margin_fraction)
    marg_pct = 100 * _ratio(marg, abs(mean_ref)) if not math.isnan(marg) else math.nan
    rows = []
    for cfg in configs:
        r = {k: math.nan for k in VERDICT_COLUMNS}
        r.update(config=cfg, machine=_machine_of(first, cfg), metric=metric, role=role,
                 reference=reference, mean_ref=mean_ref, margin=marg, margin_pct=marg_pct,
                 margin_source=source, in_family=False, verdict="", note="")
        _fill_verdict_row(r, by[cfg], ref, ref_ok, in_family=in_family, robust=robust)
        rows.append(r)
    return rows


def _fill_verdict_row(r: dict, s: pd.Series, ref: pd.Series, ref_ok: pd.Series, *, in_family: bool,
                      robust: bool) -> None:
    """Fill one (config, metric) row in place from the config's values ``s`` and the reference's
    (``ref``, its finite part ``ref_ok``, all indexed by seed): n, diff, and either the paired test
    or why there is none. Its notes go to ``r["_notes"]``."""
    shared = ref_ok.index.intersection(s[np.isfinite(s.to_numpy())].index)
    x, y = s.loc[shared].to_numpy(), ref_ok.loc[shared].to_numpy()
    d = x - y
    r["n"] = int(d.size)
    notes = _pairing_notes(s, ref, ref_ok, shared)
    if d.size:
        r["diff"] = _mean(d)
    if r["role"] == "check":
        notes.extend(_check_verdict(r, s, ref, x, y, d))
    elif (d.size >= 1 and s.index.equals(ref.index)
          and np.array_equal(s.to_numpy(), ref.to_numpy(), equal_nan=True)):
        r.update(diff=0.0, ci95_low=0.0, ci95_high=0.0, ci90_low=0.0, ci90_high=0.0,
                 sd_diff=0.0, verdict="identical")
        notes.append(f"bitwise identical to {r['reference']} {seeds_phrase(d.size)}: not tested, "
                     "left out of the family")
    elif d.size < 2:
        r["verdict"] = "inconclusive"
        notes.append("fewer than 2 paired seeds: not tested")
    else:
        notes.extend(_paired_test(r, d, x, y, in_family=in_family, robust=robust))
    r["_notes"] = notes


def _pairing_notes(s: pd.Series, ref: pd.Series, ref_ok: pd.Series, shared) -> list[str]:
    """Notes on the runs a row leaves out: diverged ones, and config runs with no reference partner."""
    n_nan_cfg = int((~np.isfinite(s.to_numpy())).sum())
    n_nan_ref = int(ref.size - ref_ok.size)
    notes = []
    if n_nan_cfg + n_nan_ref:
        notes.append(f"{n_nan_cfg} config and {n_nan_ref} reference run(s) diverged (non-finite), left out")
    unpaired = (len(s) - len(shared)) - n_nan_cfg
    if unpaired > 0:
        notes.append(f"{unpaired} run(s) without a same-seed reference run left out")
    return notes


def _check_verdict(r: dict, s: pd.Series, ref: pd.Series, x: np.ndarray, y: np.ndarray,
                   d: np.ndarray) -> list[str]:
    """A check metric's verdict (into ``r``): the same value as the reference's in every seed (finite
    runs), up to rounding. Returns its notes."""
    same = bool(d.size and s.index.equals(ref.index)
                and np.all(np.abs(d) <= CHECK_RTOL * np.maximum(np.abs(x), np.abs(y))))
    notes = []
    if same and not np.array_equal(x, y):
        notes.append("equal up to rounding (relative difference <= 1e-6)")
    r["verdict"] = "same on every run: " + ("yes" if same else "no")
    notes.append("check (data-only or constant metric): not tested")
    return notes


def _paired_test(r: dict, d: np.ndarray, x: np.ndarray, y: np.ndarray, *, in_family: bool,
                 robust: bool) -> list[str]:
    """The paired test of a row with at least 2 paired seeds (into ``r``). Returns its notes."""
    core = paired_core(d, r["margin"], scale=max(np.abs(x).max(), np.abs(y).max()))
    for k in ("ci95_low", "ci95_high", "ci90_low", "ci90_high", "p", "tost_p"):
        r[k] = float(core[k])
    r["diff"] = float(core["diff"])
    r["sd_diff"] = float(core["sd"])
    r["in_family"] = in_family
    notes = []
    if bool(core["zero_var"]):
        notes.append(f"{_fmt_num(r['diff'])} in every seed (sd of differences 0: p from "
                     f"the exact sign-flip test, 2/2^n = {2.0 ** (1 - d.size):.3g})")
    if robust:
        r["p_signflip"] = _signflip_p(d, np.random.default_rng(0))
    return notes


def _holm_families(rows: list[dict], alpha: float) -> None:
    """Holm within each family (primary, secondary), for the difference p and the TOST p separately;
    sets p_adj, tost_p_adj and the verdict of the rows in a family."""
    for role in ("primary", "secondary"):
        fam = [r for r in rows if r["role"] == role and r["in_family"]]
        if fam:
            p_adj = holm_rows(np.array([r["p"] for r in fam]))
            t_adj = holm_rows(np.array([r["tost_p"] for r in fam]))
            t_adj = np.where(np.isnan([r["tost_p"] for r in fam]), np.nan, t_adj)
            for r, pa, ta in zip(fam, p_adj, t_adj):
                r["p_adj"], r["tost_p_adj"] = float(pa), float(ta)
                r["verdict"] = str(decide_rows(pa, ta, alpha))
                r["_notes"].append(f"{'confirmatory' if role == 'primary' else 'exploratory'}: "
                                   f"Holm over {len(fam)} comparisons")


def _copy_affine_verdicts(rows: list[dict], copies: dict[str, tuple[str, float, float]], alpha: float) -> None:
    """Affine copies: the same test as the kept metric (t is invariant under y = k x + c), so its
    adjusted p and verdict where the margins are proportional, else the unadjusted p's verdict."""
    index = {(r["config"], r["metric"]): r for r in rows}
    for r in rows:
        if r["metric"] in copies and r["verdict"] == "" and not math.isnan(r["p"]):
            kept, k, c = copies[r["metric"]]
            src = index[(r["config"], kept)]
            consistent = (r["margin_source"] == src["margin_source"] == "seed-sd"
                          or math.isclose(r["margin"], abs(k) * src["margin"], rel_tol=1e-6))
            r["_notes"].append(f"exact affine copy of {kept} ({r['metric']} = {k:.6g} x {kept} "
                               f"{'+' if c >= 0 else '-'} {abs(c):.3g}): same test, not counted in "
                               "the family")
            if consistent and src["verdict"] not in ("", "identical"):
                r["p_adj"], r["tost_p_adj"], r["verdict"] = src["p_adj"], src["tost_p_adj"], src["verdict"]
                r["_notes"].append(f"adjusted p and verdict are {kept}'s")
            else:
                r["verdict"] = str(decide_rows(r["p"], r["tost_p"], alpha))
                r["_notes"].append("margin not proportional to the kept metric's: unadjusted p")


def _finish_verdict_row(r: dict, alpha: float, robust: bool) -> None:
    """Last touches in place: no verdict yet means inconclusive; notes on ``differs`` rows; ``_notes``
    joined into ``note``."""
    notes = r.pop("_notes")
    if r["verdict"] == "":
        r["verdict"] = "inconclusive"
    if r["verdict"] == "differs":
        notes.extend(_margin_notes(r["tost_p_adj"], r["diff"], r["margin"], alpha))
        if robust and r["n"] >= 2:
            if signflip_min_p(r["n"]) >= alpha:
                notes.append(f"n = {r['n']} too few for a sign-flip or rank test to reach "
                             f"p < {alpha:g} (smallest possible p {signflip_min_p(r['n']):.3g})")
            elif r["p_signflip"] >= alpha:
                notes.append(f"sign-flip test not significant (p = {r['p_signflip']:.2g})")
    r["note"] = "; ".join(notes)
