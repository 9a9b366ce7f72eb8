"""Conformance suite for the ``Store`` interface, run against every implementation
and mode (optuna-style: one set of tests, parametrized by store factory).

A new implementation passes when it is added to ``STORE_MODES``.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from devicediff.store import RunInfo, SQLiteStore, Store, StoreError, open_store
from devicediff.store.base import RUN_COLUMNS

STORE_MODES = ["sqlite-file", "sqlite-memory", "sqlite-url"]


@pytest.fixture(params=STORE_MODES)
def store(request, tmp_path) -> Store:
    if request.param == "sqlite-file":
        s = SQLiteStore(tmp_path / "s.db")
    elif request.param == "sqlite-memory":
        s = SQLiteStore(":memory:")
    else:
        s = open_store(f"sqlite:///{tmp_path / 'u.db'}")
    yield s
    s.close()


def info(run_id: str = "r1", study_id: str = "st", cell: str = "cpu|seed=0|rep=0", config: str = "cpu", seed: int = 0,
         machine: str = "m1") -> RunInfo:
    return RunInfo(run_id, study_id, cell, config, seed, seed, seed, 0, "autoencoder",
                   {"name": config, "threads": 1, "env": {}}, machine)


@pytest.fixture
def with_run(store):
    store.put_study("st", "study", {"workload": "autoencoder", "seeds": [0, 1]})
    store.begin_run(info(), log_path="/tmp/r1.log")
    return store


# -- studies -------------------------------------------------------------------------------------------


def test_put_study_is_idempotent_and_keeps_the_definition(store):
    store.put_study("st", "study", {"a": 1, "nested": {"b": [1, 2]}})
    store.put_study("st", "study", {"a": 1, "nested": {"b": [1, 2]}})
    df = store.studies()
    assert list(df.columns[:3]) == ["study_id", "name", "definition"] and "created" in df.columns
    assert len(df) == 1 and df["definition"][0] == {"a": 1, "nested": {"b": [1, 2]}}


def test_an_empty_store_has_empty_frames_with_columns(store):
    assert store.studies().empty and store.runs().empty
    assert list(store.runs().columns) == list(RUN_COLUMNS)
    for frame, cols in ((store.metrics(), ["run_id", "step", "name", "value"]),
                        (store.weights(), ["run_id", "step", "sha256", "path"]),
                        (store.artifacts(), ["run_id", "name", "path"])):
        assert frame.empty and list(frame.columns) == cols
    assert store.analyses().empty


# -- runs ------------------------------------------------------------------------------------------------


def test_begin_run_inserts_a_running_run_with_every_column(with_run):
    runs = with_run.runs()
    assert list(runs.columns) == list(RUN_COLUMNS)
    r = runs.iloc[0]
    assert (r["run_id"], r["study_id"], r["config"], r["state"], r["attempts"]) == ("r1", "st", "cpu", "running", 1)
    assert r["config_json"] == {"name": "cpu", "threads": 1, "env": {}}  # JSON decoded
    assert r["log_path"] == "/tmp/r1.log" and r["machine"] == "m1"
    assert with_run.unfinished("st") == ["r1"]


def test_begin_run_again_marks_it_running_and_counts_the_attempt(with_run):
    with_run.update_run("r1", state="failed", error="boom", final_sha256="abc")
    with_run.begin_run(info(), log_path="/tmp/r1b.log")
    r = with_run.runs().iloc[0]
    assert (r["state"], r["attempts"], r["log_path"]) == ("running", 2, "/tmp/r1b.log")
    assert r["error"] is None or (isinstance(r["error"], float) and math.isnan(r["error"]))
    assert len(with_run.runs()) == 1


def test_update_run_sets_fields_and_json_round_trips(with_run):
    with_run.update_run("r1", fingerprint={"cpu": "x", "gpus": ["a"]}, effective={"threads": 2}, wall_time=1.5)
    r = with_run.runs().iloc[0]
    assert r["fingerprint"] == {"cpu": "x", "gpus": ["a"]} and r["effective"] == {"threads": 2} and r["wall_time"] == 1.5


def test_update_run_refuses_unknown_fields(with_run):
    with pytest.raises(ValueError, match="unknown run fields"):
        with_run.update_run("r1", colour="red")


def test_a_final_state_stamps_finished_at(with_run):
    assert pd.isna(with_run.runs().iloc[0]["finished_at"])
    with_run.update_run("r1", state="finished")
    assert not pd.isna(with_run.runs().iloc[0]["finished_at"])


def test_runs_filter_by_study(with_run):
    with_run.put_study("other", "other", {})
    with_run.begin_run(info("r2", study_id="other"))
    assert list(with_run.runs("st")["run_id"]) == ["r1"]
    assert list(with_run.runs("other")["run_id"]) == ["r2"]
    assert len(with_run.runs()) == 2


# -- metrics, weights, artifacts ---------------------------------------------------------------------------------


def test_a_repeated_metric_key_replaces_never_duplicates(with_run):
    with_run.add_metrics("r1", [[0, "loss", 1.0], [1, "loss", 0.5], [1, "eval", 0.7]])
    with_run.add_metrics("r1", [[1, "loss", 0.25]])
    m = with_run.metrics()
    assert list(m.columns) == ["run_id", "step", "name", "value"]
    assert len(m) == 3 and not m.duplicated(["run_id", "step", "name"]).any()
    assert m.set_index(["step", "name"]).loc[(1, "loss"), "value"] == 0.25


def test_metric_values_keep_nan_and_inf(with_run):
    with_run.add_metrics("r1", [[0, "loss", float("inf")], [1, "loss", float("nan")]])
    v = with_run.metrics().set_index("step")["value"]
    assert v[0] == float("inf") and (v[1] is None or math.isnan(v[1]))


def test_frames_filter_by_run_ids_including_none_and_many(with_run):
    with_run.begin_run(info("r2", cell="gpu|seed=0|rep=0"))
    with_run.add_metrics("r1", [[0, "loss", 1.0]])
    with_run.add_metrics("r2", [[0, "loss", 2.0]])
    assert list(with_run.metrics(["r2"])["value"]) == [2.0]
    assert with_run.metrics([]).empty
    many = [f"x{i}" for i in range(1200)] + ["r1"]  # beyond SQLite's variable limit per query
    assert list(with_run.metrics(many)["run_id"]) == ["r1"]


def test_weights_and_artifacts(with_run):
    with_run.add_weights("r1", 0, "aa", "/w0.npy")
    with_run.add_weights("r1", 0, "bb", None)  # same key: replaced
    with_run.add_weights("r1", 10, "cc", "/w10.npy")
    with_run.add_artifact("r1", "grid", "/g.png")
    with_run.add_artifact("r1", "grid", "/g2.png")
    w = with_run.weights(["r1"])
    assert list(w["step"]) == [0, 10] and list(w["sha256"]) == ["bb", "cc"]
    a = with_run.artifacts()
    assert list(a["path"]) == ["/g2.png"]


# -- records ---------------------------------------------------------------------------------------------------


def test_record_applies_every_stored_kind(with_run):
    recs = [
        {"kind": "started", "pid": 1},
        {"kind": "env", "fingerprint": {"cpu_model": "x"}},
        {"kind": "effective", "settings": {"torch_threads": 1}},
        {"kind": "init", "sha256": "i0"},
        {"kind": "metrics", "rows": [[0, "eval_loss", 0.3], [10, "train_loss", 0.2]]},
        {"kind": "weights", "step": 10, "sha256": "w10", "path": None},
        {"kind": "artifact", "name": "png", "path": "/p.png"},
        {"kind": "progress", "step": 10, "total": 10},
        {"kind": "lockstep", "step": 1, "rows": []},
        {"kind": "something-new", "x": 1},  # unknown kinds are ignored
        {"kind": "done", "state": "finished", "final_sha256": "f", "wall_time": 2.0, "train_time": 1.0,
         "threads_used": {"available": 1}},
    ]
    for rec in recs:
        with_run.record("r1", rec)
    r = with_run.runs().iloc[0]
    assert r["fingerprint"] == {"cpu_model": "x"} and r["effective"] == {"torch_threads": 1}
    assert (r["init_sha256"], r["final_sha256"], r["state"], r["train_time"]) == ("i0", "f", "finished", 1.0)
    assert r["threads_used"] == {"available": 1}
    assert len(with_run.metrics()) == 2 and len(with_run.weights()) == 1 and len(with_run.artifacts()) == 1
    assert with_run.unfinished("st") == []


def test_a_done_record_with_a_strange_state_is_a_failure(with_run):
    with_run.record("r1", {"kind": "done", "state": "exploded", "error": "?"})
    assert with_run.runs().iloc[0]["state"] == "failed"
    with_run.record("r1", {"kind": "done"})
    assert with_run.runs().iloc[0]["state"] == "failed"


# -- analyses ---------------------------------------------------------------------------------------------------------


def test_analyses_are_keyed_and_replaced(store):
    store.put_study("st", "s", {})
    store.put_analysis("st", "diverge", "a|b", {"step": 3})
    store.put_analysis("st", "diverge", "a|b", {"step": 4})
    store.put_analysis("st", "other", "k", {"x": 1})
    assert len(store.analyses()) == 2
    d = store.analyses("st", "diverge")
    assert len(d) == 1 and d["payload"][0] == {"step": 4}
    assert store.analyses("nope").empty


# -- file stores only ----------------------------------------------------------------------------------------------------


def test_a_file_store_survives_reopening(tmp_path):
    p = tmp_path / "r.db"
    with SQLiteStore(p) as s:
        s.put_study("st", "study", {"k": 1})
        s.begin_run(info())
        s.add_metrics("r1", [[0, "loss", 1.0]])
    with SQLiteStore(p, create=False) as s:
        assert len(s.runs()) == 1 and len(s.metrics()) == 1 and s.integrity_check() == "ok"
        assert s.studies()["definition"][0] == {"k": 1}


def test_create_false_refuses_a_missing_file(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        SQLiteStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_a_write_blocked_by_another_process_is_a_one_line_store_error(tmp_path):
    p = tmp_path / "l.db"
    SQLiteStore(p).close()
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        s = SQLiteStore(p, timeout=0.2)  # reading is fine while another process writes (WAL)
        with pytest.raises(StoreError, match="locked by another process") as e:
            s.put_study("st", "s", {})
        assert "\n" not in str(e.value)
        s.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_failed_transaction_leaves_nothing(tmp_path):
    p = tmp_path / "t.db"
    with SQLiteStore(p) as s:
        s.put_study("st", "s", {})
        with pytest.raises(sqlite3.IntegrityError):
            s.begin_run(info(study_id="no-such-study"))  # foreign key
        assert s.runs().empty
        s.put_study("st2", "s2", {})  # and the connection is still usable
        assert len(s.studies()) == 2


def test_unused_path_is_untouched_by_a_directory_error(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        SQLiteStore(tmp_path)
    assert list(Path(tmp_path).iterdir()) == []
