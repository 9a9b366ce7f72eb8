"""``devicediff merge A.db B.db --out ALL.db``: one store from the stores of several machines.

Each machine runs the same study into its own store; its runs carry its
``machine`` id (a hash of the hardware and software facts that can change
numbers, see ``devicediff.fingerprint.machine_id``), so the same cell run on
two different machines gives two runs, and a report on the merged store
compares every config on every machine. Two machines with identical hardware
and software share a machine id: their runs of the same cell are the same run
(expected to agree bit for bit), and the merge keeps one.

Rules:

- Every input is checked first (a devicediff store, a schema this version
  reads; opened read-only, so an input on a read-only share merges), and so is
  ``--out`` (a devicediff store if it exists, a place that can be written);
  any problem is one line naming the input's path or ``--out``, and nothing is
  written.
- A study name that stands for different definitions in different stores is
  a conflict: the merge refuses, naming the study, the stores and the fields
  that differ, and writes nothing. Seeds are not part of a study's identity
  (``devicediff.store.identity``): stores that ran different seeds of one
  study merge, and the stored seed list becomes their union.
- A run is copied whole: its row (state, fingerprint, effective settings,
  hashes, times), its metrics, weight hashes and artifacts. A run already in
  ``--out`` is kept unless the incoming one got further (finished beats
  failed or skipped, which beat running); then it is replaced whole, never
  mixed. So merging the same store twice adds nothing.
- Files: a run's artifact folder beside an input (``A_artifacts/RUN``) is
  linked or copied beside ``--out`` and the stored paths point there; when an
  input's folder is not present, the paths are kept as they were.
- All database writes happen in one transaction: a merge that fails leaves
  ``--out`` as it was, a new ``--out`` is removed, and so are the files the
  merge linked or copied.

``merge_stores`` returns the number of runs added or replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pandas as pd

from devicediff.protocol import FAILED, FINISHED, RUNNING, SKIPPED
from devicediff.store.base import StoreError
from devicediff.store.identity import differences
from devicediff.store.sqlite import SQLiteStore, artifacts_dir

RANK = {FINISHED: 3, FAILED: 2, SKIPPED: 2, RUNNING: 1}
SKIP_FILES = {"checkpoint.pt", ".driver-token"}


def _same(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _studies(path: str, flag: str) -> dict[str, dict]:
    """study_id → {name, definition (dict), created}; a one-line ``StoreError`` if ``path`` is not
    a readable devicediff store."""
    with SQLiteStore(path, readonly=True, flag=flag) as s:
        try:
            df = s.studies()
        except (sqlite3.Error, pd.errors.DatabaseError) as e:
            raise StoreError(f"{flag + ' ' if flag else 'store '}{path}: unreadable ({e})") from None
    return {sid: {"name": n, "definition": d, "created": c}
            for sid, n, d, c in zip(df["study_id"], df["name"], df["definition"], df["created"])}


def check_conflicts(per_store: dict[str, dict[str, dict]]) -> None:
    """Refuse when a study name would stand for several definitions that no single
    store already holds together."""
    names: dict[str, dict[str, set[str]]] = {}
    for path, studies in per_store.items():
        for sid, s in studies.items():
            names.setdefault(s["name"], {}).setdefault(path, set()).add(sid)
    for name, by_store in names.items():
        union = set().union(*by_store.values())
        if len(union) > 1 and not any(ids == union for ids in by_store.values()):
            pa = max(by_store, key=lambda p: len(by_store[p]))
            pb = next(p for p, ids in by_store.items() if ids - by_store[pa])
            sa, sb = sorted(by_store[pa])[0], sorted(by_store[pb] - by_store[pa])[0]
            diff = [f for f, _, _ in differences(per_store[pa][sa]["definition"], per_store[pb][sb]["definition"])]
            raise StoreError(
                f"merge: study {name!r} is defined differently in {pa} and {pb} (differs in {', '.join(diff[:4]) or 'definition'}); "
                "nothing merged: rename one of the studies, or merge them into different stores"
            )


def merge_stores(paths: list[str], out: str) -> int:
    out = str(out)
    sources: list[str] = []
    for p in paths:
        p = str(p)
        if not Path(p).exists():
            raise StoreError(f"store {p}: no such file; check the path")
        if _same(p, out) or any(_same(p, q) for q in sources):
            continue  # merging a store into itself adds nothing
        sources.append(p)

    # 1. Read and check everything before writing anything.
    per_store = {p: _studies(p, "") for p in sources}
    out_existed = Path(out).exists() and not Path(out).is_dir()
    if out_existed and Path(out).stat().st_size > 0:
        per_store[out] = _studies(out, "--out")
    check_conflicts(per_store)
    if not sources:
        return 0

    # 2. Open (or create) --out: one transaction for every database write.
    dst = SQLiteStore(out, flag="--out")  # a directory or a place that cannot be written: one line, nothing made
    files = _Files(artifacts_dir(out))
    try:
        added = _write(dst, sources, per_store, files)
    except BaseException:
        dst.close()
        files.undo()
        if not out_existed:  # leave no half-made store behind
            _remove_store(out)
        raise
    dst.close()
    return added


def _remove_store(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


class _Files:
    """The artifact files a merge brings beside ``--out``, so a failed merge can take them back."""

    def __init__(self, root: Path):
        self.root = root
        self.root_existed = root.exists()
        self.made: list[Path] = []

    def link_or_copy(self, src: Path, dst: Path) -> None:
        if dst.exists() and dst.stat().st_size == src.stat().st_size:
            return
        if not dst.parent.exists():
            dst.parent.mkdir(parents=True)
            self.made.append(dst.parent)
        tmp = dst.with_name(dst.name + ".merging")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        existed = dst.exists()
        os.replace(tmp, dst)
        if not existed:
            self.made.append(dst)

    def undo(self) -> None:
        if not self.root_existed:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for p in reversed(self.made):
            try:
                p.rmdir() if p.is_dir() else p.unlink()
            except OSError:
                pass


def _write(dst: SQLiteStore, sources: list[str], per_store: dict[str, dict[str, dict]], files: _Files) -> int:
    added = 0
    try:
        with dst._tx():
            for src in sources:
                with SQLiteStore(src, readonly=True, flag="") as s:
                    added += _merge_one(dst.connection(), s.connection(), src, per_store[src], files)
    except sqlite3.Error as e:
        raise StoreError(f"merge into {dst.path} failed and was undone ({e})") from None
    return added


def _relocate(path: str | None, run_id: str, src_dir: Path | None, dst_root: Path) -> str | None:
    """A stored file path of run ``run_id``, pointed at its copy beside ``--out``."""
    if not path or src_dir is None:
        return path
    p = Path(path)
    if p.parent.name != run_id or not (src_dir / p.name).exists():
        return path
    return str(dst_root / run_id / p.name)


def _dumps(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _merge_one(con: sqlite3.Connection, rcon: sqlite3.Connection, src: str, studies: dict[str, dict],
               files: _Files) -> int:
    # Studies: new ones copied; a known one gets the union of both seed lists.
    for sid, s in studies.items():
        row = con.execute("SELECT definition FROM studies WHERE study_id=?", (sid,)).fetchone()
        if row is None:
            con.execute("INSERT INTO studies VALUES (?, ?, ?, ?)", (sid, s["name"], _dumps(s["definition"]), s["created"]))
            continue
        mine = json.loads(row[0])
        seeds = sorted(set(mine.get("seeds", [])) | set(s["definition"].get("seeds", [])))
        if seeds != mine.get("seeds"):
            mine["seeds"] = seeds
            con.execute("UPDATE studies SET definition=? WHERE study_id=?", (_dumps(mine), sid))

    dst_root = files.root
    src_root = artifacts_dir(src)
    added = 0
    cur = rcon.cursor()
    cur.row_factory = sqlite3.Row
    cols = [r[1] for r in rcon.execute("PRAGMA table_info(runs)")]
    for run in cur.execute("SELECT * FROM runs ORDER BY created, run_id").fetchall():
        rid = run["run_id"]
        have = con.execute("SELECT state FROM runs WHERE run_id=?", (rid,)).fetchone()
        if have is not None and RANK.get(run["state"], 0) <= RANK.get(have[0], 0):
            continue  # ours is as far along: keep it whole
        src_dir = src_root / rid if (src_root / rid).is_dir() and src_root != dst_root else None
        if src_dir is not None:
            for f in src_dir.iterdir():
                if f.is_file() and f.name not in SKIP_FILES and not f.name.startswith("checkpoint.pt"):
                    files.link_or_copy(f, dst_root / rid / f.name)
        values = dict(run)
        values["log_path"] = _relocate(values.get("log_path"), rid, src_dir, dst_root)
        if have is not None:
            for t in ("metrics", "weights", "artifacts"):
                con.execute(f"DELETE FROM {t} WHERE run_id=?", (rid,))
            con.execute("DELETE FROM runs WHERE run_id=?", (rid,))
        con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [values[c] for c in cols])
        con.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                        rcon.execute("SELECT run_id, step, name, value FROM metrics WHERE run_id=?", (rid,)))
        con.executemany("INSERT OR REPLACE INTO weights VALUES (?, ?, ?, ?)",
                        [(w[0], w[1], w[2], _relocate(w[3], rid, src_dir, dst_root)) for w in
                         rcon.execute("SELECT run_id, step, sha256, path FROM weights WHERE run_id=?", (rid,))])
        con.executemany("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
                        [(a[0], a[1], _relocate(a[2], rid, src_dir, dst_root)) for a in
                         rcon.execute("SELECT run_id, name, path FROM artifacts WHERE run_id=?", (rid,))])
        added += 1
    con.executemany("INSERT OR IGNORE INTO analyses VALUES (?, ?, ?, ?, ?)",
                    rcon.execute("SELECT study_id, kind, key, created, payload FROM analyses"))
    return added
