"""Run storage: ``open_store(url)`` returns a ``Store``.

``devicediff.db`` or ``sqlite:///path.db`` → a SQLite file; ``:memory:`` → a
throw-away in-memory store (tests).
"""

from __future__ import annotations

from devicediff.store.base import RunInfo, Store, StoreError
from devicediff.store.sqlite import SQLiteStore


def open_store(url: str = "devicediff.db", *, create: bool = True) -> Store:
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///"):]
    return SQLiteStore(url, create=create)


__all__ = ["RunInfo", "Store", "StoreError", "SQLiteStore", "open_store"]
