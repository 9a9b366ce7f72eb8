"""The record stream between a run's worker process and the parent.

A worker (any framework, any Python environment) receives *jobs* as JSON lines on
stdin (one line: a single run; several: a warm worker runs them one after another) and writes *records*, one JSON object per line, to the file descriptor
named by ``DEVICEDIFF_RECORD_FD`` (stdout and stderr stay free for library
chatter, which goes to the run's log). The parent is the only store writer.

This module must import with the standard library alone: old-framework
environments (Chainer 7.8 with numpy<2) load it too.

Record kinds (every record has ``"kind"``):

=============  =================================================================
``started``    ``pid``, ``run_id``, ``process_run`` (the how-many-th run of this process); first record of a run
``env``        ``fingerprint``: environment facts (CPU, GPU, driver, versions)
``effective``  ``settings``: what took effect (threads, BLAS pools, cuDNN/TF32 flags)
``init``       ``sha256`` of the initial weights (built on CPU)
``metrics``    ``rows``: list of ``[step, name, value]``
``weights``    ``step``, ``sha256``, optional ``path`` of a saved snapshot (.npy)
``artifact``   ``name``, ``path``
``progress``   ``step``, ``total``
``lockstep``   ``step``, ``path`` of the step's tensor file (``devicediff.stepfiles``), ``total``, ``timing``,
               ``sha256`` (state after the step), ``parity``, ``random``, ``random_modules``,
               ``random_devices``, ``random_generators``
``done``       ``state`` (finished/failed/skipped), ``error``, ``final_sha256``,
               ``wall_time``, ``threads_used``, ``timing`` (startup, import, setup, train, eval, ...)
=============  =================================================================
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, TextIO

RECORD_FD_ENV = "DEVICEDIFF_RECORD_FD"

FINISHED, FAILED, SKIPPED, RUNNING = "finished", "failed", "skipped", "running"
INTERRUPTED = "interrupted"  # started, then the runner was stopped (Ctrl-C); runs again on resume
STATES = (FINISHED, FAILED, SKIPPED, RUNNING, INTERRUPTED)


class Skip(Exception):
    """Raised inside a worker when a config cannot be honoured here (no GPU...)."""


class RecordWriter:
    """Writes records to the record fd (or a given stream), flushing each line."""

    def __init__(self, stream: TextIO | None = None):
        if stream is None:
            fd = int(os.environ.get(RECORD_FD_ENV, "1"))
            stream = os.fdopen(os.dup(fd), "w", buffering=1)
        self._out = stream
        self._pending: list[list[Any]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        if kind != "metrics":
            self.flush_metrics()
        self._out.write(json.dumps({"kind": kind, **fields}, default=_jsonable) + "\n")
        self._out.flush()

    def metric(self, step: int, name: str, value: float) -> None:
        """Buffered; flushed with the next non-metric record or ``flush_metrics``."""
        self._pending.append([int(step), name, float(value)])
        if len(self._pending) >= 256:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            self._out.write(json.dumps({"kind": "metrics", "rows": rows}) + "\n")
            self._out.flush()


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_records(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse a record stream, skipping blank or torn lines (a killed worker may
    leave half a line)."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "kind" in rec:
            yield rec
