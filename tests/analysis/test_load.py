"""The one read side (``devicediff.analysis.load``): what status, run's table, the report and
notebooks read, from one loader."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "tests" / "store"))
from study_store import fill, make_study  # noqa: E402

import devicediff  # noqa: E402
from devicediff.analysis.load import Results, load_results, verdicts  # noqa: E402
from devicediff.errors import UsageError  # noqa: E402
from devicediff.store import SQLiteStore  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "s.db")
    fill(s, make_study("q"), failed=(("cpu-2t", 2),))
    yield s
    s.close()


def test_one_loader_gives_runs_metrics_finals_and_verdicts(store):
    r = load_results(store, "q")
    assert isinstance(r, Results) and r.name == "q" and r.reference == "cpu-1t" and r.order == ["cpu-1t", "cpu-2t"]
    assert len(r.runs) == 6 and set(r.runs["base_config"]) == {"cpu-1t", "cpu-2t"}
    assert set(r.metrics["name"]) == {"train_loss", "eval_loss"}
    fin = r.finished.set_index(["config", "seed"])
    assert len(fin) == 5 and fin.loc[("cpu-2t", 1), "final_eval_loss"] == pytest.approx(1.6)
    assert r.headline == "final_eval_loss" and r.primary == ["final_eval_loss"]
    v = r.verdicts.set_index(["config", "metric"])
    assert v.loc[("cpu-2t", "final_eval_loss"), "verdict"] == "differs" and v.loc[("cpu-2t", "final_eval_loss"), "n"] == 2
    with pytest.raises(Exception):
        r.name = "other"  # frozen


def test_verdicts_can_be_skipped_and_problems_are_said(store, tmp_path):
    assert load_results(store, "q", verdicts=False).verdicts is None
    with SQLiteStore(tmp_path / "one.db") as s:
        fill(s, make_study("solo", configs=("cpu-1t",)))
        r = load_results(s, "solo")
    assert r.verdicts is None and "fewer than two configs" in r.verdict_problem


def test_a_study_by_object_id_name_or_row_is_the_same_study(store):
    st = make_study("q")
    ids = {load_results(store, x, verdicts=False).study_id
           for x in (st, st.study_id, "q", store.studies().iloc[0])}
    assert ids == {st.study_id}
    with pytest.raises(UsageError, match="no study 'nope'.*it holds: q"):
        load_results(store, "nope")


def test_a_name_shared_by_two_stored_studies_asks_for_an_id(tmp_path):
    import sqlite3

    db = tmp_path / "two.db"
    with SQLiteStore(db) as s:
        fill(s, make_study("q"))
    con = sqlite3.connect(db)  # as an older devicediff (or a merge) could leave it
    with con:
        con.execute("INSERT INTO studies VALUES ('other-id', 'q', '{}', 0)")
    con.close()
    with SQLiteStore(db) as s, pytest.raises(UsageError, match="names 2 studies.*other-id"):
        load_results(s, "q")


def test_the_report_reads_the_same_verdicts(store):
    from devicediff.report import analyse
    from devicediff.report import data as report_data

    assert not hasattr(report_data, "load_study")  # load_study means the TOML parser only
    d = report_data.load_report_data(store, "q")
    pd.testing.assert_frame_equal(d.verdicts, load_results(store, "q").verdicts)
    pd.testing.assert_frame_equal(analyse(d).verdicts, d.verdicts)
    assert len(d.weights.columns) and "payload" in d.analyses.columns


def test_notebook_api(store):
    with devicediff.open_store(store.path, readonly=True) as s:
        runs, metrics, v = s.runs(), s.metrics(), s.verdicts()
    assert isinstance(runs, pd.DataFrame) and len(runs) == 6 and len(metrics) == 6 * 7 - 7  # the failed run has none
    assert list(v.columns[:2]) == ["study", "study_id"] and set(v["study"]) == {"q"}
    pd.testing.assert_frame_equal(v.drop(columns=["study", "study_id"]), load_results(store, "q").verdicts)
    pd.testing.assert_frame_equal(verdicts(store, "q"), v)


def test_machines_are_kept_apart(tmp_path):
    with SQLiteStore(tmp_path / "m.db") as s:
        st = make_study("q", seeds=2)
        fill(s, st, machine="aaaaaaaa")
        fill(s, st, machine="bbbbbbbb")
        r = load_results(s, st)
    assert r.by_machine and r.reference == "cpu-1t@aaaaaa" and len(r.machines) == 2
    assert r.order == ["cpu-1t@aaaaaa", "cpu-1t@bbbbbb", "cpu-2t@aaaaaa", "cpu-2t@bbbbbb"]


def test_real_runs(tmp_path):
    """A tiny real study, trained through run_study: the loader reads what the runner wrote."""
    from devicediff.executors import LocalExecutor
    from devicediff.runner import run_study
    from devicediff.study import load_study

    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(name="tiny", seeds=2).replace("train_size = 1000", "train_size = 200")
                 .replace("eval_size = 500", "eval_size = 100"))
    study = load_study(p)
    with SQLiteStore(tmp_path / "r.db") as s:
        run_study(study, s, store_path=str(tmp_path / "r.db"), executor=LocalExecutor(jobs=1))
        r = load_results(s, study)
    assert len(r.finished) == 4 and r.finished["final_eval_loss"].notna().all()
    assert r.verdicts is not None and set(r.verdicts["config"]) == {"cpu-2t"}
