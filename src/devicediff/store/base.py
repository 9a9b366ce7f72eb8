"""Storage behind one small interface.

The parent process is the only writer. A store holds studies (their
definitions), runs (one per cell and machine, with state, seeds, fingerprint,
weight hashes and wall time), per-step metrics keyed by ``(run, step, name)``,
weight hashes/snapshots, artifacts, and analysis results (e.g. ``diverge``).

``Store.record(run_id, rec)`` applies one protocol record (see
``devicediff.protocol``), so executors never need to know the schema.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pandas as pd

from devicediff.protocol import FAILED, FINISHED, RUNNING, SKIPPED


from devicediff.errors import StoreError, StudyError  # noqa: E402,F401 - re-exported
from devicediff.store.identity import conflict_message, differences  # noqa: E402


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    study_id: str
    cell_key: str
    config: str
    seed: int
    init_seed: int
    data_seed: int
    repeat: int
    workload: str
    config_json: dict
    machine: str


RUN_COLUMNS = (
    "run_id", "study_id", "cell_key", "config", "seed", "init_seed", "data_seed", "repeat", "workload",
    "config_json", "machine", "state", "error", "fingerprint", "effective", "init_sha256", "final_sha256",
    "wall_time", "train_time", "threads_used", "attempts", "created", "finished_at", "log_path",
)
JSON_COLUMNS = ("config_json", "fingerprint", "effective", "threads_used")


class Store(ABC):
    """Abstract store. Implementations: ``SQLiteStore`` (file or ``:memory:``)."""

    # -- studies ----------------------------------------------------------------
    @abstractmethod
    def put_study(self, study_id: str, name: str, definition: dict) -> None:
        """Register a study; idempotent for the same id. A *different* study under a name the
        store already holds raises ``StudyError`` (see ``check_study``) and writes nothing."""

    @abstractmethod
    def studies(self) -> pd.DataFrame:
        """Columns: study_id, name, definition (dict), created."""

    # -- runs ------------------------------------------------------------------
    @abstractmethod
    def begin_run(self, info: RunInfo, log_path: str | None = None) -> None:
        """Insert the run as ``running`` (or mark an unfinished one running again)."""

    @abstractmethod
    def update_run(self, run_id: str, **fields: Any) -> None: ...

    @abstractmethod
    def add_metrics(self, run_id: str, rows: list[list]) -> None:
        """Rows of ``[step, name, value]``; a repeated key replaces, never duplicates."""

    @abstractmethod
    def add_weights(self, run_id: str, step: int, sha256: str, path: str | None) -> None: ...

    @abstractmethod
    def add_artifact(self, run_id: str, name: str, path: str) -> None: ...

    @abstractmethod
    def runs(self, study_id: str | None = None) -> pd.DataFrame:
        """One row per run, columns ``RUN_COLUMNS`` (JSON columns decoded)."""

    @abstractmethod
    def metrics(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """Columns: run_id, step, name, value."""

    @abstractmethod
    def weights(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """Columns: run_id, step, sha256, path."""

    @abstractmethod
    def artifacts(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """Columns: run_id, name, path."""

    # -- analyses (diverge results, ...) ---------------------------------------------
    @abstractmethod
    def put_analysis(self, study_id: str, kind: str, key: str, payload: dict) -> None: ...

    @abstractmethod
    def analyses(self, study_id: str | None = None, kind: str | None = None) -> pd.DataFrame:
        """Columns: study_id, kind, key, created, payload (dict)."""

    @abstractmethod
    def close(self) -> None: ...

    # -- shared logic ------------------------------------------------------------------
    def record(self, run_id: str, rec: dict) -> None:
        """Apply one protocol record from a worker."""
        kind = rec.get("kind")
        if kind == "metrics":
            self.add_metrics(run_id, rec["rows"])
        elif kind == "env":
            self.update_run(run_id, fingerprint=rec["fingerprint"])
        elif kind == "effective":
            self.update_run(run_id, effective=rec["settings"])
        elif kind == "init":
            self.update_run(run_id, init_sha256=rec["sha256"])
        elif kind == "weights":
            self.add_weights(run_id, int(rec["step"]), rec["sha256"], rec.get("path"))
        elif kind == "artifact":
            self.add_artifact(run_id, rec["name"], rec["path"])
        elif kind == "done":
            state = rec.get("state", FAILED)
            if state not in (FINISHED, FAILED, SKIPPED):
                state = FAILED
            self.update_run(
                run_id,
                state=state,
                error=rec.get("error"),
                final_sha256=rec.get("final_sha256"),
                wall_time=rec.get("wall_time"),
                train_time=rec.get("train_time"),
                threads_used=rec.get("threads_used"),
            )
        # started/progress/lockstep records are not stored here

    def check_study(self, study_id: str, name: str, definition: dict) -> None:
        """Raise ``StudyError`` when the store holds another study under ``name``: one whose
        identity (``devicediff.store.identity.IDENTITY_KEYS``) differs from ``definition``.
        The message names the first field that differs and the way out (``--name``, ``--store``).
        The same study with other seeds, or under the same id, is not a conflict."""
        studies = self.studies()
        if studies.empty:
            return
        same_name = studies[(studies["name"] == name) & (studies["study_id"] != study_id)]
        for stored in same_name["definition"]:
            diffs = differences(definition, stored if isinstance(stored, dict) else {})
            if diffs:
                raise StudyError(conflict_message(name, self.where, diffs))

    @property
    def where(self) -> str:
        """How messages name this store."""
        return "the store"

    def unfinished(self, study_id: str) -> list[str]:
        runs = self.runs(study_id)
        return list(runs.loc[runs["state"] == RUNNING, "run_id"]) if len(runs) else []


def dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v, sort_keys=True, default=str)


def loads(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
