"""Tests for devicediff.analysis.power: TOST and difference-test power, seeds needed, plan_table."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss
from statsmodels.stats.power import TTestPower

from devicediff.analysis import power, stats


def tost_power_mc(n, margin, sd, shift, alpha=0.05, reps=200_000, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(shift, sd, (reps, n))
    m, se = d.mean(1), d.std(1, ddof=1) / math.sqrt(n)
    q = ss.t.isf(alpha, n - 1)
    return float(np.mean((m - q * se > -margin) & (m + q * se < margin)))


@pytest.mark.parametrize("n,margin,sd,shift", [(3, 1.0, 0.5, 0.0), (5, 0.5, 0.3, 0.1),
                                               (10, 0.5, 1.0, 0.0), (20, 0.3, 0.4, 0.05)])
def test_power_tost_matches_simulation(n, margin, sd, shift):
    exact = power.power_tost(n, margin, sd, shift)
    mc = tost_power_mc(n, margin, sd, shift)
    assert exact == pytest.approx(mc, abs=4 * math.sqrt(mc * (1 - mc) / 200_000) + 1e-4)


def test_power_tost_large_n_normal_limit():
    # for large n, s ~ sd: power -> Phi((M - |d|)/se - z) - Phi((-M - d)/se + z) with se = sd/sqrt(n)
    n, m, sd = 400, 0.15, 1.0
    se, z = sd / math.sqrt(n), ss.norm.isf(0.05)
    approx = ss.norm.cdf(m / se - z) - ss.norm.cdf(-m / se + z)
    assert power.power_tost(n, m, sd) == pytest.approx(approx, abs=5e-3)


def test_power_difference_matches_statsmodels():
    for es, n, alpha in [(0.5, 10, 0.05), (1.2, 4, 0.01), (0.1, 200, 0.05 / 48)]:
        # statsmodels.stats.power.TTestPower().power(effect_size, nobs, alpha)
        assert power.power_difference(es, n, alpha) == pytest.approx(
            TTestPower().power(es, n, alpha), rel=1e-9)
    assert power.power_difference(math.inf, 6) == 1.0   # zero variance: 2/2^6 < 0.05
    assert power.power_difference(math.inf, 5) == 0.0


def test_seeds_needed():
    # differs: smallest n with 80% power, = ceil(statsmodels TTestPower().solve_power(...))
    n_sm = TTestPower().solve_power(effect_size=0.5, alpha=0.05, power=0.8)
    assert power.seeds_needed("differs", 1.0, diff=0.5) == math.ceil(n_sm)
    # equivalent: the smallest n whose exact TOST power reaches 80%
    n = power.seeds_needed("equivalent", 1.0, margin=0.5)
    assert power.power_tost(int(n), 0.5, 1.0) >= 0.8 > power.power_tost(int(n) - 1, 0.5, 1.0)
    # stricter level (family of 48) -> more seeds
    assert power.seeds_needed("equivalent", 1.0, margin=0.5, alpha=0.05 / 48) > n
    # a shift of 12 margins needs few seeds to be called different (issue #13, item 4)
    assert power.seeds_needed("differs", 0.1, diff=1.2) <= 3
    # zero variance: the sign-flip rule
    assert power.seeds_needed("differs", 0.0, diff=0.1) == 6
    assert power.seeds_needed("equivalent", 0.0, margin=0.1) == 5
    assert math.isnan(power.seeds_needed("differs", 1.0, diff=0.0))
    assert math.isnan(power.seeds_needed("equivalent", 1.0, margin=0.5, diff=0.6))
    assert math.isnan(power.seeds_needed("equivalent", 1.0, margin=1e-3, max_seeds=100))
    with pytest.raises(ValueError):
        power.seeds_needed("bigger", 1.0)


def test_plan_table():
    rng = np.random.default_rng(2)
    n = 4
    seed_eff = rng.normal(0, 1, n)
    rows = []
    ref = 10 + seed_eff + rng.normal(0, 0.1, n)
    for cfg, vals in [("ref", ref), ("near", 10 + seed_eff + rng.normal(0, 0.3, n)),
                      ("far", 12 + seed_eff + rng.normal(0, 0.1, n)), ("copy", ref.copy())]:
        for s, v in enumerate(vals):
            rows.append({"config": cfg, "seed": s, "repeat": 0, "loss": float(v)})
    v = stats.verdicts(pd.DataFrame(rows), ["loss"], "ref")
    plan = power.plan_table(v)
    assert list(plan.columns) == power.PLAN_COLUMNS
    p = plan.set_index("config")
    assert p.loc["copy", "note"].startswith("bitwise identical") and pd.isna(p.loc["copy", "seeds_needed"])
    assert (p.loc[["near", "far"], "family_size"] == 2).all()
    assert p.loc["far", "goal"] == "differs"
    assert p.loc["far", "seeds_needed"] <= 4
    assert p.loc["near", "goal"] == "equivalent"
    vr = v.set_index("config").loc["near"]
    assert p.loc["near", "seeds_needed"] == power.seeds_needed(
        "equivalent", vr["sd_diff"], margin=vr["margin"], alpha=0.05 / 2)
    assert p.loc["near", "power_equivalent"] == pytest.approx(
        power.power_tost(n, vr["margin"], vr["sd_diff"], 0.0, 0.025))


def test_power_of_a_large_effect_at_a_small_alpha_is_not_nan():
    """scipy's noncentral t returns NaN far in its tail; a clear difference then has power ~1."""
    from devicediff.analysis.power import power_difference

    for effect in (5.0, 18.3):
        assert power_difference(effect, 5, 0.05 / 3) > 0.99
