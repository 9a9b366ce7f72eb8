"""SQLite implementation of the store: one file, WAL journal, one writer."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from devicediff.protocol import RUNNING
from devicediff.store.base import JSON_COLUMNS, RUN_COLUMNS, RunInfo, Store, StoreError, dumps, loads

SCHEMA_VERSION = 1
APP_ID = 0x44444946  # "DDIF" in PRAGMA application_id marks a devicediff store

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY, name TEXT NOT NULL, definition TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, study_id TEXT NOT NULL REFERENCES studies(study_id), cell_key TEXT NOT NULL,
    config TEXT NOT NULL, seed INTEGER NOT NULL, init_seed INTEGER NOT NULL, data_seed INTEGER NOT NULL,
    repeat INTEGER NOT NULL, workload TEXT NOT NULL, config_json TEXT NOT NULL, machine TEXT NOT NULL,
    state TEXT NOT NULL, error TEXT, fingerprint TEXT, effective TEXT, init_sha256 TEXT, final_sha256 TEXT,
    wall_time REAL, train_time REAL, threads_used TEXT, attempts INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL, finished_at REAL, log_path TEXT,
    UNIQUE (study_id, cell_key, machine));
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, step, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS weights (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT,
    PRIMARY KEY (run_id, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (run_id, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analyses (
    study_id TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, created REAL NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (study_id, kind, key));
"""
TABLES = {"meta", "studies", "runs", "metrics", "weights", "artifacts", "analyses"}


class SQLiteStore(Store):
    """``SQLiteStore(path)``; ``path=":memory:"`` for a throw-away store.

    Opening checks that the file is a devicediff store of a schema this version
    understands; a foreign, corrupt, newer or locked file raises ``StoreError``
    and is left untouched. ``create=False`` refuses to create a new file.
    """

    def __init__(self, path: str | Path = "devicediff.db", *, create: bool = True, timeout: float = 5.0):
        self.path = str(path)
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(f"store {self.path}: is a directory; give a file path such as {p / 'devicediff.db'}")
            if not p.exists() and not create:
                raise StoreError(f"store {self.path}: no such file; run a study first or check --store")
            if p.exists() and p.stat().st_size > 0:
                with open(p, "rb") as f:
                    if f.read(16) != b"SQLite format 3\x00":
                        raise StoreError(f"store {self.path}: not an SQLite file (corrupt or foreign); move it away or choose another --store")
            if not p.parent.exists():
                raise StoreError(f"store {self.path}: folder {p.parent} does not exist")
        self._db = None
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._check_and_init()
        except (sqlite3.Error, StoreError) as e:
            if self._db is not None:
                self._db.close()
            if isinstance(e, StoreError):
                raise
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise StoreError(f"store {self.path}: locked by another process; wait for it to finish or use another --store") from None
            if isinstance(e, sqlite3.OperationalError):
                raise StoreError(f"store {self.path}: cannot open ({msg})") from None
            raise StoreError(f"store {self.path}: unreadable SQLite file ({e}); move it away or choose another --store") from None

    # -- schema --------------------------------------------------------------------------
    def _check_and_init(self) -> None:
        db = self._db
        existing = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if existing and app_id != APP_ID:
            raise StoreError(
                f"store {self.path}: an SQLite database that devicediff did not write (tables {sorted(existing)[:4]}); choose another --store"
            )
        if existing:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path}: written by a newer devicediff (schema {version} > {SCHEMA_VERSION}); upgrade devicediff to read it"
                )
            if version < SCHEMA_VERSION:
                raise StoreError(f"store {self.path}: schema {version} is too old for this devicediff ({SCHEMA_VERSION})")
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        if not existing:
            with self._tx():
                for stmt in SCHEMA.strip().split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA application_id={APP_ID}")
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _error(self, e: sqlite3.Error) -> StoreError:
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            return StoreError(f"store {self.path}: locked by another process; wait for it to finish or use another --store")
        if isinstance(e, sqlite3.OperationalError):
            return StoreError(f"store {self.path}: cannot write ({msg})")
        return StoreError(f"store {self.path}: unreadable SQLite file ({msg}); move it away or choose another --store")

    @contextmanager
    def _tx(self):
        """One write transaction; a lock held elsewhere or a failed write is a one-line ``StoreError``."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._error(e) from None
        try:
            yield
        except BaseException as exc:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.OperationalError):
                raise self._error(exc) from None
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._error(e) from None

    # -- studies ---------------------------------------------------------------------------
    def put_study(self, study_id: str, name: str, definition: dict) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO studies VALUES (?, ?, ?, ?)", (study_id, name, dumps(definition), time.time())
            )

    def studies(self) -> pd.DataFrame:
        df = pd.read_sql_query("SELECT * FROM studies ORDER BY created", self._db)
        df["definition"] = df["definition"].map(json.loads)
        return df

    # -- runs ----------------------------------------------------------------------------
    def begin_run(self, info: RunInfo, log_path: str | None = None) -> None:
        with self._tx():
            cur = self._db.execute("SELECT state FROM runs WHERE run_id=?", (info.run_id,)).fetchone()
            if cur is None:
                self._db.execute(
                    "INSERT INTO runs (run_id, study_id, cell_key, config, seed, init_seed, data_seed, repeat, workload,"
                    " config_json, machine, state, created, log_path) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (info.run_id, info.study_id, info.cell_key, info.config, info.seed, info.init_seed, info.data_seed,
                     info.repeat, info.workload, dumps(info.config_json), info.machine, RUNNING, time.time(), log_path),
                )
            else:
                self._db.execute(
                    "UPDATE runs SET state=?, error=NULL, final_sha256=NULL, attempts=attempts+1, log_path=? WHERE run_id=?",
                    (RUNNING, log_path, info.run_id),
                )

    def update_run(self, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        bad = set(fields) - set(RUN_COLUMNS)
        if bad:
            raise ValueError(f"unknown run fields {sorted(bad)}")
        if fields.get("state") in ("finished", "failed", "skipped"):
            fields["finished_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        vals = [dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
        with self._tx():
            self._db.execute(f"UPDATE runs SET {cols} WHERE run_id=?", (*vals, run_id))

    def add_metrics(self, run_id: str, rows: list[list]) -> None:
        with self._tx():
            self._db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", [(run_id, int(s), n, v) for s, n, v in rows]
            )

    def add_weights(self, run_id: str, step: int, sha256: str, path: str | None) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO weights VALUES (?, ?, ?, ?)", (run_id, step, sha256, path))

    def add_artifact(self, run_id: str, name: str, path: str) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)", (run_id, name, path))

    def _select(self, table: str, run_ids: list[str] | None, order: str) -> pd.DataFrame:
        if run_ids is None:
            return pd.read_sql_query(f"SELECT * FROM {table} ORDER BY {order}", self._db)
        if not run_ids:
            return pd.read_sql_query(f"SELECT * FROM {table} WHERE 0", self._db)
        frames = []
        for i in range(0, len(run_ids), 500):
            chunk = run_ids[i : i + 500]
            q = f"SELECT * FROM {table} WHERE run_id IN ({','.join('?' * len(chunk))}) ORDER BY {order}"
            frames.append(pd.read_sql_query(q, self._db, params=chunk))
        return pd.concat(frames, ignore_index=True)

    def runs(self, study_id: str | None = None) -> pd.DataFrame:
        q, params = "SELECT * FROM runs", ()
        if study_id is not None:
            q, params = q + " WHERE study_id=?", (study_id,)
        df = pd.read_sql_query(q + " ORDER BY created, run_id", self._db, params=params)
        for c in JSON_COLUMNS:
            df[c] = df[c].map(loads)
        return df

    def metrics(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._select("metrics", run_ids, "run_id, name, step")

    def weights(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._select("weights", run_ids, "run_id, step")

    def artifacts(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._select("artifacts", run_ids, "run_id, name")

    # -- analyses --------------------------------------------------------------------------
    def put_analysis(self, study_id: str, kind: str, key: str, payload: dict) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO analyses VALUES (?, ?, ?, ?, ?)", (study_id, kind, key, time.time(), dumps(payload))
            )

    def analyses(self, study_id: str | None = None, kind: str | None = None) -> pd.DataFrame:
        q, params = "SELECT * FROM analyses WHERE 1=1", []
        if study_id is not None:
            q += " AND study_id=?"
            params.append(study_id)
        if kind is not None:
            q += " AND kind=?"
            params.append(kind)
        df = pd.read_sql_query(q + " ORDER BY created", self._db, params=params)
        df["payload"] = df["payload"].map(json.loads)
        return df

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
