"""devicediff.analysis.curves: mean curves, differences to the reference, weight distances.

Intervals are pinned to scipy: ``scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=sem)`` for the
mean band and the paired difference, ``scipy.stats.ttest_ind(x, y, equal_var=False)
.confidence_interval(0.95)`` for the unpaired (Welch) difference.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from devicediff.analysis.curves import (
    difference_curves,
    load_snapshot,
    mean_curves,
    weight_distance_summary,
    weight_distances,
)


def long_frame(values: dict[str, dict[int, list[float]]], repeat_rows=()) -> pd.DataFrame:
    """{config: {step: [value per seed]}} -> the long frame of frames.curves."""
    rows = []
    for cfg, by_step in values.items():
        for step, vals in by_step.items():
            for seed, v in enumerate(vals):
                rows.append({"config": cfg, "seed": seed, "repeat": 0, "run_id": f"{cfg}-{seed}", "step": step, "value": v})
    for cfg, seed, step, v in repeat_rows:
        rows.append({"config": cfg, "seed": seed, "repeat": 1, "run_id": f"{cfg}-{seed}-r", "step": step, "value": v})
    return pd.DataFrame(rows)


REF = [0.50, 0.53, 0.48, 0.55, 0.51]
CFG = [0.52, 0.56, 0.49, 0.58, 0.52]


def test_mean_band_is_the_t_interval_of_the_mean():
    df = long_frame({"ref": {10: REF}, "cfg": {10: CFG}}, repeat_rows=[("ref", 0, 10, 99.0)])
    m = mean_curves(df).set_index("config")
    lo, hi = stats.t.interval(0.95, len(REF) - 1, loc=np.mean(REF), scale=stats.sem(REF))
    r = m.loc["ref"]
    assert r["n"] == 5  # the repeat (99.0) is not a seed
    assert r["mean"] == pytest.approx(np.mean(REF), rel=1e-12)
    assert r["sd"] == pytest.approx(np.std(REF, ddof=1), rel=1e-12)
    assert (r["lo"], r["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert list(m.index) == ["ref", "cfg"]  # first appearance


def test_mean_band_edge_cases_one_seed_identical_values_and_nan():
    df = long_frame({"a": {0: [0.3], 10: [0.2, 0.2, 0.2]}, "b": {10: [0.1, float("nan"), 0.3]}})
    m = mean_curves(df, order=["b", "a"])
    assert list(pd.unique(m["config"])) == ["b", "a"]
    one = m[(m["config"] == "a") & (m["step"] == 0)].iloc[0]
    assert one["n"] == 1 and one["mean"] == 0.3 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    same = m[(m["config"] == "a") & (m["step"] == 10)].iloc[0]
    assert same["mean"] == 0.2 and same["lo"] == same["hi"] == 0.2  # exactly, not 0.2 +- an ulp
    nan = m[m["config"] == "b"].iloc[0]
    assert nan["n"] == 2 and nan["n_nan"] == 1 and nan["mean"] == pytest.approx(0.2)


def test_paired_difference_and_relative_columns():
    df = long_frame({"ref": {10: REF, 20: REF}, "cfg": {10: CFG, 20: REF}})
    d = difference_curves(df, "ref")
    assert set(d["config"]) == {"cfg"}
    r = d[d["step"] == 10].iloc[0]
    diffs = np.array(CFG) - np.array(REF)
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert bool(r["paired"]) and r["n"] == 5
    assert r["diff"] == pytest.approx(diffs.mean(), rel=1e-12)
    assert (r["lo"], r["hi"]) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
    assert r["rel_diff"] == pytest.approx(diffs.mean() / np.mean(REF), rel=1e-12)
    assert r["ref_sd"] == pytest.approx(np.std(REF, ddof=1), rel=1e-12)
    zero = d[d["step"] == 20].iloc[0]
    assert zero["diff"] == 0 and zero["lo"] == 0 and zero["hi"] == 0  # identical runs: exactly 0


def test_unpaired_difference_is_welch():
    ref = pd.DataFrame({"config": "ref", "seed": [0, 1, 2, 3], "repeat": 0, "step": 5, "value": REF[:4]})
    cfg = pd.DataFrame({"config": "cfg", "seed": [10, 11, 12, 13, 14], "repeat": 0, "step": 5, "value": CFG})
    d = difference_curves(pd.concat([ref, cfg]), "ref").iloc[0]
    ci = stats.ttest_ind(CFG, REF[:4], equal_var=False).confidence_interval(0.95)
    assert not d["paired"]
    assert d["diff"] == pytest.approx(np.mean(CFG) - np.mean(REF[:4]), rel=1e-12)
    assert (d["lo"], d["hi"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_difference_without_reference_is_empty_with_columns():
    d = difference_curves(long_frame({"cfg": {1: [1.0, 2.0]}}), "ref")
    assert d.empty and "rel_diff" in d.columns


# ---- weight distances ---------------------------------------------------------------------------


def snap(tmp_path, name, arr):
    p = tmp_path / f"{name}.npy"
    np.save(p, np.asarray(arr, dtype=np.float64))
    return str(p)


@pytest.fixture
def wd_inputs(tmp_path):
    w0 = np.array([3.0, 4.0, 0.0])
    runs = pd.DataFrame([
        {"run_id": "r0", "config": "ref", "seed": 0, "repeat": 0},
        {"run_id": "r0b", "config": "ref", "seed": 0, "repeat": 1},  # a bitwise-equal repeat
        {"run_id": "c0", "config": "cfg", "seed": 0, "repeat": 0},
        {"run_id": "h0", "config": "hashonly", "seed": 0, "repeat": 0},
        {"run_id": "x9", "config": "cfg", "seed": 9, "repeat": 0},  # no reference run for seed 9
    ])
    rows = []
    for rid in ("r0", "r0b", "c0", "h0", "x9"):
        rows.append({"run_id": rid, "step": 0, "sha256": "init", "path": snap(tmp_path, f"{rid}_0", w0)})
    rows.append({"run_id": "r0", "step": 10, "sha256": "A", "path": snap(tmp_path, "r0_10", w0)})
    rows.append({"run_id": "r0b", "step": 10, "sha256": "A", "path": None})
    rows.append({"run_id": "c0", "step": 10, "sha256": "B", "path": snap(tmp_path, "c0_10", w0 + [0.0, 0.0, 0.5])})
    rows.append({"run_id": "h0", "step": 10, "sha256": "C", "path": str(tmp_path / "gone.npy")})
    rows.append({"run_id": "x9", "step": 10, "sha256": "D", "path": None})
    return runs, pd.DataFrame(rows)


def test_weight_distances_from_snapshots_and_hashes(wd_inputs):
    runs, weights = wd_inputs
    wd = weight_distances(runs, weights, "ref")
    assert set(wd["run_id"]) == {"r0b", "c0", "h0"}  # not the anchor itself, not the seed without one
    at0 = wd[wd["step"] == 0]
    assert at0["equal"].all() and (at0["rel"] == 0).all()
    c = wd[(wd["run_id"] == "c0") & (wd["step"] == 10)].iloc[0]
    assert not c["equal"] and c["source"] == "snapshot"
    assert c["l2"] == 0.5 and c["rel"] == pytest.approx(0.5 / 5.0)  # ||(0,0,.5)|| / ||(3,4,0)||
    rep = wd[(wd["run_id"] == "r0b") & (wd["step"] == 10)].iloc[0]
    assert rep["equal"] and rep["l2"] == 0  # equal hashes need no file
    h = wd[(wd["run_id"] == "h0") & (wd["step"] == 10)].iloc[0]
    assert not h["equal"] and h["source"] == "hash" and math.isnan(h["rel"])
    assert list(pd.unique(wd["config"])) == ["ref", "cfg", "hashonly"]

    s = weight_distance_summary(wd).set_index(["config", "step"])
    assert s.loc[("cfg", 10), "n_equal"] == 0 and s.loc[("cfg", 10), "median_rel"] == pytest.approx(0.1)
    assert s.loc[("hashonly", 10), "n_known"] == 0 and math.isnan(s.loc[("hashonly", 10), "median_rel"])
    assert s.loc[("ref", 10), "n_equal"] == 1


def test_weight_distances_empty_inputs():
    runs = pd.DataFrame({"run_id": ["a"], "config": ["ref"], "seed": [0]})
    assert weight_distances(runs, pd.DataFrame(columns=["run_id", "step", "sha256", "path"]), "ref").empty
    assert weight_distance_summary(weight_distances(runs.iloc[:0], pd.DataFrame(), "ref")).empty


def test_load_snapshot_missing_or_bad(tmp_path):
    assert load_snapshot(str(tmp_path / "nope.npy")) is None
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    assert load_snapshot(str(bad)) is None
    assert load_snapshot(None) is None
    good = snap(tmp_path, "g", np.arange(6, dtype=np.float32).reshape(2, 3))
    a = load_snapshot(good)
    assert a.dtype == np.float64 and a.shape == (6,)
