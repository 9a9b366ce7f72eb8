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

A warm worker is started with ``DEVICEDIFF_PRELOAD=<framework>``: it loads that framework (for
PyTorch also ``torch._dynamo``, which the first ``torch.optim`` optimizer would import, about
1.5 s) before it reads its first job, so a worker the executor starts ahead of time
(*prestarted*, docs/parallel.md) is ready when its first job comes. A prestarted worker's output
before that job goes to a file without a name (``DEVICEDIFF_EARLY_LOG=1``: its stdout, readable),
which is copied into the first job's log; a killed worker leaves nothing behind.
Before its first job such a worker may get ``{"check": {"workload": ..., "params": {...}}}``: it
builds the workload for the runner's preflight and answers with a ``checked`` record; its first
run then starts from the state noted before the check, as a warm worker's next run does.

Every failure becomes a ``done`` record: a crash is a result, not an exception in the parent.
The ``done`` record carries ``timing`` (seconds): ``startup`` (process start to the job, or the
reset before it; for a prestarted worker only what its first job waited for it), ``import``
(the framework), ``setup`` (settings, workload, data, model), and the training driver's
``train``/``eval``/``checkpoint``/``finish``.

Standard library only at import time (see ``devicediff.protocol``).
"""

from __future__ import annotations

import atexit
import gc
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
PRELOAD_ENV = "DEVICEDIFF_PRELOAD"  # a framework to load before the first job (warm workers)
EARLY_LOG_ENV = "DEVICEDIFF_EARLY_LOG"  # "1": stdout is a nameless file holding the output from before the first job
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


def read_messages(stream: TextIO) -> Iterator[dict]:
    """Each JSON object on ``stream``, as it arrives. An object may span several lines (a
    hand-written ``job.json``); it ends where the text so far is one JSON object."""
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
        yield d
    if text.strip():
        raise ValueError(f"devicediff worker: input ends inside a job: {text[:200]!r}")


def job_of(d: dict) -> tuple[Job, str | None, float | None]:
    """``(job, log_path, sent)`` of a message: a ``Job``, or ``{"job": ..., "log": ..., "sent": ...}``
    (``sent``: the executor's ``time.time()`` when it sent the job)."""
    if "job" in d and "run_id" not in d:
        sent = d.get("sent")
        return Job.from_dict(d["job"]), d.get("log"), float(sent) if isinstance(sent, (int, float)) else None
    return Job.from_dict(d), None, None


def read_jobs(stream: TextIO) -> Iterator[tuple[Job, str | None, float | None]]:
    """``(job, log_path, sent)`` for each job on ``stream``, as it arrives."""
    for d in read_messages(stream):
        yield job_of(d)


def check_workload(request: dict, writer: RecordWriter) -> None:
    """The runner's preflight, done here for it (``LocalExecutor.check_workload``): build the
    workload with these parameters and answer with a ``checked`` record, its ``error`` None or
    ``{"type", "module", "message"}``."""
    try:
        from devicediff.workloads import make_workload

        make_workload(request["workload"], request["params"])
    except BaseException as e:  # noqa: BLE001 - the runner decides what an error means
        writer.emit("checked", error={"type": type(e).__name__, "module": type(e).__module__, "message": str(e)})
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
    else:
        writer.emit("checked", error=None)


def _preload_more(state: ProcessState) -> float:
    """``state.preload_more()``; returns when it was done (``time.time()``)."""
    try:
        state.preload_more()
    except Exception:  # noqa: BLE001 - the first run's own imports say what is wrong, as without preload
        traceback.print_exc()
    return time.time()


def _input_waiting() -> bool:
    """Whether a message already waits on stdin (without reading it)."""
    try:
        import select

        return bool(select.select([sys.stdin], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def redirect_output(path: str, keep_early: bool = False) -> None:
    """Send this process's stdout and stderr (Python's and the C libraries') to ``path``; with
    ``keep_early``, what this process wrote to its stdout so far (a prestarted worker's nameless
    early log) is copied there first."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if keep_early:
            try:
                os.write(fd, os.pread(1, os.fstat(1).st_size, 0))
            except (OSError, AttributeError):  # not readable, or no pread here: the early lines are lost
                pass
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

    def preload(self, framework: str) -> None:
        """Before any job (a warm worker): load ``framework`` and note its pristine state, as
        ``prepare`` does for a first job."""
        self.framework = framework
        if framework == "torch":
            from devicediff.frameworks.torch import reset

            self.snap = reset.snapshot()

    def preload_more(self) -> None:
        """What the first run would load next: its backend module and, for PyTorch,
        ``torch._dynamo`` (the first ``torch.optim`` optimizer imports it; about 1.5 s). Changes
        none of the state ``reset`` puts back."""
        from devicediff import frameworks

        if self.framework == "torch":
            try:
                import torch._dynamo  # noqa: F401
            except Exception:  # noqa: BLE001 - an older torch without it: its first run pays nothing here
                pass
        if self.framework in frameworks.FRAMEWORKS:
            import_module(frameworks.get(self.framework).backend.partition(":")[0])
        # What is loaded now lives as long as the process: out of the garbage collector's sight, the
        # full collection of every reset between runs takes 1 ms instead of 0.2 s (the millions of
        # objects of torch._dynamo and sympy), and so do the collections Python makes during a run.
        # A run's own objects are younger and collected as before.
        gc.freeze()

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
    # At exit, first move every object to the permanent generation: the interpreter's exit then
    # skips them in its garbage collections, over the millions of objects torch and torch._dynamo
    # made (about 1 s on the 2-core machine, paid after every warm worker's last run; 0.3 s left).
    atexit.register(gc.freeze)
    preload = os.environ.pop(PRELOAD_ENV, "")
    early_log = os.environ.pop(EARLY_LOG_ENV, "") == "1"
    writer = RecordWriter()
    state = ProcessState()
    ready = None  # time.time() when the preload was done
    if preload:
        try:
            state.preload(preload)
            if not _input_waiting():  # a check waiting goes first: the runner waits for it
                state.preload_more()
                ready = time.time()
        except Exception:  # noqa: BLE001 - the first job's own start says what is wrong, as without preload
            traceback.print_exc()
            state = ProcessState()
            ready = time.time()
    startup = time.time() - spawned if spawned else 0.0
    checked = False  # a preflight check ran workload code here: reset before the first job
    n = 0
    for msg in read_messages(sys.stdin):
        if "check" in msg:
            if n or state.snap is None:  # only before any run, with the pristine state noted
                writer.emit("checked", error={"type": "NotPreloaded", "module": __name__,
                                              "message": "this worker cannot check a workload now"})
                continue
            check_workload(msg["check"], writer)
            checked = True
            if ready is None:
                ready = _preload_more(state)
            continue
        job, log, sent = job_of(msg)
        if log:
            redirect_output(log, keep_early=early_log and n == 0)
        if n == 0:
            if preload and ready is None:  # the job came before the rest of the preload: that first
                ready = _preload_more(state)
            if early_log and ready is not None:
                # Prestarted: the job waited only for what was left of the start when it was sent.
                startup = max(0.0, ready - max(spawned, sent or 0.0))
            elif ready is not None:
                startup = ready - spawned if spawned else 0.0
            startup += state.prepare(job)
            if checked:  # as a warm worker's next run: the check's traces put back
                t = time.perf_counter()
                if job.framework != state.framework or not state.reset():
                    print(f"devicediff worker: cannot run a {job.framework} job after a preflight check here",
                          file=sys.stderr, flush=True)
                    sys.exit(EXIT_CANNOT_RESET)
                startup += time.perf_counter() - t
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
        n += 1


if __name__ == "__main__":
    main()
