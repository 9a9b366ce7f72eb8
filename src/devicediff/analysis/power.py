"""Power and planning for the paired verdicts of :func:`devicediff.analysis.stats.verdicts`.

Two questions, one per decided verdict:

* ``equivalent``: the power of the paired TOST (Schuirmann 1987) at +-margin when the true shift is
  0 (or ``shift``), with sd of the paired differences ``sd_diff``. Computed exactly by integrating
  over the distribution of the sample sd: TOST rejects iff |mean| + t_{1-a, n-1} s / sqrt(n) < margin,
  so with mean ~ N(shift, sd^2 / n) and s^2 ~ sd^2 chi2_{n-1} / (n - 1) independent,

      power = E_s[ max(0, Phi((margin - shift - t s/sqrt(n)) / (sd/sqrt(n)))
                        - Phi((-margin - shift + t s/sqrt(n)) / (sd/sqrt(n)))) ]

  (the formula behind Owen's (1965) Q function; Phillips 1990 for TOST; Chow, Shao & Wang 2008,
  sec. 3.2).
* ``differs``: the power of the two-sided paired t test at the *observed* effect diff / sd_diff,
  from the noncentral t (as ``statsmodels.stats.power.TTestPower``).

Multiplicity: planning for a Holm family of m comparisons uses alpha / m (Holm's first, strictest
step, i.e. Bonferroni): enough seeds for every comparison of the family, a slight overestimate for
the others. Zero-variance differences follow the rule of :func:`stats.paired_core`: the exact
sign-flip test, which needs 2/2^n < alpha to call ``differs`` (n >= 6 at 0.05) and 1/2^n < alpha
to call ``equivalent`` (n >= 5).
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import integrate, stats

from devicediff.analysis import stats as dstats

__all__ = ["power_difference", "power_tost", "seeds_needed", "plan_table", "TARGET_POWER"]

TARGET_POWER = 0.8
MAX_SEEDS = 10_000


def power_difference(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t test with n pairs at true effect = shift / sd_diff.

    Equal to ``statsmodels.stats.power.TTestPower().power(effect, n, alpha)``. ``effect = inf``
    (sd_diff 0, shift != 0) follows the zero-variance rule: 1 if 2/2^n < alpha else 0.
    """
    es = abs(float(effect))
    if n < 2 or math.isnan(es):
        return math.nan
    if math.isinf(es):
        return 1.0 if 2.0 ** (1 - n) < alpha else 0.0
    p = float(dstats._power(es, n, alpha, True))
    if math.isnan(p):  # scipy's noncentral t loses its tail far out (large effect, small alpha): normal bound
        z = stats.norm.ppf(1 - alpha / 2)
        p = float(stats.norm.cdf(es * math.sqrt(n) - z) + stats.norm.cdf(-es * math.sqrt(n) - z))
    return p


def power_tost(n: int, margin: float, sd_diff: float, shift: float = 0.0,
               alpha: float = 0.05) -> float:
    """Power of the paired TOST at +-``margin`` (each one-sided test at ``alpha``) with n pairs,
    differences of sd ``sd_diff`` and true mean ``shift``. Exact (numerical integration over the
    sample sd); see the module docstring. ``sd_diff = 0``: 1 if |shift| < margin and 1/2^n < alpha.
    """
    margin, sd, shift = abs(float(margin)), float(sd_diff), float(shift)
    if n < 2 or any(math.isnan(v) for v in (margin, sd, shift)):
        return math.nan
    if sd == 0:
        return 1.0 if abs(shift) < margin and 2.0 ** (-n) < alpha else 0.0
    df = n - 1
    tq = float(stats.t.isf(alpha, df))
    se = sd / math.sqrt(n)
    # TOST can only pass when t s / sqrt(n) < margin, i.e. u = chi2 value < u_max
    u_max = df * (margin * math.sqrt(n) / (tq * sd)) ** 2

    def f(u):
        h = tq * sd * math.sqrt(u / df) / math.sqrt(n)
        inner = (stats.norm.cdf((margin - shift - h) / se) - stats.norm.cdf((-margin - shift + h) / se))
        return max(inner, 0.0) * stats.chi2.pdf(u, df)

    # integrate over the bulk of the chi2 law (outside it the mass is < 2e-14), split at its mode
    lo = float(stats.chi2.ppf(1e-14, df))
    hi = min(float(stats.chi2.isf(1e-14, df)), u_max)
    if hi <= lo:
        return 0.0
    mode = min(max(df - 2.0, lo), hi)
    pts = sorted({lo, mode, hi})
    total = 0.0
    for a, b in zip(pts[:-1], pts[1:]):
        if b > a:
            total += integrate.quad(f, a, b, limit=200, epsabs=1e-12, epsrel=1e-10)[0]
    return float(min(max(total, 0.0), 1.0))


def _smallest_n(pw, power: float, max_seeds: int) -> float:
    """Smallest n in [2, max_seeds] with pw(n) >= power, pw increasing in n; NaN if none."""
    if pw(max_seeds) < power:
        return math.nan
    lo, hi = 1, 2
    while pw(hi) < power:
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pw(mid) >= power:
            hi = mid
        else:
            lo = mid
    return float(hi)


def seeds_needed(goal: str, sd_diff: float, *, margin: float | None = None, diff: float = 0.0,
                 alpha: float = 0.05, power: float = TARGET_POWER,
                 max_seeds: int = MAX_SEEDS) -> float:
    """Seeds (pairs) for ``power`` of a decided verdict.

    ``goal="equivalent"``: TOST at +-``margin``, true shift ``diff`` (0 by default: "if the config
    really changes nothing"). ``goal="differs"``: two-sided paired t at the effect ``diff / sd_diff``
    (pass the observed difference). ``alpha``: per-comparison level (alpha / m for a family of m).
    NaN when the goal cannot be reached (shift 0 for differs, |shift| >= margin for equivalent) or
    needs more than ``max_seeds``. The old :func:`devicediff.analysis.stats.seeds_needed` (effect
    size in, two-sided t) is kept for existing callers.
    """
    sd = float(sd_diff)
    if math.isnan(sd):
        return math.nan
    if goal == "differs":
        if diff == 0 or math.isnan(diff):
            return math.nan
        if sd == 0:
            return float(max(2, math.floor(math.log2(2 / alpha)) + 1))  # smallest n: 2/2^n < alpha
        return _smallest_n(lambda n: power_difference(diff / sd, n, alpha), power, max_seeds)
    if goal == "equivalent":
        if margin is None or math.isnan(margin) or abs(diff) >= abs(margin):
            return math.nan
        if sd == 0:
            return float(max(2, math.floor(math.log2(1 / alpha)) + 1))  # 1/2^n < alpha
        return _smallest_n(lambda n: power_tost(n, margin, sd, diff, alpha), power, max_seeds)
    raise ValueError(f"goal must be 'differs' or 'equivalent', not {goal!r}")


PLAN_COLUMNS = [
    "config", "machine", "metric", "role", "n", "diff", "sd_diff", "margin", "verdict", "family_size",
    "level", "power_equivalent", "power_differs", "seeds_equivalent", "seeds_differs", "goal",
    "seeds_needed", "note",
]


def plan_table(verdicts: pd.DataFrame, *, alpha: float = 0.05, power: float = TARGET_POWER,
               roles=("primary",), max_seeds: int = MAX_SEEDS) -> pd.DataFrame:
    """How many seeds each config needs for a decided verdict, from a :func:`stats.verdicts` frame
    (a pilot study). One row per tested (config, metric) of the given roles.

    ``level`` = alpha / m, m = the size of the row's Holm family (``in_family`` rows of the role).
    ``power_equivalent``: TOST power at the current n and true shift 0, with the observed sd of the
    differences; ``power_differs``: difference-test power at the current n and the observed effect.
    ``seeds_equivalent`` / ``seeds_differs``: seeds for ``power`` under the same assumptions.
    ``goal``: the verdict aimed at: the current one when decided, else ``equivalent`` when the
    estimate lies inside the margin and ``differs`` otherwise; ``seeds_needed`` is for that goal.
    The sd and the effect are estimates from the pilot: with 3-5 seeds they are rough (the sd of 5
    differences has a relative standard error of about 35%), so treat the counts as a guide and use
    the sequential design (:mod:`devicediff.analysis.sequential`) to stop when decided.
    """
    rows = []
    v = verdicts[verdicts["role"].isin(list(roles))]
    sizes = {r: int(verdicts[(verdicts["role"] == r) & verdicts["in_family"]].shape[0]) for r in roles}
    for _, r in v.iterrows():
        m = max(sizes.get(r["role"], 1), 1)
        level = alpha / m
        out = {k: r.get(k) for k in ("config", "machine", "metric", "role", "n", "diff", "sd_diff",
                                     "margin", "verdict")}
        out.update(family_size=m, level=level, power_equivalent=math.nan, power_differs=math.nan,
                   seeds_equivalent=math.nan, seeds_differs=math.nan, goal="", seeds_needed=math.nan,
                   note="")
        if r["verdict"] == "identical":
            out["note"] = "bitwise identical: nothing to plan"
        elif r["verdict"].startswith("same on every run") or pd.isna(r["sd_diff"]):
            out["note"] = "not tested"
        else:
            n, sd, diff, marg = int(r["n"]), float(r["sd_diff"]), float(r["diff"]), float(r["margin"])
            out["power_equivalent"] = power_tost(n, marg, sd, 0.0, level)
            eff = math.inf if sd == 0 and diff != 0 else (diff / sd if sd else 0.0)
            out["power_differs"] = power_difference(eff, n, level) if diff != 0 else level
            out["seeds_equivalent"] = seeds_needed("equivalent", sd, margin=marg, alpha=level,
                                                   power=power, max_seeds=max_seeds)
            out["seeds_differs"] = seeds_needed("differs", sd, diff=diff, alpha=level, power=power,
                                                max_seeds=max_seeds)
            if r["verdict"] in ("differs", "equivalent"):
                goal = r["verdict"]
            else:
                goal = "equivalent" if abs(diff) < marg else "differs"
            out["goal"] = goal
            out["seeds_needed"] = out["seeds_equivalent" if goal == "equivalent" else "seeds_differs"]
            if math.isnan(out["seeds_needed"]):
                out["note"] = f"more than {max_seeds} seeds" if goal == "differs" or sd > 0 else ""
        rows.append(out)
    df = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    for c in ("seeds_equivalent", "seeds_differs", "seeds_needed"):
        df[c] = pd.array([pd.NA if pd.isna(x) else int(x) for x in df[c]], dtype="Int64")
    return df
