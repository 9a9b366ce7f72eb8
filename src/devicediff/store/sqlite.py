"""SQLite implementation of the store: one file, WAL journal, one writer."""

from __future__ import annotations

import json
import os
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


def artifacts_dir(store_path: str | Path) -> Path:
    """Where a store keeps its runs' files: ``devicediff.db`` in ``devicediff_artifacts/`` beside it,
    one folder per run (``devicediff_artifacts/RUN/``)."""
    p = Path(store_path).resolve()
    return p.with_name(p.stem + "_artifacts")


def _found_beside(root: Path, run_id: str, path):
    """A run's file as recorded (absolute, where the run wrote it), or, when that is gone and the store
    was moved or copied with its files, the same file under ``root/RUN/``; else the recorded path."""
    if not path or os.path.exists(path):
        return path
    parts = Path(path).parts
    if run_id not in parts:
        return path
    here = root.joinpath(run_id, *parts[len(parts) - parts[::-1].index(run_id):])
    return str(here) if here.exists() else path


class SQLiteStore(Store):
    """``SQLiteStore(path)``; ``path=":memory:"`` for a throw-away store.

    Opening checks that the file is a devicediff store of a schema this version
    understands; a foreign, corrupt, newer or locked file raises ``StoreError``
    and is left untouched. ``create=False`` refuses to create a new file.

    ``readonly=True`` (reading commands: status, report, export, merge inputs) never writes and
    never leaves a ``-wal``/``-shm`` file beside the store: where the file and its folder are
    writable it reads through an ordinary connection that refuses writes (``query_only``), whose
    close removes SQLite's side files as usual; where they are not, through ``mode=ro`` (and
    ``immutable=1`` when no writer's journal is there). Without ``readonly``, a store that cannot
    be written is refused with one line before anything is opened.

    ``flag`` is the command-line option messages name (``--store``, ``--out``; ``""`` for a
    merge input, named by its path alone).
    """

    def __init__(self, path: str | Path = "devicediff.db", *, create: bool = True, readonly: bool = False,
                 timeout: float = 5.0, flag: str = "--store"):
        self.path = str(path)
        self.readonly = readonly
        self._label = f"{flag} {self.path}" if flag and flag != "--store" else f"store {self.path}"
        self._another = f"choose another {flag}" if flag else "check the path"
        uri = None
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(f"{self._label}: is a directory; give a file path such as {p / 'devicediff.db'}")
            if not p.exists() and (not create or readonly):
                raise StoreError(f"{self._label}: no such file; run a study first or {self._another}")
            if p.exists() and p.stat().st_size > 0:
                try:
                    with open(p, "rb") as f:
                        head = f.read(16)
                except OSError as e:
                    raise StoreError(f"{self._label}: cannot read ({e.strerror})") from None
                if head != b"SQLite format 3\x00":
                    raise StoreError(f"{self._label}: not an SQLite file (corrupt or foreign); move it away or {self._another}")
            if not p.parent.exists():
                raise StoreError(f"{self._label}: folder {p.parent} does not exist")
            writable = _writable(p)
            if readonly and not writable:
                uri = p.resolve().as_uri() + "?mode=ro"
                if not Path(self.path + "-wal").exists():
                    uri += "&immutable=1"  # no writer's journal: nothing to merge in, nothing to create
            elif not readonly and not writable:
                what = f"the file or its folder {p.parent}" if p.exists() else f"the folder {p.parent}"
                raise StoreError(f"{self._label}: cannot be written ({what} is read-only); "
                                 f"{self._another}, or copy the store somewhere writable")
        self._db = None
        try:
            if uri is not None:
                self._db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            else:
                self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._check_and_init()
        except (sqlite3.Error, StoreError) as e:
            if self._db is not None:
                self._db.close()
            if isinstance(e, StoreError):
                raise
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise StoreError(f"{self._label}: locked by another process; wait for it to finish or {self._another}") from None
            if isinstance(e, sqlite3.OperationalError):
                raise StoreError(f"{self._label}: cannot open ({msg})") from None
            raise StoreError(f"{self._label}: unreadable SQLite file ({e}); move it away or {self._another}") from None

    @property
    def where(self) -> str:
        return "an in-memory store" if self.path == ":memory:" else self._label

    # -- schema --------------------------------------------------------------------------
    def _check_and_init(self) -> None:
        db = self._db
        existing = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if existing and app_id != APP_ID:
            raise StoreError(
                f"{self._label}: an SQLite database that devicediff did not write (tables {sorted(existing)[:4]}); {self._another}"
            )
        if existing:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._label}: written by a newer devicediff (schema {version} > {SCHEMA_VERSION}); upgrade devicediff to read it"
                )
            if version < SCHEMA_VERSION:
                raise StoreError(f"{self._label}: schema {version} is too old for this devicediff ({SCHEMA_VERSION})")
        if self.readonly:
            if not existing:
                raise StoreError(f"{self._label}: an empty file, not a devicediff store; run a study first or {self._another}")
            db.execute("PRAGMA query_only=ON")
            return
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
            return StoreError(f"{self._label}: locked by another process; wait for it to finish or {self._another}")
        if isinstance(e, sqlite3.OperationalError):
            return StoreError(f"{self._label}: cannot write ({msg})")
        return StoreError(f"{self._label}: unreadable SQLite file ({msg}); move it away or {self._another}")

    @contextmanager
    def _tx(self):
        """One write transaction; a lock held elsewhere or a failed write is a one-line ``StoreError``."""
        if self.readonly:
            raise StoreError(f"{self._label}: opened read-only; a command that writes needs a writable store")
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
            self.check_study(study_id, name, definition)  # inside the write lock: no other writer in between
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
        return self._beside(df, "log_path")

    def metrics(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._select("metrics", run_ids, "run_id, name, step")

    def weights(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._beside(self._select("weights", run_ids, "run_id, step"), "path")

    def artifacts(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        return self._beside(self._select("artifacts", run_ids, "run_id, name"), "path")

    def _beside(self, df: pd.DataFrame, col: str) -> pd.DataFrame:
        """File paths of ``df[col]`` found again beside a store that moved with its
        ``_artifacts`` folder (copied from a cluster, checked in with the docs)."""
        if self.path == ":memory:" or df.empty:
            return df
        root = artifacts_dir(self.path)
        if root.is_dir():
            df[col] = [_found_beside(root, r, p) for r, p in zip(df["run_id"], df[col])]
        return df

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

    def connection(self) -> sqlite3.Connection:
        """The open connection, for ``devicediff.store.merge`` (store-internal; SQL stays in store/)."""
        return self._db

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _writable(p: Path) -> bool:
    """Can this process write the store and create SQLite's side files (``-wal``, ``-shm``) beside it?"""
    folder_ok = os.access(p.parent, os.W_OK | os.X_OK)
    return folder_ok and (not p.exists() or os.access(p, os.W_OK))
