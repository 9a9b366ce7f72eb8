"""Tests for devicediff.analysis.stats, pinned to outside references.

R numbers come from R's built-in ``sleep`` data (Student 1908, Cushny & Peebles): extra hours of
sleep for 10 patients under two drugs. ``group 1`` below is drug 1, ``group 2`` drug 2. The R calls and
printed values are the ones shown in R's own examples for ``t.test`` and ``wilcox.test``.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from devicediff.analysis import stats

SLEEP_1 = np.array([0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0])
SLEEP_2 = np.array([1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4])


def frame(values: dict, *, seeds: dict | None = None, metric: str = "loss") -> pd.DataFrame:
    """Per-run frame from {config: values}; seeds 0..n-1 unless given per config."""
    rows = []
    for cfg, vals in values.items():
        ss_ = seeds[cfg] if seeds and cfg in seeds else range(len(vals))
        for s, v in zip(ss_, vals):
            rows.append({"run_id": f"{cfg}/{s}", "config": cfg, "seed": int(s), "repeat": 0,
                         metric: float(v)})
    return pd.DataFrame(rows)


def study(rng, *, n_seeds=10, shifts=None, impl_sd=0.1, seed_sd=1.0, metric="loss"):
    """Seed effect shared across configs by seed, plus per-run implementation noise."""
    shifts = shifts or {"ref": 0.0, "a": 0.0}
    seed_eff = rng.normal(0, seed_sd, n_seeds)
    return frame({c: 10 + seed_eff + s + rng.normal(0, impl_sd, n_seeds) for c, s in shifts.items()},
                 metric=metric)


def row(df, config, metric="loss"):
    r = df[(df["config"] == config) & (df["metric"] == metric)]
    assert len(r) == 1
    return r.iloc[0]


# ------------------------------------------------------------------------------------------------
# primary tests against R and scipy


def test_paired_t_matches_r_sleep():
    per_run = frame({"drug2": SLEEP_2, "drug1": SLEEP_1})
    r = row(stats.compare(per_run, "loss", "drug2"), "drug1")
    assert r["paired"] and r["test"] == "paired t" and r["n"] == 10
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)
    #    t = -4.0621, df = 9, p-value = 0.002833; mean difference -1.58
    assert r["t"] == pytest.approx(-4.0621, abs=1e-4)
    assert r["dof"] == 9
    assert r["p"] == pytest.approx(0.002833, abs=1e-6)
    assert r["diff"] == pytest.approx(-1.58)
    ref = ss.ttest_rel(SLEEP_1, SLEEP_2)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    # 9 non-zero differences, all negative: exact signed-rank p = 2 / 2**9 (scipy.stats.wilcoxon)
    assert r["p_rank"] == pytest.approx(2 / 2**9)
    assert r["p_rank"] == pytest.approx(ss.wilcoxon(SLEEP_1 - SLEEP_2).pvalue)
    # single comparison: Holm leaves p alone
    assert r["p_holm"] == r["p"]


def test_welch_and_mann_whitney_match_r_sleep():
    # Different seeds: nothing to pair, so the unpaired fallback runs.
    per_run = frame({"drug2": SLEEP_2, "drug1": SLEEP_1},
                    seeds={"drug2": range(10), "drug1": range(10, 20)})
    r = row(stats.compare(per_run, "loss", "drug2"), "drug1")
    assert not r["paired"] and r["test"] == "Welch t"
    assert (r["n_cfg"], r["n_ref"]) == (10, 10)
    assert "no shared seeds" in r["note"]
    # R: t.test(extra ~ group, data = sleep)
    #    t = -1.8608, df = 17.776, p-value = 0.07939
    assert r["t"] == pytest.approx(-1.8608, abs=1e-4)
    assert r["dof"] == pytest.approx(17.776, abs=1e-3)
    assert r["p"] == pytest.approx(0.07939, abs=1e-5)
    ref = ss.ttest_ind(SLEEP_1, SLEEP_2, equal_var=False)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["dof"] == pytest.approx(ref.df, rel=1e-12)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    # R: wilcox.test(extra ~ group, data = sleep)  ->  W = 25.5, p-value = 0.06933
    assert r["p_rank"] == pytest.approx(0.06933, abs=1e-5)
    assert r["p_rank"] == pytest.approx(ss.mannwhitneyu(SLEEP_1, SLEEP_2).pvalue)


def test_signflip_permutation_matches_scipy_exact():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=9), rng.normal(size=9)
    r = row(stats.compare(frame({"ref": y, "cfg": x}), "loss", "ref"), "cfg")

    def mean_diff(a, b, axis):
        return np.mean(a - b, axis=axis)

    # scipy.stats.permutation_test(..., permutation_type="samples", n_resamples=inf): all 2**9 flips
    ref = ss.permutation_test((x, y), mean_diff, permutation_type="samples", n_resamples=np.inf,
                              vectorized=True)
    assert r["p_perm"] == pytest.approx(ref.pvalue, rel=1e-12)
    # with tied differences too (sleep data has 1.3 twice and one zero)
    r = row(stats.compare(frame({"b": SLEEP_2, "a": SLEEP_1}), "loss", "b"), "a")
    ref = ss.permutation_test((SLEEP_1, SLEEP_2), mean_diff, permutation_type="samples",
                              n_resamples=np.inf, vectorized=True)
    assert r["p_perm"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_signflip_monte_carlo_above_16_pairs():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.4, 1, 20), rng.normal(size=20)
    r = row(stats.compare(frame({"ref": y, "cfg": x}), "loss", "ref"), "cfg")
    ref = ss.permutation_test((x, y), lambda a, b, axis: np.mean(a - b, axis=axis),
                              permutation_type="samples", n_resamples=200_000, vectorized=True,
                              random_state=0)
    # 9999 draws: Monte Carlo sd of p is at most 0.005
    assert r["p_perm"] == pytest.approx(ref.pvalue, abs=0.02)
    assert r["p_perm"] > 0


def test_two_sample_permutation_matches_scipy_exact():
    rng = np.random.default_rng(5)
    x, y = rng.normal(1, 1, 5), rng.normal(size=7)
    per_run = frame({"ref": y, "cfg": x}, seeds={"ref": range(7), "cfg": range(100, 105)})
    r = row(stats.compare(per_run, "loss", "ref"), "cfg")

    def abs_mean_diff(a, b, axis):
        return np.abs(np.mean(a, axis=axis) - np.mean(b, axis=axis))

    # all C(12, 5) = 792 splits; two-sided as |mean difference| >= observed
    ref = ss.permutation_test((x, y), abs_mean_diff, permutation_type="independent",
                              n_resamples=np.inf, vectorized=True, alternative="greater")
    assert r["p_perm"] == pytest.approx(ref.pvalue, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# helpers against statsmodels


@pytest.mark.parametrize("bounds", [0.5, 2.0, (-1.0, 3.0)])
def test_tost_paired_matches_statsmodels(bounds):
    low, upp = (-bounds, bounds) if np.isscalar(bounds) else bounds
    out = stats.tost_paired(SLEEP_1, SLEEP_2, bounds).iloc[0]
    # statsmodels.stats.weightstats.ttost_paired(x1, x2, low, upp) -> (p, (t1, p1, df1), (t2, p2, df2))
    p, (t1, p1, df1), (t2, p2, df2) = ttost_paired(SLEEP_1, SLEEP_2, low, upp)
    assert out["p"] == pytest.approx(p, rel=1e-10)
    assert (out["t_low"], out["p_low"]) == pytest.approx((t1, p1), rel=1e-10)
    assert (out["t_high"], out["p_high"]) == pytest.approx((t2, p2), rel=1e-10)
    assert out["dof"] == df1 == df2


@pytest.mark.parametrize("bounds", [0.5, 2.0, (-4.0, 1.0)])
def test_tost_welch_matches_statsmodels(bounds):
    low, upp = (-bounds, bounds) if np.isscalar(bounds) else bounds
    x = SLEEP_1[:7]
    out = stats.tost_welch(x, SLEEP_2, bounds).iloc[0]
    # statsmodels.stats.weightstats.ttost_ind(x1, x2, low, upp, usevar="unequal")
    p, (t1, p1, df1), (t2, p2, _) = ttost_ind(x, SLEEP_2, low, upp, usevar="unequal")
    assert out["p"] == pytest.approx(p, rel=1e-10)
    assert (out["t_low"], out["p_low"], out["t_high"], out["p_high"]) == pytest.approx(
        (t1, p1, t2, p2), rel=1e-10)
    assert out["dof"] == pytest.approx(df1, rel=1e-10)


def test_tost_zero_variance():
    x = np.array([1.0, 2.0, 3.0])
    assert stats.tost_paired(x, x, 0.1)["p"].iloc[0] == 0.0        # exact and inside
    assert stats.tost_paired(x + 0.2, x, 0.1)["p"].iloc[0] == 1.0  # exact and outside
    assert stats.tost_welch([1.0, 1.0], [1.0, 1.0], 0.1)["p"].iloc[0] == 0.0


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(6)
    p = np.concatenate([rng.uniform(0, 0.05, 5), rng.uniform(0, 1, 10), [0.0, 1.0, 0.01, 0.01]])
    # statsmodels.stats.multitest.multipletests(p, method="holm")[1]
    np.testing.assert_allclose(stats.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    with_nan = np.array([0.01, np.nan, 0.04, 0.03])
    out = stats.holm(with_nan)
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], multipletests([0.01, 0.04, 0.03], method="holm")[1])
    assert stats.holm([]).size == 0


def test_hedges_g():
    x, y = SLEEP_1, SLEEP_2[:8]
    t = ss.ttest_ind(x, y, equal_var=True).statistic  # Student t: d = t * sqrt(1/nx + 1/ny)
    d = t * math.sqrt(1 / x.size + 1 / y.size)
    df = x.size + y.size - 2
    g = stats.hedges_g(x, y)
    assert g / d == pytest.approx(stats._hedges_j(df), rel=1e-12)
    # exact J against the usual approximation 1 - 3 / (4 df - 1) (Hedges 1981; Lakens 2013)
    assert stats._hedges_j(df) == pytest.approx(1 - 3 / (4 * df - 1), abs=2e-4)
    assert stats._hedges_j(1000) == pytest.approx(1 - 3 / 3999, rel=1e-7)
    # paired: d_av = mean(x - y) / sqrt((var x + var y) / 2), J with df = 2n - 2
    d_av = np.mean(SLEEP_1 - SLEEP_2) / math.sqrt((SLEEP_1.var(ddof=1) + SLEEP_2.var(ddof=1)) / 2)
    assert stats.hedges_g(SLEEP_1, SLEEP_2, paired=True) == pytest.approx(
        d_av * stats._hedges_j(18), rel=1e-12)
    assert stats.hedges_g([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert stats.hedges_g([2.0, 2.0], [1.0, 1.0]) == math.inf


@pytest.mark.parametrize("es", [0.2, 0.5, 0.8, 1.3, 3.0])
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("alpha", [0.05, 0.05 / 12])
def test_seeds_needed_matches_statsmodels(es, paired, alpha):
    power = TTestPower() if paired else TTestIndPower()
    # statsmodels TTestPower().solve_power(effect_size, alpha=alpha, power=0.8) (continuous n)
    n_sm = power.solve_power(effect_size=es, alpha=alpha, power=0.8, alternative="two-sided")
    assert stats.seeds_needed(es, paired=paired, alpha=alpha) == max(2, math.ceil(n_sm - 1e-9))


def test_seeds_needed_pinned():
    # G*Power / statsmodels: d = 0.5, alpha = 0.05, power = 0.8 -> 34 pairs; 64 per group
    assert stats.seeds_needed(0.5, paired=True) == 34
    assert stats.seeds_needed(0.5, paired=False) == 64
    assert stats.seeds_needed(0.5, paired=True, alpha=0.01) == math.ceil(
        TTestPower().solve_power(0.5, alpha=0.01, power=0.8))
    assert math.isnan(stats.seeds_needed(0.0))


def test_bootstrap_ci():
    rng = np.random.default_rng(7)
    x, y = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    a = stats.bootstrap_ci(x, y, paired=True, n_boot=4000, rng_seed=1)
    assert a == stats.bootstrap_ci(x, y, paired=True, n_boot=4000, rng_seed=1)  # seeded
    # scipy.stats.bootstrap((x - y,), np.mean, method="percentile"): same method, other stream
    ref = ss.bootstrap((x - y,), np.mean, method="percentile", n_resamples=20000,
                       random_state=0).confidence_interval
    assert a == pytest.approx((ref.low, ref.high), abs=0.05)
    lo, hi = stats.bootstrap_ci(x, y, n_boot=4000, rng_seed=1)
    ref = ss.bootstrap((x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis), method="percentile",
                       n_resamples=20000, random_state=0, vectorized=True).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.05)
    assert stats.bootstrap_ci(x, x, paired=True) == (0.0, 0.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci(x, y, n_boot=0))


# ------------------------------------------------------------------------------------------------
# edge cases that happen in practice


@pytest.mark.filterwarnings("error")
def test_bitwise_identical_config():
    vals = np.array([0.31, 0.29, 0.35, 0.30, 0.33])
    per_run = frame({"cpu-1t": vals, "cpu-1t-again": vals.copy()})
    r = row(stats.compare(per_run, "loss", "cpu-1t"), "cpu-1t-again")
    assert r["diff"] == 0.0 and r["rel_diff"] == 0.0 and r["t"] == 0.0
    assert r["p"] == 1.0 and r["p_rank"] == 1.0 and r["p_perm"] == 1.0
    assert r["tost_p"] == 0.0 and r["hedges_g"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
    assert r["verdict"] == "equivalent"
    assert "bitwise identical" in r["note"]


@pytest.mark.filterwarnings("error")
def test_tiny_constant_difference():
    vals = np.array([0.31, 0.29, 0.35, 0.30, 0.33, 0.28])
    per_run = frame({"ref": vals, "cfg": vals + 2.0**-40})
    r = row(stats.compare(per_run, "loss", "ref"), "cfg")
    numeric = ["diff", "rel_diff", "t", "p", "p_holm", "p_rank", "p_perm", "hedges_g", "tost_p",
               "ci_low", "ci_high"]
    assert not any(math.isnan(r[c]) for c in numeric)
    # the same tiny shift on every seed is systematic: detected, and flagged as negligible
    assert r["verdict"] == "differs"
    assert r["tost_p"] == pytest.approx(0.0, abs=1e-12)
    assert "significant but within margin" in r["note"]
    assert abs(r["hedges_g"]) < 1e-9


def test_nan_runs_are_excluded_and_counted():
    rng = np.random.default_rng(8)
    per_run = study(rng, shifts={"ref": 0.0, "a": 0.0, "b": 0.0, "dead": 0.0})
    per_run.loc[(per_run["config"] == "a") & per_run["seed"].isin([1, 4]), "loss"] = np.nan
    per_run.loc[(per_run["config"] == "ref") & (per_run["seed"] == 7), "loss"] = np.inf
    per_run.loc[per_run["config"] == "dead", "loss"] = np.nan
    out = stats.compare(per_run, "loss", "ref")
    a = row(out, "a")
    assert (a["n_nan_cfg"], a["n_nan_ref"], a["n"]) == (2, 1, 7)
    assert "diverged" in a["note"] and "without a same-seed partner" in a["note"]
    assert math.isfinite(a["p"])
    dead = row(out, "dead")
    assert dead["n"] == 0 and dead["n_nan_cfg"] == 10
    assert dead["verdict"] == "inconclusive" and math.isnan(dead["p"])
    # 10/10 diverged vs 1/10: Fisher exact two-sided, scipy.stats.fisher_exact([[10, 0], [1, 9]])
    assert dead["p_diverge"] == pytest.approx(ss.fisher_exact([[10, 0], [1, 9]])[1])
    assert "divergence rates differ" in dead["note"]
    # the dead config does not enter Holm's family
    assert out["p"].notna().sum() == 2
    desc = stats.describe(per_run, "loss").set_index("config")
    assert desc.loc["a", "n"] == 8 and desc.loc["a", "n_nan"] == 2 and desc.loc["dead", "n"] == 0


def test_forced_pairing_without_shared_seeds_does_not_crash():
    per_run = frame({"ref": [1.0, 2.0, 3.0], "cfg": [1.5, 2.5, 3.5]},
                    seeds={"ref": [0, 1, 2], "cfg": [5, 6, 7]})
    r = row(stats.compare(per_run, "loss", "ref", paired=True), "cfg")
    assert r["verdict"] == "inconclusive" and r["n"] == 0
    r = row(stats.compare(per_run, "loss", "ref"), "cfg")
    assert not r["paired"]


def test_input_errors():
    per_run = frame({"ref": [1.0, 2.0], "cfg": [1.0, 2.0]})
    with pytest.raises(ValueError, match="reference"):
        stats.compare(per_run, "loss", "nope")
    with pytest.raises(KeyError):
        stats.compare(per_run, "acc", "ref")
    with pytest.raises(ValueError, match="several"):
        stats.compare(pd.concat([per_run, per_run.iloc[:1]]), "loss", "ref")
    with pytest.raises(TypeError):
        stats.verdict_table(per_run, ["loss"], "ref", bogus=1)
    with pytest.raises(ValueError):
        stats.hedges_g([1.0, np.nan], [1.0, 2.0])


def test_repeats_are_not_used_by_compare():
    per_run = frame({"ref": [1.0, 2.0, 3.0], "cfg": [1.0, 2.0, 3.0]})
    extra = per_run[per_run["config"] == "cfg"].assign(repeat=1, loss=[9.0, 9.0, 9.0])
    r = row(stats.compare(pd.concat([per_run, extra]), "loss", "ref"), "cfg")
    assert r["diff"] == 0.0 and r["n"] == 3


# ------------------------------------------------------------------------------------------------
# verdicts and multiplicity


def test_verdict_outcomes_on_constructed_data():
    rng = np.random.default_rng(9)
    per_run = study(rng, shifts={"ref": 0.0, "same": 0.0, "shifted": 1.0})
    per_run = pd.concat([per_run, frame({"copy": per_run.loc[per_run.config == "ref", "loss"]})])
    out = stats.compare(per_run, "loss", "ref")
    assert row(out, "shifted")["verdict"] == "differs"
    assert row(out, "copy")["verdict"] == "equivalent"
    assert row(out, "same")["verdict"] == "equivalent"  # impl noise 0.1 << margin 0.5 seed sd
    assert out["n_seeds_needed"].isna().all()

    noisy = frame({"ref": [1.0, 2.0], "cfg": [3.0, 1.5]})
    r = row(stats.compare(noisy, "loss", "ref"), "cfg")
    assert r["verdict"] == "inconclusive"
    # margin = 0.5 * sd(ref); effect for the power solve = margin / sd of paired differences
    es = 0.5 * np.std([1.0, 2.0], ddof=1) / np.std([2.0, -0.5], ddof=1)
    assert r["n_seeds_needed"] == stats.seeds_needed(es, paired=True, alpha=0.05)
    assert "seeds for 80% power" in r["note"]


def test_explicit_margin_and_margin_mapping():
    per_run = frame({"ref": [1.0, 2.0, 3.0, 4.0], "cfg": [1.01, 2.0, 3.02, 3.99]})
    per_run["acc"] = per_run["loss"] * 100
    out = stats.verdict_table(per_run, ["loss", "acc"], "ref", margin={"loss": 0.1, "acc": 1e-6})
    assert row(out, "cfg", "loss")["margin"] == 0.1
    assert row(out, "cfg", "acc")["margin"] == 1e-6
    assert row(out, "cfg", "loss")["verdict"] == "equivalent"
    assert row(out, "cfg", "acc")["verdict"] == "inconclusive"
    assert row(out, "cfg", "loss")["tost_p"] == stats.tost_paired(
        [1.01, 2.0, 3.02, 3.99], [1.0, 2.0, 3.0, 4.0], 0.1)["p"].iloc[0]


def test_holm_across_configs_and_metrics():
    rng = np.random.default_rng(10)
    per_run = study(rng, shifts={"ref": 0.0, "a": 0.05, "b": 0.1, "c": 0.0})
    per_run["loss2"] = per_run["loss"] ** 2 + rng.normal(0, 0.5, len(per_run))
    table = stats.verdict_table(per_run, ["loss", "loss2"], "ref", n_boot=0)
    assert len(table) == 6
    raw = pd.concat([stats.compare(per_run, m, "ref", n_boot=0) for m in ["loss", "loss2"]])
    np.testing.assert_allclose(table["p"], raw["p"])
    # statsmodels.stats.multitest.multipletests(all six p, method="holm")
    np.testing.assert_allclose(table["p_holm"], multipletests(table["p"], method="holm")[1])
    np.testing.assert_allclose(table["tost_p_holm"],
                               multipletests(table["tost_p"], method="holm")[1])
    # per-metric compare adjusts only within its own rows: never above the study-wide Holm
    assert np.all(raw["p_holm"].to_numpy() <= table["p_holm"].to_numpy() + 1e-15)
    alpha = 0.05
    expect = np.where(table["p_holm"] < alpha, "differs",
                      np.where(table["tost_p_holm"] < alpha, "equivalent", "inconclusive"))
    assert list(table["verdict"]) == list(expect)


def test_ci_and_results_do_not_depend_on_row_order():
    rng = np.random.default_rng(11)
    per_run = study(rng, shifts={"ref": 0.0, "a": 0.3, "b": 0.0})
    a = stats.compare(per_run, "loss", "ref").set_index("config")
    b = stats.compare(per_run.iloc[::-1], "loss", "ref").set_index("config").loc[a.index]
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------------------------------------
# noise floor, describe, sentence


def test_noise_floor():
    rows = []
    for seed, base in enumerate([1.0, 2.0, 4.0]):
        for rep, eps in enumerate([0.0, 0.1, -0.3]):
            rows.append({"config": "gpu", "seed": seed, "repeat": rep, "loss": base + eps})
            rows.append({"config": "cpu", "seed": seed, "repeat": rep, "loss": base})
        rows.append({"config": "once", "seed": seed, "repeat": 0, "loss": base})
    rows.append({"config": "gpu", "seed": 9, "repeat": 0, "loss": np.nan})
    out = stats.noise_floor(pd.DataFrame(rows), "loss").set_index("config")
    # pooled within-cell sd = sqrt(mean of the per-cell variances) with equal cell sizes
    within = np.var([0.0, 0.1, -0.3], ddof=1)
    assert out.loc["gpu", "impl_sd"] == pytest.approx(math.sqrt(within))
    assert out.loc["gpu", "seed_sd"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert out.loc["gpu", "ratio"] == pytest.approx(math.sqrt(within) / np.std([1, 2, 4], ddof=1))
    assert out.loc["gpu", "n_repeat_groups"] == 3 and out.loc["gpu", "n_nan"] == 1
    assert out.loc["cpu", "impl_sd"] == 0.0 and out.loc["cpu", "ratio"] == 0.0
    assert math.isnan(out.loc["once", "impl_sd"]) and out.loc["once", "n_repeat_groups"] == 0


def test_describe_matches_pandas():
    rng = np.random.default_rng(12)
    per_run = study(rng, shifts={"ref": 0.0, "a": 0.2})
    out = stats.describe(per_run, "loss").set_index("config")
    ref = per_run.groupby("config")["loss"].agg(["count", "mean", "std", "median", "min", "max"])
    for c in ["ref", "a"]:
        assert out.loc[c, "n"] == ref.loc[c, "count"]
        assert out.loc[c, ["mean", "sd", "median", "min", "max"]].tolist() == pytest.approx(
            ref.loc[c, ["mean", "std", "median", "min", "max"]].tolist())
    assert list(out.index) == ["ref", "a"]


def test_summary_sentence():
    rng = np.random.default_rng(13)
    per_run = study(rng, shifts={"cpu-1t": 0.0, "cpu-4t": 0.0, "cuda-cudnn": 0.0, "cuda-tf32": 1.0})
    out = stats.verdict_table(per_run, ["loss"], "cpu-1t")
    s = stats.summary_sentence(out, "loss")
    assert s.startswith("cpu-4t and cuda-cudnn are equivalent to cpu-1t within ±")
    assert "% of loss; cuda-tf32 differs: +" in s
    assert "(paired t, n = 10, Holm-adjusted)" in s
    assert stats.summary_sentence(out, "other") == "no comparisons for other"
    noisy = stats.compare(frame({"ref": [1.0, 2.0], "cfg": [3.0, 1.5]}), "loss", "ref")
    assert "cfg is inconclusive" in stats.summary_sentence(noisy, "loss")
    assert "seeds needed" in stats.summary_sentence(noisy, "loss")


@pytest.mark.filterwarnings("error")
def test_degenerate_inputs():
    # one run each: nothing to test, but no crash and no warning
    r = row(stats.compare(frame({"ref": [1.0], "cfg": [2.0]}), "loss", "ref"), "cfg")
    assert r["verdict"] == "inconclusive" and math.isnan(r["p"])
    assert "too few finite runs" in r["note"]
    # reference only: an empty frame with the usual columns
    out = stats.compare(frame({"ref": [1.0, 2.0]}), "loss", "ref")
    assert out.empty and list(out.columns) == stats.COLUMNS
    # a metric that does not vary with the seed: margin 0, identity is still equivalence
    r = row(stats.compare(frame({"ref": [0.0, 0.0, 0.0], "cfg": [0.0, 0.0, 0.0]}), "loss", "ref"),
            "cfg")
    assert (r["margin"], r["p"], r["tost_p"], r["verdict"]) == (0.0, 1.0, 0.0, "equivalent")
    # constant, different groups without shared seeds: Welch se = 0 -> p = 0, g infinite
    per_run = frame({"ref": [1.0, 1.0, 1.0], "cfg": [2.0, 2.0]}, seeds={"cfg": [7, 8]})
    r = row(stats.compare(per_run, "loss", "ref"), "cfg")
    assert (r["test"], r["p"], r["hedges_g"], r["verdict"]) == ("Welch t", 0.0, math.inf, "differs")
    assert "margin is 0" in r["note"]


# ================================================================================================
# verdicts(): roles, t intervals, identical configs, affine copies, zero-variance rule (issue #13)


def generated_study(seed=21, n=6):
    """ref + 4 configs on 5 metrics: a primary loss, its exact affine copy, a noisy secondary, a
    data-only check, plus one config bitwise identical to the reference."""
    rng = np.random.default_rng(seed)
    seed_eff = rng.normal(0, 1, n)
    cols = {}
    for cfg, shift in [("ref", 0.0), ("same", 0.0), ("shifted", 0.8), ("copy", None),
                       ("offset", None)]:
        if cfg == "copy":
            cols[cfg] = cols["ref"].copy()
        elif cfg == "offset":
            cols[cfg] = cols["ref"] + 0.003
        else:
            cols[cfg] = 10 + seed_eff + shift + rng.normal(0, 0.1, n)
    per_run = frame(cols, metric="mse")
    per_run["machine"] = "box-1"
    per_run["loss"] = 19.5 * per_run["mse"]
    per_run["acc"] = -per_run["mse"] + rng.normal(0, 0.3, len(per_run))
    per_run["baseline_mse"] = 0.0523
    return per_run


def vrow(v, config, metric):
    r = v[(v["config"] == config) & (v["metric"] == metric)]
    assert len(r) == 1
    return r.iloc[0]


def test_verdicts_columns_and_roles():
    v = stats.verdicts(generated_study(), ["mse"], "ref")
    assert list(v.columns) == stats.VERDICT_COLUMNS
    assert list(v.columns[:18]) == [
        "config", "machine", "metric", "role", "n", "diff", "ci95_low", "ci95_high", "ci90_low",
        "ci90_high", "p", "p_adj", "tost_p_adj", "margin", "margin_pct", "margin_source", "verdict",
        "note"]
    roles = v.groupby("metric")["role"].first().to_dict()
    assert roles == {"mse": "primary", "loss": "secondary", "acc": "secondary",
                     "baseline_mse": "check"}
    assert set(v["machine"]) == {"box-1"}
    chk = v[v["role"] == "check"]
    assert (chk["verdict"] == "same on every run: yes").all() and chk["p"].isna().all()
    assert not chk["in_family"].any()
    # the confirmatory family: configs x primary, minus the identical config
    prim = v[(v["role"] == "primary") & v["in_family"]]
    assert sorted(prim["config"]) == ["offset", "same", "shifted"]
    np.testing.assert_allclose(prim["p_adj"], multipletests(prim["p"], method="holm")[1], rtol=1e-12)
    np.testing.assert_allclose(prim["tost_p_adj"], multipletests(prim["tost_p"], method="holm")[1],
                               rtol=1e-12)
    assert all("confirmatory" in s for s in prim["note"])
    sec = v[(v["role"] == "secondary") & v["in_family"]]
    assert set(sec["metric"]) == {"acc"}  # loss is mse's affine copy: not in the family
    assert all("exploratory" in s for s in sec["note"])
    np.testing.assert_allclose(sec["p_adj"], multipletests(sec["p"], method="holm")[1], rtol=1e-12)


def test_verdicts_pinned_to_scipy_and_statsmodels():
    per_run = generated_study(seed=5, n=7)
    v = stats.verdicts(per_run, ["mse"], "ref", margin={"mse": 0.3})
    ref = per_run[per_run.config == "ref"].sort_values("seed")
    for cfg in ["same", "shifted"]:
        x = per_run[per_run.config == cfg].sort_values("seed")["mse"].to_numpy()
        y = ref["mse"].to_numpy()
        r = vrow(v, cfg, "mse")
        res = ss.ttest_rel(x, y)
        # scipy.stats.ttest_rel(x, y).pvalue / .confidence_interval(0.95) / (0.90)
        assert r["p"] == pytest.approx(res.pvalue, rel=1e-9, abs=1e-300)
        ci95, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
        assert r["ci95_low"] == pytest.approx(ci95.low, rel=1e-9)
        assert r["ci95_high"] == pytest.approx(ci95.high, rel=1e-9)
        assert r["ci90_low"] == pytest.approx(ci90.low, rel=1e-9)
        assert r["ci90_high"] == pytest.approx(ci90.high, rel=1e-9)
        # statsmodels.stats.weightstats.ttost_paired(x, y, -0.3, 0.3)[0]
        assert r["tost_p"] == pytest.approx(ttost_paired(x, y, -0.3, 0.3)[0], rel=1e-9, abs=1e-300)
        assert r["diff"] == pytest.approx(np.mean(x - y), rel=1e-12)
        assert r["sd_diff"] == pytest.approx(np.std(x - y, ddof=1), rel=1e-12)
        assert r["margin"] == 0.3 and r["margin_source"] == "fixed"
        assert r["margin_pct"] == pytest.approx(100 * 0.3 / abs(np.mean(y)), rel=1e-12)
        # TOST passes exactly when the 90% CI lies inside +-margin
        assert (r["tost_p"] < 0.05) == (-0.3 < r["ci90_low"] and r["ci90_high"] < 0.3)
    assert vrow(v, "shifted", "mse")["verdict"] == "differs"
    assert vrow(v, "same", "mse")["verdict"] == "equivalent"


def test_t_interval_matches_scipy():
    x, y = SLEEP_1, SLEEP_2
    for conf in (0.95, 0.90, 0.99):
        # scipy.stats.ttest_rel(x, y).confidence_interval(conf)
        ci = ss.ttest_rel(x, y).confidence_interval(conf)
        np.testing.assert_allclose(stats.t_interval(x, y, conf), (ci.low, ci.high), rtol=1e-9)
    # scipy.stats.ttest_1samp(x, 0).confidence_interval(0.95)
    ci = ss.ttest_1samp(x, 0).confidence_interval(0.95)
    np.testing.assert_allclose(stats.t_interval(x), (ci.low, ci.high), rtol=1e-9)


def test_paired_core_vectorized_matches_scipy():
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 1.0, (50, 4))
    core = stats.paired_core(d, 0.5)
    # scipy.stats.ttest_1samp(d, 0, axis=-1): the paired t on differences
    res = ss.ttest_1samp(d, 0, axis=-1)
    np.testing.assert_allclose(core["p"], res.pvalue, rtol=1e-9)
    ci = res.confidence_interval(0.95)
    np.testing.assert_allclose(core["ci95_low"], ci.low, rtol=1e-9)
    np.testing.assert_allclose(core["ci95_high"], ci.high, rtol=1e-9)
    tost = [ttost_paired(row, np.zeros(4), -0.5, 0.5)[0] for row in d]
    np.testing.assert_allclose(core["tost_p"], tost, rtol=1e-9)


def test_holm_rows_matches_statsmodels():
    rng = np.random.default_rng(4)
    p = rng.uniform(0, 0.2, (20, 7))
    expect = np.array([multipletests(row, method="holm")[1] for row in p])
    np.testing.assert_allclose(stats.holm_rows(p), expect, rtol=1e-12)


@pytest.mark.filterwarnings("error")
def test_identical_config_leaves_the_family():
    v = stats.verdicts(generated_study(), ["mse"], "ref")
    r = vrow(v, "copy", "mse")
    assert r["verdict"] == "identical" and not r["in_family"]
    assert r["diff"] == 0.0 and (r["ci95_low"], r["ci95_high"]) == (0.0, 0.0)
    assert math.isnan(r["p"]) and math.isnan(r["p_adj"])
    assert "bitwise identical" in r["note"]
    # the family is the 3 other configs: Holm m = 3
    assert "Holm over 3 comparisons" in vrow(v, "same", "mse")["note"]


@pytest.mark.filterwarnings("error")
def test_constant_offset_rule():
    # +0.003 in every seed: no noise estimate; p from the exact sign-flip test, 2 / 2**n
    # n = 2: nothing can be shown; n = 5: the offset is shown inside the margin (TOST sides
    # 1/2^5 < 0.05) but not shown to exist (2/2^5 > 0.05); n >= 6: shown to exist
    for n, expect in [(2, "inconclusive"), (5, "equivalent"), (6, "differs"), (8, "differs")]:
        vals = np.linspace(1.0, 2.0, n)
        per_run = frame({"ref": vals, "cfg": vals + 0.003})
        r = vrow(stats.verdicts(per_run, ["loss"], "ref"), "cfg", "loss")
        assert r["p"] == pytest.approx(2.0 ** (1 - n), rel=1e-12)   # never 0
        assert r["verdict"] == expect
        assert "+0.003 in every seed" in r["note"]
        if n < 6:   # the 95% interval cannot exclude anything at this n
            assert (r["ci95_low"], r["ci95_high"]) == (-math.inf, math.inf)
        else:
            assert r["ci95_low"] == r["ci95_high"] == pytest.approx(0.003, rel=1e-9)
        # TOST sides: one-sided sign-flip p = 1 / 2**n
        assert r["tost_p"] == pytest.approx(2.0 ** -n)
    # the shift is not bitwise constant after float rounding; still treated as constant
    vals = np.array([0.3, 0.7, 1.1, 5.3, 9.9, 0.01])
    core = stats.paired_core((vals / 19.5 + 1e-4) - vals / 19.5, 1.0,
                             scale=np.max(vals / 19.5 + 1e-4))
    assert bool(core["zero_var"]) and core["p"] == pytest.approx(2.0 ** -5)


def test_small_n_note_says_too_few_not_not_significant():
    rng = np.random.default_rng(7)
    per_run = study(rng, n_seeds=4, shifts={"ref": 0.0, "big": 3.0})
    r = vrow(stats.verdicts(per_run, ["loss"], "ref"), "big", "loss")
    assert r["verdict"] == "differs"
    assert "too few for a sign-flip or rank test" in r["note"] and "0.125" in r["note"]
    assert "not significant" not in r["note"]
    # the old compare() says the same at small n
    old = row(stats.compare(per_run, "loss", "ref"), "big")
    assert "too few for rank/permutation tests" in old["note"]


def test_affine_copy_detected_and_verdict_copied():
    v = stats.verdicts(generated_study(), ["mse"], "ref")
    for cfg in ["same", "shifted", "offset"]:
        a, b = vrow(v, cfg, "mse"), vrow(v, cfg, "loss")
        assert not b["in_family"] and "exact affine copy of mse" in b["note"]
        assert b["p"] == pytest.approx(a["p"], rel=1e-9)          # t is affine invariant
        assert b["tost_p"] == pytest.approx(a["tost_p"], rel=1e-9)  # seed-sd margin scales too
        assert (b["p_adj"], b["verdict"]) == (a["p_adj"], a["verdict"])
    copies = stats.affine_copies(generated_study(), ["mse", "loss", "acc"])
    assert set(copies) == {"loss"} and copies["loss"][0] == "mse"
    assert copies["loss"][1] == pytest.approx(19.5, rel=1e-12)
    # a sign flip (acc = -mse) is an affine copy too; noise breaks it
    pr = generated_study()
    pr["neg"] = 1 - 2 * pr["mse"]
    assert stats.affine_copies(pr, ["mse", "neg", "acc"]) == {"neg": ("mse", pytest.approx(-2),
                                                                      pytest.approx(1))}


def test_checks_explicit_and_failing():
    pr = generated_study()
    pr["data_metric"] = pr["seed"] * 0.1          # data-only but seed dependent
    pr.loc[(pr.config == "same") & (pr.seed == 2), "data_metric"] += 1e-3
    v = stats.verdicts(pr, ["mse"], "ref", checks=["data_metric"])
    assert vrow(v, "shifted", "data_metric")["verdict"] == "same on every run: yes"
    assert vrow(v, "same", "data_metric")["verdict"] == "same on every run: no"
    # without the declaration the seed-dependent metric is secondary (it varies across seeds)
    v = stats.verdicts(pr, ["mse"], "ref", metrics=["mse", "data_metric"])
    assert vrow(v, "shifted", "data_metric")["role"] == "secondary"
    assert vrow(v, "shifted", "data_metric")["verdict"] == "identical"


def test_verdicts_nan_and_errors():
    pr = generated_study()
    pr.loc[(pr.config == "same") & (pr.seed == 1), "mse"] = np.nan
    v = stats.verdicts(pr, ["mse"], "ref", metrics=["mse"])
    r = vrow(v, "same", "mse")
    assert r["n"] == 5 and "diverged" in r["note"]
    with pytest.raises(ValueError, match="reference"):
        stats.verdicts(pr, ["mse"], "nope")
    with pytest.raises(KeyError):
        stats.verdicts(pr, ["nope"], "ref")
    tiny = frame({"ref": [1.0], "cfg": [2.0]})
    r = vrow(stats.verdicts(tiny, ["loss"], "ref"), "cfg", "loss")
    assert r["verdict"] == "inconclusive" and "fewer than 2 paired seeds" in r["note"]


def test_verdicts_deterministic_and_row_order_free():
    pr = generated_study()
    a = stats.verdicts(pr, ["mse"], "ref")
    b = stats.verdicts(pr.iloc[::-1].rename(columns={}), ["mse"], "ref")
    key = ["metric", "config"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True),
                                  b.sort_values(key).reset_index(drop=True))
    # renaming a config does not change its numbers (no name-keyed random streams)
    c = stats.verdicts(pr.replace({"config": {"same": "zzz"}}), ["mse"], "ref")
    num = ["diff", "ci95_low", "ci95_high", "p", "tost_p", "p_signflip"]
    np.testing.assert_array_equal(vrow(a, "same", "mse")[num].to_numpy(dtype=float),
                                  vrow(c, "zzz", "mse")[num].to_numpy(dtype=float))
