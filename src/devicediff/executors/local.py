"""Local executor: several runs at once on this machine.

CPU runs get disjoint sets of cores (``sched_setaffinity``) sized to their
thread count, so a 4-thread run really has 4 cores of its own; GPU runs take a
slot on a GPU (``slots_per_gpu`` runs share one GPU) and one core. A task waits
until its cores and GPU slot are free.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from typing import Iterator

from devicediff.executors.base import Executor, Task, describe_exit, log_tail, worker_env
from devicediff.protocol import FAILED, RECORD_FD_ENV, read_records


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[int]:
    """GPU indices without importing a framework (nvidia-smi), honouring CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return list(range(sum(1 for line in out.stdout.splitlines() if line.startswith("GPU"))))
    except (OSError, subprocess.SubprocessError):
        return []


def spawn_worker(task: Task, env: dict, cores: list[int] | None) -> tuple[subprocess.Popen, int]:
    """Start ``python -m devicediff.worker`` with the job on stdin and a record pipe."""
    r, w = os.pipe()
    env = {**env, RECORD_FD_ENV: str(w)}

    def pin() -> None:  # runs in the child before exec: affinity holds before any thread starts
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    log = open(task.log_path, "ab")
    proc = subprocess.Popen(
        [task.python, "-m", "devicediff.worker"],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
        pass_fds=(w,), preexec_fn=pin, start_new_session=True,
    )
    log.close()
    os.close(w)
    proc.stdin.write(json.dumps(task.job).encode())
    proc.stdin.close()
    return proc, r


def run_worker(task: Task, env: dict, cores: list[int] | None, emit) -> None:
    """Run one task to the end, passing each record to ``emit``; always ends with ``done``."""
    try:
        proc, r = spawn_worker(task, env, cores)
    except OSError as e:
        emit({"kind": "done", "state": FAILED, "error": f"cannot start worker with {task.python}: {e}"})
        return
    done = False
    with os.fdopen(r, "r", errors="replace") as stream:
        for rec in read_records(stream):
            done = done or rec["kind"] == "done"
            emit(rec)
    code = proc.wait()
    if not done:
        tail = log_tail(task.log_path, 600).splitlines()[-3:]
        emit({"kind": "done", "state": FAILED, "error": describe_exit(code) + (": " + " | ".join(tail) if tail else "")})


class LocalExecutor(Executor):
    def __init__(self, *, jobs: int = 1, slots_per_gpu: int = 1, pin_cores: bool | None = None):
        self.jobs = max(1, int(jobs))
        self.slots_per_gpu = max(1, int(slots_per_gpu))
        # Pin only when running several at once: a lone run keeps the cores it was given.
        self.pin_cores = (self.jobs > 1) if pin_cores is None else pin_cores

    def execute(self, tasks: list[Task]) -> Iterator[tuple[Task, dict]]:
        free_cores = available_cores()
        gpu_slots = {g: self.slots_per_gpu for g in visible_gpus()}
        out: queue.Queue = queue.Queue()
        pending = list(tasks)
        running = 0
        lock = threading.Lock()

        def start(task: Task, cores: list[int], gpu: int | None) -> None:
            env = worker_env(task.job, gpu_index=gpu)

            def body() -> None:
                run_worker(task, env, cores if self.pin_cores else None, lambda rec: out.put((task, rec)))
                out.put((task, None))  # finished: release resources

            threading.Thread(target=body, daemon=True, name=f"run-{task.run_id}").start()

        held: dict[str, tuple[list[int], int | None]] = {}
        while pending or running:
            # Start whatever fits, in order (a task that does not fit blocks those behind it
            # only if nothing is running, in which case it is given what there is).
            i = 0
            while i < len(pending) and running < self.jobs:
                task = pending[i]
                need = min(max(1, task.cpus), len(available_cores()))
                gpu = None
                if task.gpus:
                    gpu = next((g for g, n in gpu_slots.items() if n > 0), None)
                    if gpu is None and gpu_slots:
                        i += 1
                        continue
                if len(free_cores) < need and running:
                    i += 1
                    continue
                cores = free_cores[:need] if len(free_cores) >= need else list(free_cores)
                with lock:
                    del free_cores[: len(cores)]
                    if gpu is not None:
                        gpu_slots[gpu] -= 1
                held[task.run_id] = (cores, gpu)
                pending.pop(i)
                running += 1
                start(task, cores, gpu)
            task, rec = out.get()
            if rec is None:
                cores, gpu = held.pop(task.run_id)
                free_cores = sorted(free_cores + cores)
                if gpu is not None:
                    gpu_slots[gpu] += 1
                running -= 1
                continue
            yield task, rec
