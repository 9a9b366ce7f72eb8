"""Run storage: ``open_store(url)`` returns a ``Store``.

``devicediff.db`` or ``sqlite:///path.db`` → a SQLite file; ``:memory:`` → a
throw-away in-memory store (tests). ``readonly=True`` for commands that only
read (status, report, export): they then work on a store they cannot write and
leave nothing beside it. Every SQL statement of devicediff lives in this package
(``sqlite``, ``merge``).
"""

from __future__ import annotations

from devicediff.store.base import RunInfo, Store, StoreError
from devicediff.store.sqlite import SQLiteStore


def open_store(url: str = "devicediff.db", *, create: bool = True, readonly: bool = False) -> Store:
    url = str(url)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///"):]
    return SQLiteStore(url, create=create, readonly=readonly)


__all__ = ["RunInfo", "Store", "StoreError", "SQLiteStore", "open_store"]
