"""Warm workers: which runs may share a worker process, and running them in one.

A *warm* worker runs one config's cells one after another in one process, so the interpreter
start, the framework import and the workload's data are paid once per worker instead of once per
run. Runs share a worker only when everything that is fixed at process start is the same for
them: the interpreter, the config (and so the environment ``worker_env`` builds from it: thread
variables, ``CUBLAS_WORKSPACE_CONFIG``, the config's ``env``), the cores and the GPU. Between two
runs the worker puts back what a run can change in the process
(``devicediff.frameworks.torch.reset``, per axis there).

A config runs one process per run (and says so in each run's ``effective.placement.worker``)
where that reset would not make a run equal to a fresh process's:

- any framework but PyTorch (Chainer's global configuration and CuPy's memory pools);
- ``cuda_graphs``: a captured graph owns a private memory pool and replays fixed addresses;
- ``compile = "reduce-overhead"`` (CUDA graphs again) or ``"max-autotune"`` (kernels chosen by
  timing, kept in process-wide tables);
- ``cudnn_benchmark`` on a GPU: cuDNN's autotuner keeps the algorithms it timed in a process-wide
  cache that PyTorch cannot clear, so a second run would reuse the first run's choice where a
  fresh process times them again;
- ``devicediff diverge`` sides (``lockstep``): two sides must run at once, each in its own process.

``--isolate`` (``LocalExecutor(isolate=True)``) runs every run in a fresh process.

A warm worker loads its framework before it reads its first job (``DEVICEDIFF_PRELOAD``), so the
executor may start one ahead of time (``prestart``: while the runner does its preflight, or while
the slot before it still runs) and hand it its first job when its slot starts (``adopt``).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, TextIO

import time

from devicediff.executors.base import Task, describe_exit, log_tail
from devicediff.protocol import FAILED, read_records
from devicediff.worker import PRELOAD_ENV

def isolation_reason(task: Task) -> str | None:
    """Why this task must run in a fresh process of its own, or None if a warm worker may run it."""
    job = task.job
    cfg = job.config
    on_gpu = job.device.startswith("cuda")
    compile_mode = "default" if cfg.get("compile") is True else (cfg.get("compile") or None)
    if job.lockstep is not None:
        return "diverge: each lockstep side runs in its own process"
    if job.framework != "torch":
        return f"framework {job.framework}: its process-wide state (global configuration, memory pools) has no reset"
    if cfg.get("cuda_graphs"):
        return "cuda_graphs: captured graphs keep a private memory pool and fixed addresses"
    if compile_mode in ("reduce-overhead", "max-autotune"):
        return f"compile = {compile_mode!r}: CUDA graphs or kernels chosen by timing, kept process-wide"
    if cfg.get("cudnn_benchmark") and on_gpu:
        return "cudnn_benchmark on a GPU: cuDNN's autotuner cache cannot be cleared between runs"
    return None


def warm_key(task: Task) -> str:
    """Runs with equal keys may share a warm worker: same interpreter, config, cores and GPU."""
    return json.dumps([task.python, task.job.config, task.cpus, task.gpus], sort_keys=True, default=str)


# -- one warm worker process ---------------------------------------------------------------------------


class WarmProcess:
    """A worker process fed one job at a time; ``run`` sends a job and passes its records on."""

    def __init__(self, proc: subprocess.Popen, read: int | TextIO):
        self.proc = proc
        self._stream = os.fdopen(read, "r", errors="replace") if isinstance(read, int) else read
        self._records = read_records(self._stream)
        self.runs = 0  # jobs sent to this process

    def send(self, task: Task) -> bool:
        line = json.dumps({"job": json.loads(task.job.to_json()), "log": task.log_path, "sent": time.time()})
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        self.runs += 1
        return True

    def collect(self, emit: Callable[[dict], None]) -> tuple[bool, bool]:
        """Pass on one job's records until its ``done``: ``(started, done)``; False for ``done``
        when the process ended first."""
        started = False
        for rec in self._records:
            started = started or rec["kind"] == "started"
            emit(rec)
            if rec["kind"] == "done":
                return started, True
        return started, False

    def close(self, timeout: float = 60.0) -> int | None:
        """No more jobs: let the worker exit (it reads the end of its input), then reap it."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            from devicediff.executors.local import kill_worker

            kill_worker(self.proc)
            code = self.proc.wait()
        self._stream.close()
        return code


def run_session(
    first: Task,
    next_task: Callable[[], Task | None],
    env: dict,
    cores: list[int] | None,
    emit: Callable[[Task, dict], None],
    *,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    adopt: Callable[[], tuple[subprocess.Popen, TextIO] | None] | None = None,
) -> None:
    """Run ``first`` and then every task ``next_task`` hands out, in one warm worker process
    started with ``env`` on ``cores`` (``on_start`` sees each process started). ``adopt`` hands
    over a worker started ahead of time with that environment and those cores, if there is one:
    ``(process, record stream)``.

    Each task ends with exactly one ``done`` record. A worker that dies loses only the run it was
    in: that run is recorded as failed and the next task gets a fresh worker. A task the worker
    died on before starting it (between two runs) is tried once more in a fresh worker.
    """
    from devicediff.executors.local import start_worker

    def spawn(task: Task) -> WarmProcess:
        ready = adopt() if adopt is not None else None
        if ready is not None:
            proc, r = ready
        else:
            proc, r = start_worker(task, {**env, PRELOAD_ENV: task.job.framework}, cores)
        if on_start is not None:
            on_start(proc)
        return WarmProcess(proc, r)

    worker: WarmProcess | None = None
    task: Task | None = first
    try:
        while task is not None:
            worker = _run_one(task, worker, spawn, emit)
            task = next_task()
    finally:
        if worker is not None:
            worker.close()


def _run_one(task: Task, worker: WarmProcess | None, spawn: Callable[[Task], WarmProcess],
             emit: Callable[[Task, dict], None]) -> WarmProcess | None:
    """One task in ``worker`` (or a fresh one); returns the worker, or None if it died."""
    for attempt in (1, 2):
        if worker is None:
            worker = spawn(task)
        emit(task, {"kind": "effective", "settings": {"placement": {"worker": {
            "mode": "warm", "pid": worker.proc.pid, "process_run": worker.runs}}}})
        sent = worker.send(task)
        started, done = worker.collect(lambda rec: emit(task, rec)) if sent else (False, False)
        if done:
            return worker
        code = worker.close(timeout=10.0)
        worker = None
        if started or attempt == 2:
            tail = [line for line in log_tail(task.log_path, 600).splitlines() if line.strip()][-3:]
            emit(task, {"kind": "done", "state": FAILED,
                        "error": describe_exit(code if code is not None else -9) + (": " + " | ".join(tail) if tail else "")})
            return None
    return None
