"""``devicediff export``: runs and metrics as flat tables."""

from __future__ import annotations

import json
import sqlite3
import sys

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
