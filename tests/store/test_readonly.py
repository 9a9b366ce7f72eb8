"""A store that cannot be written: reading commands read it and leave nothing beside it; writing
commands refuse it with one line before anything is opened.

Permission bits do not stop root, so the unwritable cases are also simulated by making
``devicediff.store.sqlite._writable`` say no; the real ``chmod`` test runs for other users.
"""

from __future__ import annotations

import os
import stat

import pytest

from devicediff.analysis.load import load_results
from study_store import fill, make_study

from devicediff.errors import StoreError
from devicediff.store import SQLiteStore, open_store
from devicediff.store import sqlite as sqlite_mod


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def db(tmp_path):
    p = tmp_path / "s.db"
    with SQLiteStore(p) as s:
        fill(s, make_study("q", seeds=2))
    assert listing(tmp_path) == ["s.db"]
    return p


def test_readonly_reads_refuses_writes_and_leaves_no_side_files(db):
    s = open_store(str(db), readonly=True)
    assert len(s.runs()) == 4 and len(s.metrics()) > 0 and len(s.studies()) == 1
    with pytest.raises(StoreError, match="read-only"):
        s.put_study("x", "x", {})
    s.close()
    assert listing(db.parent) == ["s.db"]


def test_readonly_refuses_a_missing_file_and_creates_nothing(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        SQLiteStore(tmp_path / "missing.db", readonly=True)
    assert listing(tmp_path) == []


@pytest.fixture
def unwritable(monkeypatch):
    monkeypatch.setattr(sqlite_mod, "_writable", lambda p: False)


def test_an_unwritable_store_is_read_through_mode_ro_without_side_files(db, unwritable):
    with SQLiteStore(db, readonly=True) as s:
        assert len(s.runs()) == 4
        assert load_results(s, "q").verdicts is not None
    assert listing(db.parent) == ["s.db"]


def test_writing_an_unwritable_store_is_one_line_before_anything_is_opened(db, unwritable):
    before = db.read_bytes()
    with pytest.raises(StoreError) as e:
        SQLiteStore(db)
    assert "cannot be written" in str(e.value) and "\n" not in str(e.value) and "--store" in str(e.value)
    assert listing(db.parent) == ["s.db"] and db.read_bytes() == before
    with pytest.raises(StoreError, match="cannot be written"):
        SQLiteStore(db.parent / "new.db")
    assert listing(db.parent) == ["s.db"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permission bits do not stop root")
@pytest.mark.parametrize("what", ["file", "folder"])
def test_chmod_read_only_store(db, what):
    target = db if what == "file" else db.parent
    mode = target.stat().st_mode
    target.chmod(stat.S_IRUSR | (stat.S_IXUSR if what == "folder" else 0))
    try:
        with SQLiteStore(db, readonly=True) as s:
            assert len(s.runs()) == 4
        with pytest.raises(StoreError, match="cannot be written"):
            SQLiteStore(db)
        assert listing(db.parent) == ["s.db"]
    finally:
        target.chmod(mode)
