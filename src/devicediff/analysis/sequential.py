"""Seeds until decided: a group-sequential design for the paired verdict.

The runner adds seeds in batches and looks at the paired differences (config - reference) after each
batch. Re-testing at every look with the fixed-n tests would inflate both error rates (five looks at
alpha = 0.05 give a false "differs" rate of about 14%; Armitage, McPherson & Rowe 1969). Instead
the level is spent over the looks with the Lan & DeMets (1983) alpha-spending function of
O'Brien-Fleming type,

    alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)),   t = n_look / max_seeds (information fraction),

which spends almost nothing at the early looks (so the last look is nearly at the full alpha) and
needs no fixed number of looks in advance. Two procedures share the looks:

* **difference** (two-sided): boundaries c_k on |Z_k| with P_H0(cross at look k, not before) =
  a(t_k) - a(t_{k-1}), each tail spending alpha/2 (a(t) = 2 x the function above at alpha/2);
* **equivalence** (TOST): each one-sided test (H0: diff <= -margin, H0: diff >= +margin) has its own
  one-sided boundaries from the same spending function at level alpha; equivalence is declared at a
  look when both reject there (intersection-union, Berger 1982).

The boundaries are computed for the canonical joint distribution of the Z statistics (independent
increments, corr(Z_j, Z_k) = sqrt(t_j / t_k)) by the numerical recursion of Armitage, McPherson &
Rowe (1969) as set out in Jennison & Turnbull (2000, ch. 19), and turned into nominal p-value levels
(p_two_k = 2 (1 - Phi(c_k)), p_one_k = 1 - Phi(c_k)). Applying those levels to the t tests of
:func:`devicediff.analysis.stats.paired_core` with n_k - 1 df (the "significance level approach",
Jennison & Turnbull 2000, sec. 3.8; ``calibrate="normal"``) is slightly anti-conservative when many
looks have few df (false differs 0.054 for looks at 3, 4, ..., 10 seeds). So by default
(``calibrate="t"``) the nominal levels are fitted to the t statistics themselves: under H0 the
sequence of paired t statistics over nested samples (and, at a true shift of exactly +-margin, that
of each TOST side) has a distribution free of every parameter, so the levels that make the
probability of a first crossing at look k equal to the spending increment are found once by
simulating that sequence (``n_sim`` paths from a fixed seed; deterministic, cached). Early looks
where the spending is below what the simulation resolves keep the smaller normal-theory level.
``benchmarks/calibration.py`` checks both error rates on fresh simulations.

Stopping for one verdict never raises the error rate of the other (stopping early can only remove
later crossings), so P(false differs) <= alpha at a true shift of 0 and P(false equivalent) <= alpha
at a true shift of +-margin. The margin must be fixed before the first look (a number, or the
seed-sd margin computed once from the first look's reference runs and then frozen). For m
comparisons (configs x primary metrics) give ``n_tests = m``: each comparison is run at alpha / m
(Bonferroni; Holm-type recycling across group-sequential tests, Maurer & Bretz 2013, is not done).

    design = SequentialDesign(max_seeds=30, batch=3, alpha=0.05)
    for k, n in enumerate(design.looks):
        ... run seeds until n paired differences d exist ...
        verdict = decide(k, d, margin, design)   # "differs" | "equivalent" | "continue" | "inconclusive"
        if verdict != "continue":
            break
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from devicediff.analysis.stats import paired_core

__all__ = ["SequentialDesign", "decide", "assess", "spending", "gs_boundaries"]

_GRID = 801          # grid points of the recursion (Simpson), per look
_Z_MAX = 40.0        # a boundary this high never rejects (used when nothing is left to spend)


def spending(t, alpha: float, kind: str = "obrien-fleming"):
    """Cumulative alpha spent at information fraction t (0 < t <= 1).

    ``obrien-fleming``: 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) (Lan & DeMets 1983);
    ``pocock``: alpha log(1 + (e - 1) t) (Lan & DeMets 1983). Both equal alpha at t = 1.
    """
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if kind == "obrien-fleming":
        with np.errstate(divide="ignore"):
            out = 2 - 2 * stats.norm.cdf(stats.norm.isf(alpha / 2) / np.sqrt(t))
        return np.where(t > 0, out, 0.0)
    if kind == "pocock":
        return alpha * np.log1p((math.e - 1) * t)
    raise ValueError(f"unknown spending function {kind!r}")


def _simpson_weights(g: int, h: float) -> np.ndarray:
    w = np.ones(g)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * h / 3


def gs_boundaries(info, alpha: float, sides: int = 2, kind: str = "obrien-fleming") -> np.ndarray:
    """Z boundaries c_1..c_K for looks at information fractions ``info`` (increasing, last = 1).

    sides = 2: reject when |Z_k| >= c_k, P_H0(first crossing at k) = a(t_k) - a(t_{k-1}) with
    a(t) = 2 alpha_{alpha/2}(t), each tail spending alpha/2.
    sides = 1: reject when Z_k >= c_k, same spending at one-sided level alpha.
    Recursion on the score S_k = Z_k sqrt(t_k) (independent N(0, t_k - t_{k-1}) increments), density
    carried on a Simpson grid over the continuation region (Jennison & Turnbull 2000, ch. 19).
    """
    info = np.asarray(info, dtype=float)
    if np.any(np.diff(info) <= 0) or info[0] <= 0:
        raise ValueError("information fractions must be positive and increasing")
    # two-sided: each tail spends alpha/2 with the one-sided function at alpha/2 (the symmetric
    # two-sided design of Jennison & Turnbull 2000, ch. 2; gives the published 4.877, 3.357, 2.680,
    # 2.290, 2.031 for five equal looks at alpha = 0.05)
    cum = 2 * spending(info, alpha / 2, kind) if sides == 2 else spending(info, alpha, kind)
    spend = np.diff(np.concatenate([[0.0], cum]))
    out = np.empty(info.size)
    # look 1: the plain normal quantile
    out[0] = _Z_MAX if spend[0] <= 1e-15 else (
        stats.norm.isf(spend[0] / 2) if sides == 2 else stats.norm.isf(spend[0]))
    out[0] = min(out[0], _Z_MAX)

    def grid(k, c):
        sd = math.sqrt(info[k])
        hi = c * sd
        lo = -hi if sides == 2 else -10 * sd
        s = np.linspace(lo, hi, _GRID)
        return s, _simpson_weights(_GRID, s[1] - s[0])

    s, w = grid(0, out[0])
    f = stats.norm.pdf(s, scale=math.sqrt(info[0]))
    for k in range(1, info.size):
        dv = math.sqrt(info[k] - info[k - 1])
        mass = w * f
        sk = math.sqrt(info[k])

        def cross(c):
            up = stats.norm.sf((c * sk - s) / dv)
            if sides == 2:
                up = up + stats.norm.cdf((-c * sk - s) / dv)
            return float(mass @ up)

        if spend[k] <= 1e-15 or cross(_Z_MAX) >= spend[k]:
            c = _Z_MAX
        else:
            c = optimize.brentq(lambda c: cross(c) - spend[k], 0.0, _Z_MAX, xtol=1e-10)
        out[k] = c
        s_new, w_new = grid(k, c)
        f = stats.norm.pdf((s_new[:, None] - s[None, :]) / dv) @ mass / dv
        s, w = s_new, w_new
    return out


@dataclass
class SequentialDesign:
    """Looks at ``first``, ``first + batch``, ... seeds, the last at ``max_seeds``.

    ``first`` defaults to max(batch, 3) (a t test needs at least 2 df to be of any use).
    ``alpha`` is the family level; each comparison runs at alpha / ``n_tests``.
    Derived: ``looks`` (seeds at each look), ``info`` (n / max_seeds), ``z_two`` / ``z_one``
    (boundaries), ``p_two`` / ``p_one`` (nominal two-sided level of the difference test and one-sided
    level of each TOST side at each look).
    """

    max_seeds: int
    batch: int
    alpha: float = 0.05
    n_tests: int = 1
    first: int | None = None
    kind: str = "obrien-fleming"
    calibrate: str = "t"
    n_sim: int = 400_000
    looks: list[int] = field(init=False)
    info: np.ndarray = field(init=False, repr=False)
    z_two: np.ndarray = field(init=False, repr=False)
    z_one: np.ndarray = field(init=False, repr=False)
    p_two: np.ndarray = field(init=False, repr=False)
    p_one: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if self.batch < 1 or self.max_seeds < 2:
            raise ValueError("need batch >= 1 and max_seeds >= 2")
        first = self.first if self.first is not None else max(self.batch, 3)
        first = min(max(first, 2), self.max_seeds)
        looks = list(range(first, self.max_seeds + 1, self.batch))
        if looks[-1] != self.max_seeds:
            looks.append(self.max_seeds)
        self.looks = looks
        self.info = np.asarray(looks, dtype=float) / self.max_seeds
        level = self.alpha / self.n_tests
        self.z_two = gs_boundaries(self.info, level, 2, self.kind)
        self.z_one = gs_boundaries(self.info, level, 1, self.kind)
        self.p_two = 2 * stats.norm.sf(self.z_two)
        self.p_one = stats.norm.sf(self.z_one)
        if self.calibrate == "t":
            two, one = _t_levels(tuple(looks), level, self.kind, self.n_sim)
            self.p_two = np.minimum(two, 1.0)
            self.p_one = np.minimum(one, 1.0)
        elif self.calibrate != "normal":
            raise ValueError("calibrate must be 't' or 'normal'")

    @property
    def n_looks(self) -> int:
        return len(self.looks)


@functools.lru_cache(maxsize=64)
def _t_levels(looks: tuple[int, ...], alpha: float, kind: str, n_sim: int,
              seed: int = 20240613) -> tuple[np.ndarray, np.ndarray]:
    """Nominal p levels (two-sided difference test, one-sided TOST side) per look, fitted by
    simulation to the paired t statistics on nested samples of N(0, 1) differences.

    At look k the level is the p-value below which exactly floor(S * a(t_k)) - (paths stopped
    before) of the S simulated paths still running cross (a = the cumulative spending); where that
    count is 0 the level is min(normal-theory level, smallest p among the running paths).
    """
    rng = np.random.default_rng(seed)
    info = np.asarray(looks, dtype=float) / looks[-1]
    cum2 = 2 * spending(info, alpha / 2, kind)
    cum1 = spending(info, alpha, kind)
    norm2 = 2 * stats.norm.sf(gs_boundaries(info, alpha, 2, kind))
    norm1 = stats.norm.sf(gs_boundaries(info, alpha, 1, kind))
    s1 = np.zeros(n_sim)
    s2 = np.zeros(n_sim)
    live2 = np.ones(n_sim, dtype=bool)
    live1 = np.ones(n_sim, dtype=bool)
    lev2, lev1 = np.empty(len(looks)), np.empty(len(looks))
    prev = 0
    for k, n in enumerate(looks):
        x = rng.standard_normal((n_sim, n - prev))
        s1 += x.sum(axis=1)
        s2 += (x * x).sum(axis=1)
        prev = n
        var = np.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1)
        t = (s1 / n) / np.sqrt(var / n)
        for live, cum, norm, lev, p in (
                (live2, cum2, norm2, lev2, 2 * stats.t.sf(np.abs(t), n - 1)),
                (live1, cum1, norm1, lev1, stats.t.sf(t, n - 1))):
            new = int(math.floor(cum[k] * n_sim)) - int((~live).sum())
            pl = np.sort(p[live])
            if new <= 0 or pl.size == 0:
                lev[k] = min(norm[k], pl[0] if pl.size else norm[k])
            else:
                lev[k] = pl[min(new, pl.size - 1)]
            live &= ~(p < lev[k])
    return lev2, lev1


def assess(look_index: int, paired_diffs, margin: float, design: SequentialDesign, *,
           scale: float | None = None) -> dict:
    """The decision at one look with its numbers: ``decision``, ``look`` (1-based), ``n_looks``,
    ``n``, ``diff``, ``p``, ``p_low``, ``p_high`` (TOST sides), ``level_two``, ``level_one``.

    ``paired_diffs``: the finite per-seed differences config - reference available at this look
    (planned ``design.looks[look_index]`` of them; if some runs diverged, the planned levels are used
    with the seeds there are). ``scale``: largest magnitude of the compared values, for the
    zero-variance rule of :func:`paired_core` (default max |d|).
    """
    k = int(look_index)
    if not 0 <= k < design.n_looks:
        raise IndexError(f"look_index {k} outside 0..{design.n_looks - 1}")
    d = np.asarray(paired_diffs, dtype=float).ravel()
    d = d[np.isfinite(d)]
    last = k == design.n_looks - 1
    out = {"look": k + 1, "n_looks": design.n_looks, "n": int(d.size), "diff": math.nan,
           "p": math.nan, "p_low": math.nan, "p_high": math.nan,
           "level_two": float(design.p_two[k]), "level_one": float(design.p_one[k])}
    if d.size >= 2:
        core = paired_core(d, margin, scale)
        out.update(diff=float(core["diff"]), p=float(core["p"]), p_low=float(core["p_low"]),
                   p_high=float(core["p_high"]))
    if out["p"] < out["level_two"]:
        decision = "differs"
    elif max(out["p_low"], out["p_high"]) < out["level_one"]:
        decision = "equivalent"
    else:
        decision = "inconclusive" if last else "continue"
    out["decision"] = decision
    return out


def decide(look_index: int, paired_diffs, margin: float, design: SequentialDesign, *,
           scale: float | None = None) -> str:
    """"differs", "equivalent", "continue" or (at the last look) "inconclusive"; see :func:`assess`."""
    return assess(look_index, paired_diffs, margin, design, scale=scale)["decision"]
