"""``devicediff export``: runs and metrics as flat tables."""

from __future__ import annotations

import json
import sqlite3
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, devicediff

sys.path.insert(0, str(ROOT / "tests" / "store"))
from study_store import fill, make_study  # noqa: E402

from devicediff.errors import UsageError  # noqa: E402
from devicediff.export import export  # noqa: E402
from devicediff.store import SQLiteStore  # noqa: E402


@pytest.fixture
def db(tmp_path):
    p = tmp_path / "s.db"
    with SQLiteStore(p) as s:
        fill(s, make_study("q", seeds=2))
    return p


def test_runs_carry_study_id_parameters_and_final_eval_values(db, tmp_path):
    with SQLiteStore(db, readonly=True) as s:
        export(s, tmp_path / "ex")
    runs = pd.read_csv(tmp_path / "ex" / "runs.csv")
    for c in ("study_id", "study", "definition_hash", "workload_params", "final_eval_loss"):
        assert c in runs.columns, c
    assert "final_train_loss" not in runs.columns  # eval metrics only
    got = runs.set_index(["config", "seed"])["final_eval_loss"].to_dict()
    assert got == pytest.approx({("cpu-1t", 0): 1.0, ("cpu-1t", 1): 1.1, ("cpu-2t", 0): 1.5, ("cpu-2t", 1): 1.6})
    assert json.loads(runs["workload_params"][0]) == {"sizes": [8, 4]}


def test_two_studies_under_one_name_never_collide(db, tmp_path):
    other = make_study("q", seeds=2, train_size=3000)
    con = sqlite3.connect(db)  # a store merged from before names were checked can hold both
    with con:
        con.execute("INSERT INTO studies VALUES (?, 'q', ?, 0)", (other.study_id, json.dumps(other.to_dict())))
    con.close()
    with SQLiteStore(db) as s:
        s.check_study = lambda *a: None  # let the second definition in, as such a store has it
        fill(s, other)
        export(s, tmp_path / "ex")
    runs = pd.read_csv(tmp_path / "ex" / "runs.csv")
    assert len(runs) == 8 and runs.duplicated(["study", "config", "seed"]).any()
    assert not runs.duplicated(["study_id", "config", "seed", "repeat", "machine"]).any()
    assert runs.groupby("study_id")["definition_hash"].nunique().eq(1).all() and runs["definition_hash"].nunique() == 2


def test_out_onto_an_existing_file_is_one_line_and_leaves_it(db, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with SQLiteStore(db) as s, pytest.raises(UsageError, match="exists and is not a folder"):
        export(s, f)
    assert f.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == before
    r = devicediff("export", "--store", str(db), "--format", "csv", "--out", str(f))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("devicediff: error: --out")
    assert f.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_folder_that_cannot_be_made_leaves_nothing(db, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with SQLiteStore(db) as s, pytest.raises(UsageError, match="cannot create the folder"):
        export(s, f / "sub" / "deeper")
    assert f.read_text() == "x"


def test_a_failed_write_takes_back_what_it_made(db, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with SQLiteStore(db) as s, pytest.raises(UsageError, match="No space left"):
        export(s, tmp_path / "new" / "ex")
    assert not (tmp_path / "new").exists()


# -- verdicts.csv ------------------------------------------------------------------------------


def _noisy_study(store, seeds: int = 6):
    """A PredNet study of 4 configs with made-up finals: eval_mse (the primary, declared by the
    workload), eval_ssim and eval_psnr (secondary), baseline_mse (a check); config shifts of
    0, 0.5 and 3 seed-noise sds."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "analysis"))
    from verdict_stores import fill_metrics

    from devicediff.study import parse_study

    st = parse_study({"name": "gen", "reference": "c0", "workload": {"name": "prednet"}, "seeds": {"count": seeds},
                      "budget": {"epochs": 1}, "configs": [{"name": f"c{i}", "threads": i + 1} for i in range(4)]})
    rng = np.random.default_rng(11)
    seed_fx = rng.normal(0, 1, (seeds, 3))
    own = rng.normal(0, 0.4, (4, seeds, 3))
    shift = {0: 0.0, 1: 0.0, 2: 0.5, 3: 3.0}

    def metrics(cfg, seed):
        i = int(cfg[1:])
        v = seed_fx[seed] + own[i, seed] + shift[i]
        return {"eval_mse": 0.02 + 1e-3 * v[0], "eval_ssim": 0.7 + 0.01 * v[1], "eval_psnr": 20 + 0.5 * v[2],
                "baseline_mse": 0.0356}

    fill_metrics(store, st, metrics)
    return st


def test_verdicts_csv_matches_scipy_and_statsmodels(tmp_path):
    import numpy as np
    from scipy import stats
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.weightstats import ttost_paired

    from devicediff.export import VERDICT_EXPORT

    db = tmp_path / "g.db"
    with SQLiteStore(db) as s:
        _noisy_study(s)
        finals = s.metrics()
        runs = s.runs()
        export(s, tmp_path / "ex")
    v = pd.read_csv(tmp_path / "ex" / "verdicts.csv")
    assert list(v.columns) == VERDICT_EXPORT
    assert set(v["role"]) == {"primary", "secondary", "check"}
    assert (v.loc[v["role"] == "check", "verdict"] == "same on every run: yes").all()
    last = finals.merge(runs[["run_id", "config", "seed"]], on="run_id")
    tested = v[v["role"] != "check"]
    expect = []
    for _, r in tested.iterrows():
        vals = last[last["name"] == r["metric"].removeprefix("final_")].pivot(index="seed", columns="config",
                                                                              values="value")
        x, y = vals[r["config"]].to_numpy(), vals["c0"].to_numpy()
        res = stats.ttest_rel(x, y)  # scipy's paired t and its t interval
        ci95, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
        d = x - y
        half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
        tost = ttost_paired(x, y, -r["margin"], r["margin"])[0]  # statsmodels TOST, p = max of the sides
        expect.append({"ci95_low": ci95.low, "ci95_high": ci95.high, "ci90_low": ci90.low, "ci90_high": ci90.high,
                       "p": res.pvalue, "tost_p": tost, "half": half, "diff": d.mean(), "n": d.size})
    e = pd.DataFrame(expect, index=tested.index)
    for c in ("ci95_low", "ci95_high", "ci90_low", "ci90_high", "p", "diff"):
        np.testing.assert_allclose(tested[c], e[c], rtol=1e-9, atol=1e-15, err_msg=c)
    np.testing.assert_allclose(tested["ci95_high"] - tested["diff"], e["half"], rtol=1e-9)
    assert (tested["n"] == e["n"]).all()
    # Holm within each family (primary; secondary), for the difference p and the TOST p separately
    for role in ("primary", "secondary"):
        fam = tested["role"] == role
        assert fam.sum() == (3 if role == "primary" else 6)
        np.testing.assert_allclose(tested.loc[fam, "p_adj"], multipletests(e.loc[fam, "p"], method="holm")[1],
                                   rtol=1e-9, err_msg=role)
        np.testing.assert_allclose(tested.loc[fam, "tost_p_adj"],
                                   multipletests(e.loc[fam, "tost_p"], method="holm")[1], rtol=1e-9, err_msg=role)
    # the verdict rule on those numbers
    want = np.where(tested["p_adj"] < 0.05, "differs", np.where(tested["tost_p_adj"] < 0.05, "equivalent",
                                                                  "inconclusive"))
    assert list(tested["verdict"]) == list(want)
    assert "differs" in set(tested.loc[tested["config"] == "c3", "verdict"])


def test_verdicts_csv_is_the_loaders_table(tmp_path):
    from devicediff.analysis.load import load_results

    with SQLiteStore(tmp_path / "g.db") as s:
        _noisy_study(s, seeds=4)
        export(s, tmp_path / "ex")
        v = load_results(s, "gen").verdicts
    got = pd.read_csv(tmp_path / "ex" / "verdicts.csv")
    assert list(got["config"]) == list(v["config"]) and list(got["verdict"]) == list(v["verdict"])
    np.testing.assert_array_equal(got["p_adj"].to_numpy(), v["p_adj"].to_numpy(dtype=float))


def test_churn_is_exported_when_runs_saved_predictions(tmp_path):
    """Issue 16: the export holds the churn against the seed-churn floor, per config."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "report"))
    from predictions_synth import make_store

    from devicediff.export import export

    store = make_store(tmp_path / "p.db", tmp_path / "files")
    try:
        paths = export(store, tmp_path / "out")
    finally:
        store.close()
    assert [p.name for p in paths] == ["runs.csv", "metrics.csv", "verdicts.csv", "churn.csv"]
    churn = pd.read_csv(tmp_path / "out" / "churn.csv")
    assert {"study", "config", "churn_mean", "floor_mean", "verdict"} <= set(churn.columns)
    assert len(churn) >= 1 and churn["floor_mean"].gt(0).all()
