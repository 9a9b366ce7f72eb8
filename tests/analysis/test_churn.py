"""Churn, output distance, the churn table against the seed floor, and the per-class family.
Pure numpy/pandas on synthetic predictions: well under a second."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from devicediff.analysis.churn import (CHURN_COLUMNS, PER_CLASS_COLUMNS, churn, churn_pairs, churn_seeds_needed,
                                       churn_table, output_distance, per_class_table, signflip_p_greater)

# --------------------------------------------------------------------------------------------------
# churn and output_distance against hand-computed values


def test_churn_hand_values():
    assert churn([0, 1, 2, 3], [0, 1, 2, 3]) == 0.0
    assert churn([0, 1, 2, 3], [0, 1, 3, 2]) == 0.5
    assert churn(np.array([1, 1, 1]), np.array([2, 2, 2])) == 1.0
    assert churn([0, 0, 0, 0, 1], [0, 0, 0, 0, 0]) == pytest.approx(0.2)


def test_churn_takes_scores_as_argmax():
    scores_a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    scores_b = np.array([[0.4, 0.6], [0.3, 0.7], [0.5, 0.5 - 1e-9]])
    assert churn(scores_a, scores_b) == pytest.approx(1 / 3)
    assert churn(scores_a, [0, 1, 0]) == 0.0


def test_churn_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="same inputs"):
        churn([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="no inputs"):
        churn([], [])


def test_output_distance_hand_values():
    a = np.array([3.0, 4.0])  # ||a|| = 5
    assert output_distance(a, a) == 0.0
    # ||a - 0|| / sqrt((25 + 0) / 2) = 5 / sqrt(12.5) = sqrt(2)
    assert output_distance(a, np.zeros(2)) == pytest.approx(math.sqrt(2))
    # b = -a: ||2a|| / ||a|| = 2, the maximum
    assert output_distance(a, -a) == pytest.approx(2.0)
    # a = (1, 0), b = (0, 1): sqrt(2) / sqrt(1) = sqrt(2)
    assert output_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.sqrt(2))
    # b = 1.1 a: 0.1 * 5 / sqrt((25 + 30.25) / 2)
    assert output_distance(a, 1.1 * a) == pytest.approx(0.5 / math.sqrt(27.625))
    assert output_distance(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0
    assert output_distance(a, 1.1 * a) == output_distance(1.1 * a, a)  # symmetric
    assert math.isnan(output_distance([np.nan, 1.0], [1.0, 1.0]))
    with pytest.raises(ValueError):
        output_distance(np.ones(3), np.ones(4))


def test_signflip_p_exact():
    assert signflip_p_greater([1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(1 / 32)
    assert signflip_p_greater([0.0, 0.0]) == 1.0
    # d = (1, 2): sign sums 3, 1, -1, -3; P(sum >= 3) = 1/4
    assert signflip_p_greater([1.0, 2.0]) == pytest.approx(0.25)
    assert signflip_p_greater([-1.0, -2.0]) == 1.0
    assert 0 < signflip_p_greater(np.ones(20)) < 0.001  # Monte Carlo branch


# --------------------------------------------------------------------------------------------------
# churn_table on synthetic predictions


N_INPUTS, N_CLASSES = 2000, 10


def _flip(pred: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Change the class of a random ``frac`` of the inputs."""
    out = pred.copy()
    idx = rng.choice(len(pred), size=int(round(frac * len(pred))), replace=False)
    out[idx] = (out[idx] + rng.integers(1, N_CLASSES, size=len(idx))) % N_CLASSES
    return out


def _synthetic(seeds: int, *, seed_frac=0.05, bad_frac=0.30, rounding_frac=0.02):
    """Reference runs differ from each other by ~2 x seed_frac (each flips seed_frac off a common
    truth). 'bad' flips bad_frac off its own seed's reference run; 'same' is bitwise the reference;
    'rounding' flips a little (well under the seed floor)."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, N_CLASSES, size=N_INPUTS)
    preds = {}
    for s in range(seeds):
        ref = _flip(truth, seed_frac, rng)
        preds[("cpu-1t", s)] = ref
        preds[("same", s)] = ref.copy()
        preds[("bad", s)] = _flip(ref, bad_frac, rng)
        preds[("rounding", s)] = _flip(ref, rounding_frac, rng)
    return preds


def test_churn_table_more_less_and_floor():
    preds = _synthetic(8)
    t = churn_table(preds, "cpu-1t").set_index("config")
    assert list(t.reset_index().columns[: len(CHURN_COLUMNS)]) == CHURN_COLUMNS
    assert set(t.index) == {"bad", "same", "rounding"}
    assert all(f"churn_s{s}" in t.columns for s in range(8))
    assert (t["n"] == 8).all() and (t["n_floor_pairs"] == 28).all()
    # the floor: two independent 5% flips of the truth disagree on just under 10% of the inputs
    assert 0.07 < t.loc["bad", "floor_mean"] < 0.12
    assert t.loc["bad", "churn_mean"] == pytest.approx(0.30, abs=0.01)
    assert t.loc["bad", "verdict"] == "more"
    assert t.loc["bad", "p_more_holm"] == pytest.approx(3 / 2**8)  # every e_s > 0: 1/256, Holm x 3
    assert t.loc["same", "churn_mean"] == 0.0
    assert t.loc["same", "verdict"] == "less"
    assert "identical" in t.loc["same", "note"]
    assert t.loc["rounding", "verdict"] == "less"
    assert t.loc["bad", "churn_s3"] == churn(preds[("bad", 3)], preds[("cpu-1t", 3)])
    assert t.loc["bad", "ratio"] == pytest.approx(t.loc["bad", "churn_mean"] / t.loc["bad", "floor_mean"])


def test_churn_table_inconclusive_with_few_seeds():
    t = churn_table(_synthetic(3), "cpu-1t").set_index("config")
    assert (t["verdict"] == "inconclusive").all()
    assert t["p_more"].isna().all()
    assert "too few" in t.loc["bad", "note"]
    # the numbers are still there
    assert t.loc["bad", "churn_mean"] > t.loc["bad", "floor_mean"]
    # and the seeds that would decide: every e_s of one sign, three configs under Holm, so the floor
    # log2(3 / 0.05) -> 6 seeds (1/2^6 < 0.05/3 < 1/2^5)
    assert t.loc["bad", "seeds_for"] == "more" and t.loc["bad", "seeds_needed"] == 6
    assert t.loc["rounding", "seeds_for"] == "less" and t.loc["rounding", "seeds_needed"] == 6
    assert "about 6 paired seeds for a verdict of 'more'" in t.loc["bad", "note"]
    # ... and they do: the same configs at 6 seeds are decided, and a decided row names no seeds
    t6 = churn_table(_synthetic(6), "cpu-1t").set_index("config")
    assert t6.loc["bad", "verdict"] == "more" and t6.loc["rounding", "verdict"] == "less"
    assert t6["seeds_needed"].isna().all() and (t6["seeds_for"] == "").all()


def test_churn_seeds_needed_floor_holm_and_noise():
    assert churn_seeds_needed([-0.03, -0.03, -0.031], 1) == (5.0, "less")  # 1/2^5 < 0.05
    assert churn_seeds_needed([-0.03, -0.03, -0.031], 6) == (7.0, "less")  # 1/2^7 < 0.05/6 < 1/2^6
    # noisy e: ((z(0.95) + z(0.8)) * sd / mean)^2 = (2.486 * 0.02 / 0.01)^2 = 24.7
    assert churn_seeds_needed([0.01, 0.03, -0.01], 1) == (25.0, "more")
    assert churn_seeds_needed([0.0, 0.0], 1) == (pytest.approx(float("nan"), nan_ok=True), "")
    assert math.isnan(churn_seeds_needed([-0.01], 1)[0])  # one value: no spread to plan from
    n, f = churn_seeds_needed([1e-6, -1e-6, 2e-9], 1)  # leans nowhere to speak of
    assert math.isnan(n) and f == "more"


def test_churn_seeds_needed_gives_the_power_it_plans_for():
    """Planned from seeds whose e have the true mean and sd (the pilot's estimation error aside),
    the sign-flip test at that many seeds decides in about 80% of studies."""
    rng = np.random.default_rng(5)
    mu = 0.5
    n, f = churn_seeds_needed([mu - 1, mu, mu + 1], 1)  # mean 0.5, sd 1
    assert (n, f) == (25, "more")  # ((1.645 + 0.842) / 0.5)^2 = 24.7
    hits = sum(signflip_p_greater(mu + rng.standard_normal(int(n)), rng_seed=i) < 0.05 for i in range(300))
    assert 0.70 <= hits / 300 <= 0.90


def test_churn_table_config_like_a_seed_is_not_more():
    # A config whose runs are just other seeds: churn ~ floor, never "more".
    rng = np.random.default_rng(1)
    truth = rng.integers(0, N_CLASSES, size=N_INPUTS)
    preds = {}
    for s in range(8):
        preds[("cpu-1t", s)] = _flip(truth, 0.05, rng)
        preds[("cpu-2t", s)] = _flip(truth, 0.05, rng)
    t = churn_table(preds, "cpu-1t")
    assert t.loc[0, "verdict"] == "inconclusive"
    assert t.loc[0, "ratio"] == pytest.approx(1.0, abs=0.15)


def test_churn_table_output_distance_and_pairs():
    rng = np.random.default_rng(2)
    base = rng.random((50, 8))
    outs = {}
    for s in range(6):
        ref = base + 0.01 * rng.standard_normal(base.shape)
        outs[("cpu-1t", s)] = ref
        outs[("gpu", s)] = ref + 0.1 * rng.standard_normal(base.shape)
    t = churn_table(outs, "cpu-1t", distance=output_distance)
    assert t.loc[0, "verdict"] == "more"
    pairs = churn_pairs(outs, "cpu-1t", distance=output_distance)
    assert (pairs["kind"] == "seed").sum() == 15 and (pairs["kind"] == "config").sum() == 6
    assert pairs.loc[pairs["kind"] == "config", "value"].mean() == pytest.approx(t.loc[0, "churn_mean"])
    assert pairs.loc[pairs["kind"] == "seed", "value"].mean() == pytest.approx(t.loc[0, "floor_mean"])


def test_churn_table_missing_seeds_and_reference():
    preds = _synthetic(6)
    del preds[("bad", 5)]
    t = churn_table(preds, "cpu-1t").set_index("config")
    assert t.loc["bad", "n"] == 5 and math.isnan(t.loc["bad", "churn_s5"])
    with pytest.raises(ValueError, match="reference"):
        churn_table(preds, "nope")
    one = churn_table({("cpu-1t", 0): [0, 1], ("x", 0): [1, 1]}, "cpu-1t")
    assert one.loc[0, "verdict"] == "inconclusive" and "no seed floor" in one.loc[0, "note"]


# --------------------------------------------------------------------------------------------------
# per-class family


def _finals(seeds: int = 6) -> pd.DataFrame:
    """3 classes; 'shift' loses 0.2 on class 1 only; 'same' is the reference bit for bit."""
    rng = np.random.default_rng(3)
    rows = []
    for s in range(seeds):
        base = 0.9 + 0.01 * rng.standard_normal(3)
        noise = 0.005 * rng.standard_normal(3)
        for config, delta in (("cpu-1t", 0 * base), ("same", 0 * base), ("shift", np.array([0, -0.2, 0]) + noise)):
            row = {"run_id": f"{config}-{s}", "config": config, "seed": s, "repeat": 0, "eval_accuracy": 0.9}
            row.update({f"eval_acc_class_{k}": float(base[k] + delta[k]) for k in range(3)})
            rows.append(row)
    # a repeat is ignored
    rows.append({"run_id": "x", "config": "shift", "seed": 0, "repeat": 1, "eval_accuracy": 0.9,
                 **{f"eval_acc_class_{k}": 0.0 for k in range(3)}})
    return pd.DataFrame(rows)


def test_per_class_table_one_family():
    t = per_class_table(_finals(), "cpu-1t")
    assert list(t.columns) == PER_CLASS_COLUMNS
    assert len(t) == 2 * 3  # configs x classes, one Holm family
    t = t.set_index(["config", "class"])
    assert t.loc[("shift", 1), "verdict"] == "differs"
    assert t.loc[("shift", 1), "diff"] == pytest.approx(-0.2, abs=0.01)
    assert t.loc[("shift", 0), "verdict"] == "inconclusive"
    assert t.loc[("shift", 2), "verdict"] == "inconclusive"
    assert (t.loc["same", "p"] == 1.0).all() and (t.loc["same", "verdict"] == "inconclusive").all()
    # Holm over the 6 rows: the smallest p is multiplied by 6
    p = t["p"].to_numpy()
    assert t["p_holm"].min() == pytest.approx(min(1.0, 6 * p.min()))
    # the paired test is scipy's ttest_rel
    from scipy.stats import ttest_rel
    f = _finals()
    f = f[f["repeat"] == 0]
    x = f[f.config == "shift"].sort_values("seed")["eval_acc_class_1"].to_numpy()
    y = f[f.config == "cpu-1t"].sort_values("seed")["eval_acc_class_1"].to_numpy()
    assert t.loc[("shift", 1), "p"] == pytest.approx(ttest_rel(x, y).pvalue)


def test_per_class_constant_difference_is_not_p_zero():
    f = pd.DataFrame([
        {"config": c, "seed": s, "eval_acc_class_0": 0.9 - (0.1 if c == "b" else 0.0)}
        for c in ("a", "b") for s in range(2)
    ])
    t = per_class_table(f, "a")
    assert t.loc[0, "p"] == pytest.approx(0.5)  # 2 / 2**2, not 0
    assert t.loc[0, "verdict"] == "inconclusive"
    one = per_class_table(f[f.seed == 0], "a")
    assert one.loc[0, "n"] == 1 and math.isnan(one.loc[0, "p"]) and one.loc[0, "verdict"] == "inconclusive"
