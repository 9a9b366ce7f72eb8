"""Tests for devicediff.analysis.sequential: spending, boundaries, decisions, error rates."""

import math

import numpy as np
import pytest

from devicediff.analysis import sequential as sq


def test_spending_functions():
    t = np.array([0.2, 0.5, 1.0])
    a = sq.spending(t, 0.05)
    assert a[-1] == pytest.approx(0.05, rel=1e-12) and np.all(np.diff(a) > 0)
    assert sq.spending(t, 0.05, "pocock")[-1] == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError):
        sq.spending(t, 0.05, "nope")


def test_boundaries_match_published_obrien_fleming_type():
    # Lan-DeMets O'Brien-Fleming-type spending, 5 equally spaced looks, two-sided alpha = 0.05
    # (one-sided 0.025): 4.877, 3.357, 2.680, 2.290, 2.031 (Jennison & Turnbull 2000, table 7.6;
    # R gsDesign::gsDesign(k = 5, test.type = 2, sfu = sfLDOF)$upper$bound)
    c = sq.gs_boundaries(np.arange(1, 6) / 5, 0.05, sides=2)
    np.testing.assert_allclose(c, [4.877, 3.357, 2.680, 2.290, 2.031], atol=2e-3)
    c1 = sq.gs_boundaries(np.arange(1, 6) / 5, 0.025, sides=1)
    np.testing.assert_allclose(c1, [4.877, 3.357, 2.680, 2.290, 2.031], atol=2e-3)


def test_boundaries_error_rate_normal_theory():
    rng = np.random.default_rng(1)
    k = 6
    info = np.arange(1, k + 1) / k
    c = sq.gs_boundaries(info, 0.05, sides=2)
    z = np.cumsum(rng.normal(size=(200_000, k)), axis=1) / np.sqrt(np.arange(1, k + 1))
    assert (np.abs(z) >= c).any(axis=1).mean() == pytest.approx(0.05, abs=0.002)


def test_design_looks_and_levels():
    d = sq.SequentialDesign(max_seeds=20, batch=4, alpha=0.05, n_sim=50_000)
    assert d.looks == [4, 8, 12, 16, 20] and d.n_looks == 5
    assert np.all(np.diff(d.p_two) > 0) and d.p_two[-1] < 0.05
    assert np.all(d.p_one < 0.05)
    d2 = sq.SequentialDesign(max_seeds=10, batch=3, n_sim=50_000)
    assert d2.looks == [3, 6, 9, 10]
    d3 = sq.SequentialDesign(max_seeds=10, batch=3, n_tests=4, n_sim=50_000)
    assert np.all(d3.p_two < d2.p_two)   # Bonferroni over 4 comparisons
    # deterministic
    assert np.array_equal(sq.SequentialDesign(10, 3, n_sim=50_000).p_two, d2.p_two)


def test_decide():
    d = sq.SequentialDesign(max_seeds=12, batch=3, n_sim=50_000)
    rng = np.random.default_rng(0)
    big = 5 + rng.normal(0, 0.1, 12)
    # O'Brien-Fleming spends almost nothing at the first look (3 of 12 seeds): even t = 86 waits
    assert d.p_two[0] < 1e-4 and sq.decide(0, big[:3], 0.5, d) == "continue"
    assert sq.decide(1, big[:6], 0.5, d) == "differs"
    tiny = rng.normal(0, 0.01, 12)
    assert sq.decide(1, tiny[:6], 1.0, d) == "equivalent"
    noisy = rng.normal(0.3, 1.0, 12)
    assert sq.decide(0, noisy[:3], 0.5, d) == "continue"
    last = d.n_looks - 1
    assert sq.decide(last, noisy, 0.5, d) == "inconclusive"
    out = sq.assess(1, noisy[:6], 0.5, d)
    assert out["look"] == 2 and out["n"] == 6 and out["level_two"] == d.p_two[1]
    # zero variance: the sign-flip rule, not p = 0 (2/2^3 = 0.25 is no evidence)
    assert sq.decide(0, [0.2, 0.2, 0.2], 0.01, d) == "continue"
    with pytest.raises(IndexError):
        sq.decide(9, noisy, 0.5, d)


def simulate(design, shift, margin, studies, rng):
    dec = np.array([""] * studies, dtype=object)
    used = np.zeros(studies, int)
    d = rng.normal(shift, 1.0, (studies, design.max_seeds))
    for k, n in enumerate(design.looks):
        for i in np.where(dec == "")[0]:
            r = sq.decide(k, d[i, :n], margin, design)
            if r != "continue":
                dec[i], used[i] = r, n
    return dec, used


def test_sequential_error_rates_small_simulation():
    # many looks at few df (3, 4, ..., 8): the setting where the normal-theory levels are too lax
    design = sq.SequentialDesign(max_seeds=8, batch=1, alpha=0.05, n_sim=100_000)
    rng = np.random.default_rng(11)
    dec, used = simulate(design, 0.0, 1.0, 3000, rng)
    assert (dec == "differs").mean() < 0.05 + 3 * math.sqrt(0.05 * 0.95 / 3000)
    assert (dec == "equivalent").mean() > 0.3 and used.mean() < 8
    dec, _ = simulate(design, 1.0, 1.0, 3000, rng)
    assert (dec == "equivalent").mean() < 0.05 + 3 * math.sqrt(0.05 * 0.95 / 3000)
