"""Entry point of a worker process: ``python -m devicediff.worker < jobs``.

Reads jobs on stdin, one JSON object per line, and runs them one after another; each run ends
with its ``done`` record. A line is a ``Job`` (``Job.to_json``), or ``{"job": {...}, "log": PATH}``
when the executor wants the run's output in its own log file. One job and end of input is the
single-run mode (``devicediff diverge``, ``--isolate``, Ray); several are a *warm* worker
(docs/parallel.md): the executor sends a config's cells to the one process that already loaded
the framework and the data.

The parent sets thread and library environment variables *before* this process starts, so they
are in force before any framework loads; a warm worker only ever gets jobs of one config, whose
environment is the same. Between two runs the worker puts back everything a run can change in the
process (``devicediff.frameworks.torch.reset``); given a second job of a framework it cannot reset,
it exits before starting it, and the executor runs that job in a fresh worker.

Every failure becomes a ``done`` record: a crash is a result, not an exception in the parent.
The ``done`` record carries ``timing`` (seconds): ``startup`` (process start to the job, or the
reset before it), ``import`` (the framework), ``setup`` (settings, workload, data, model), and the
training driver's ``train``/``eval``/``checkpoint``/``finish``.

Standard library only at import time (see ``devicediff.protocol``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from importlib import import_module
from typing import Any, Iterator, TextIO

from devicediff.job import Job
from devicediff.protocol import FAILED, SKIPPED, RecordWriter, Skip

SPAWNED_ENV = "DEVICEDIFF_SPAWNED_AT"  # time.time() when the executor started this process
NO_RESET_ENV = "DEVICEDIFF_WARM_NO_RESET"  # tests only: skip the reset, to show that it matters
EXIT_CANNOT_RESET = 75  # exited before a job's "started": the executor runs that job in a fresh worker
RESETTABLE = ("torch",)  # frameworks whose process state a warm worker can put back


class TimedWriter:
    """Passes records through; adds the worker's own timing to the ``done`` record."""

    def __init__(self, writer: RecordWriter, timing: dict[str, float]):
        self._w, self.timing = writer, timing

    def emit(self, kind: str, **fields: Any) -> None:
        if kind == "done":
            fields["timing"] = {**self.timing, **(fields.get("timing") or {})}
        self._w.emit(kind, **fields)

    def __getattr__(self, name: str) -> Any:  # metric, flush_metrics
        return getattr(self._w, name)


def run_job(job: Job, writer: RecordWriter, timing: dict[str, float] | None = None) -> None:
    from devicediff import frameworks
    from devicediff.frameworks import _driver

    timing = {} if timing is None else timing
    writer = TimedWriter(writer, timing)
    t0 = time.perf_counter()
    try:
        fw = frameworks.get(job.framework)
        import_module(fw.backend.partition(":")[0])  # the framework itself: paid once per process
        t1 = time.perf_counter()
        timing["import"] = round(t1 - t0, 6)
        backend = fw.make_backend(job, writer)
        timing["setup"] = round(time.perf_counter() - t1, 6)
        if job.lockstep is not None:
            _driver.lockstep(fw.make_lockstep(backend), t0)
        else:
            _driver.train(backend, t0)
    except Skip as e:
        writer.emit("done", state=SKIPPED, error=str(e), wall_time=time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        tb = traceback.format_exc(limit=8)
        sys.stderr.write(tb)
        msg = f"{type(e).__name__}: {e}".strip()
        writer.emit("done", state=FAILED, error=msg[:2000], traceback=tb[-4000:], wall_time=time.perf_counter() - t0)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise


def read_jobs(stream: TextIO) -> Iterator[tuple[Job, str | None]]:
    """``(job, log_path)`` for each job on ``stream``, as it arrives. A job may span several
    lines (a hand-written ``job.json``); it ends where the text so far is one JSON object."""
    text = ""
    while True:
        line = stream.readline()
        if not line:
            break
        text += line
        if not text.strip():
            text = ""
            continue
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            continue
        text = ""
        if "job" in d and "run_id" not in d:
            yield Job.from_dict(d["job"]), d.get("log")
        else:
            yield Job.from_dict(d), None
    if text.strip():
        raise ValueError(f"devicediff worker: input ends inside a job: {text[:200]!r}")


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (Python's and the C libraries') to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


class ProcessState:
    """The framework state a warm worker puts back between runs."""

    def __init__(self) -> None:
        self.snap: Any = None
        self.framework: str | None = None

    def prepare(self, job: Job) -> float:
        """Before the first run: load the framework and note its pristine state. Returns seconds."""
        t = time.perf_counter()
        self.framework = job.framework
        if job.framework == "torch" and self.snap is None:
            from devicediff.frameworks.torch import reset

            self.snap = reset.snapshot()
        return time.perf_counter() - t

    def reset(self) -> bool:
        """Before a further run: put the state back. False when this worker must not run another job."""
        if self.framework not in RESETTABLE or self.snap is None:
            return False
        if os.environ.get(NO_RESET_ENV) == "1":
            return True
        from devicediff.frameworks.torch import reset

        try:
            reset.restore(self.snap)
        except Exception:  # noqa: BLE001 - a worker that cannot reset must not run another job
            traceback.print_exc()
            return False
        return True


def main() -> None:
    spawned = float(os.environ.pop(SPAWNED_ENV, "0") or 0)
    writer = RecordWriter()
    state = ProcessState()
    startup = time.time() - spawned if spawned else 0.0
    for n, (job, log) in enumerate(read_jobs(sys.stdin)):
        if log:
            redirect_output(log)
        if n == 0:
            startup += state.prepare(job)
        else:  # reset only when another job came: a single run exits at once
            t = time.perf_counter()
            if job.framework != state.framework or not state.reset():
                # The executor never sends this; exiting before "started" makes it retry the job
                # in a fresh worker, rather than run it in a process that may leak.
                print(f"devicediff worker: cannot run a {job.framework} job after a {state.framework} run here",
                      file=sys.stderr, flush=True)
                sys.exit(EXIT_CANNOT_RESET)
            startup = time.perf_counter() - t
        writer.emit("started", pid=os.getpid(), run_id=job.run_id, process_run=n)
        run_job(job, writer, {"startup": round(max(startup, 0.0), 6)})
        writer.flush_metrics()


if __name__ == "__main__":
    main()
