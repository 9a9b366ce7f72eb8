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
  reads), and so is ``--out`` if it exists; any problem is one line and
  nothing is written.
- A study name that stands for different definitions in different stores is
  a conflict: the merge refuses, naming the study, the stores and the fields
  that differ, and writes nothing. Seeds are not part of a study's identity:
  stores that ran different seeds of one study merge, and the stored seed
  list becomes their union.
- A run is copied whole: its row (state, fingerprint, effective settings,
  hashes, times), its metrics, weight hashes and artifacts. A run already in
  ``--out`` is kept unless the incoming one got further (finished beats
  failed or skipped, which beat running); then it is replaced whole, never
  mixed. So merging the same store twice adds nothing.
- Files: a run's artifact folder beside an input (``A_artifacts/RUN``) is
  linked or copied beside ``--out`` and the stored paths point there; when an
  input's folder is not present, the paths are kept as they were.
- All database writes happen in one transaction: a merge that fails leaves
  ``--out`` as it was.

Returns the number of runs added or replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

from devicediff.protocol import FAILED, FINISHED, RUNNING, SKIPPED
from devicediff.store.base import StoreError
from devicediff.store.sqlite import SQLiteStore

RANK = {FINISHED: 3, FAILED: 2, SKIPPED: 2, RUNNING: 1}
IDENTITY_KEYS = ("workload", "workload_params", "configs", "reference", "vary", "base_seed", "budget")
SKIP_FILES = {"checkpoint.pt", ".driver-token"}


def artifacts_dir(store_path: str | Path) -> Path:
    p = Path(store_path).resolve()
    return p.with_name(p.stem + "_artifacts")


def _same(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_con(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    con.row_factory = sqlite3.Row
    return con


def _studies(path: str) -> dict[str, dict]:
    """study_id → {name, definition (dict), created}; validates the file first."""
    SQLiteStore(path, create=False).close()  # one-line StoreError if not a readable devicediff store
    con = _read_con(path)
    try:
        return {r["study_id"]: {"name": r["name"], "definition": json.loads(r["definition"]), "created": r["created"]}
                for r in con.execute("SELECT * FROM studies")}
    except sqlite3.Error as e:
        raise StoreError(f"store {path}: unreadable ({e})") from None
    finally:
        con.close()


def _differences(a: dict, b: dict) -> list[str]:
    keys = [k for k in IDENTITY_KEYS if a.get(k) != b.get(k)]
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            sub = sorted(s for s in set(a[k]) | set(b[k]) if a[k].get(s) != b[k].get(s))
            out += [f"{k}.{s}" for s in sub] or [k]
        else:
            out.append(k)
    return out or ["definition"]


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
            diff = _differences(per_store[pa][sa]["definition"], per_store[pb][sb]["definition"])
            raise StoreError(
                f"merge: study {name!r} is defined differently in {pa} and {pb} (differs in {', '.join(diff[:4])}); "
                "nothing merged: rename one of the studies, or merge them into different stores"
            )


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".merging")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _relocate(path: str | None, run_id: str, src_dir: Path | None, dst_root: Path) -> str | None:
    """A stored file path of run ``run_id``, pointed at its copy beside ``--out``."""
    if not path or src_dir is None:
        return path
    p = Path(path)
    if p.parent.name != run_id or not (src_dir / p.name).exists():
        return path
    return str(dst_root / run_id / p.name)


def merge_stores(paths: list[str], out: str) -> int:
    out = str(out)
    if Path(out).is_dir():
        raise StoreError(f"merge: --out {out} is a directory; give a file such as {Path(out) / 'merged.db'}")
    sources: list[str] = []
    for p in paths:
        p = str(p)
        if not Path(p).exists():
            raise StoreError(f"store {p}: no such file; check the path")
        if _same(p, out) or any(_same(p, q) for q in sources):
            continue  # merging a store into itself adds nothing
        sources.append(p)

    # 1. Read and check everything before writing anything.
    per_store = {p: _studies(p) for p in sources}
    out_existed = Path(out).exists()
    if out_existed and Path(out).stat().st_size > 0:
        per_store[out] = _studies(out)
    check_conflicts(per_store)
    if not sources:
        return 0

    # 2. Open (or create) --out; one transaction for every database write.
    SQLiteStore(out).close()
    try:
        return _write(out, sources, per_store)
    except BaseException:
        if not out_existed:  # leave no half-made store behind
            for suffix in ("", "-wal", "-shm"):
                Path(out + suffix).unlink(missing_ok=True)
        raise


def _write(out: str, sources: list[str], per_store: dict[str, dict[str, dict]]) -> int:
    dst_root = artifacts_dir(out)
    con = sqlite3.connect(out, timeout=5.0, isolation_level=None)
    con.execute("PRAGMA foreign_keys=ON")
    added = 0
    try:
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            raise StoreError(f"store {out}: locked by another process; wait for it to finish or use another --out") from None
        try:
            for src in sources:
                added += _merge_one(con, src, per_store[src], dst_root)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise StoreError(f"merge into {out} failed and was undone ({e})") from None
    finally:
        con.close()
    return added


def _merge_one(con: sqlite3.Connection, src: str, studies: dict[str, dict], dst_root: Path) -> int:
    # Studies: new ones copied; a known one gets the union of both seed lists.
    for sid, s in studies.items():
        row = con.execute("SELECT definition FROM studies WHERE study_id=?", (sid,)).fetchone()
        if row is None:
            con.execute("INSERT INTO studies VALUES (?, ?, ?, ?)",
                        (sid, s["name"], json.dumps(s["definition"], sort_keys=True, default=str), s["created"]))
            continue
        mine = json.loads(row[0])
        seeds = sorted(set(mine.get("seeds", [])) | set(s["definition"].get("seeds", [])))
        if seeds != mine.get("seeds"):
            mine["seeds"] = seeds
            con.execute("UPDATE studies SET definition=? WHERE study_id=?", (json.dumps(mine, sort_keys=True, default=str), sid))

    src_root = artifacts_dir(src)
    rcon = _read_con(src)
    added = 0
    try:
        cols = [r[1] for r in rcon.execute("PRAGMA table_info(runs)")]
        for run in rcon.execute("SELECT * FROM runs ORDER BY created, run_id").fetchall():
            rid = run["run_id"]
            have = con.execute("SELECT state FROM runs WHERE run_id=?", (rid,)).fetchone()
            if have is not None and RANK.get(run["state"], 0) <= RANK.get(have[0], 0):
                continue  # ours is as far along: keep it whole
            src_dir = src_root / rid if (src_root / rid).is_dir() and src_root != dst_root else None
            if src_dir is not None:
                for f in src_dir.iterdir():
                    if f.is_file() and f.name not in SKIP_FILES and not f.name.startswith("checkpoint.pt"):
                        _link_or_copy(f, dst_root / rid / f.name)
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
    finally:
        rcon.close()
    return added
