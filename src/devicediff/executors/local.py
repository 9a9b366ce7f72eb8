"""Local executor: several runs at once on this machine (``devicediff run --jobs N``).

Sharing out the machine:

- A CPU run gets a set of cores of its own, sized to its thread count and
  disjoint from every other run's (``sched_setaffinity``, applied in the worker
  before any thread starts), so a 4-thread run really has 4 cores.
- A GPU run takes one *slot* on a GPU (``--gpu-slots`` runs share a GPU) and
  one core (or its ``threads``). ``device = "cuda"`` takes the GPU with the most
  free slots; ``device = "cuda:N"`` waits for a slot on GPU N. Either way the
  worker sees only its GPU (``CUDA_VISIBLE_DEVICES``), so the job's device is
  rewritten to ``cuda:0``; the run's ``effective.placement`` records the cores,
  the physical GPU and the device the config asked for.
- A task waits until its cores and GPU slot are free; at most ``jobs`` run at
  once. A task bigger than the machine runs alone with every core.

Every worker runs in a session of its own. It dies with the thread that
started it (Linux ``PR_SET_PDEATHSIG``), so a runner killed by ``SIGKILL``
leaves no orphan behind that could write checkpoints or artifacts; elsewhere
the worker dies at its next record, when the record pipe breaks. Workers never
touch the store: the parent is its only writer.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterator

from devicediff.executors.base import Executor, Task, describe_exit, log_tail, worker_env
from devicediff.job import Job
from devicediff.protocol import FAILED, RECORD_FD_ENV, SKIPPED, read_records

CORES_ENV = "DEVICEDIFF_CORES"
PARENT_ENV = "DEVICEDIFF_PARENT_PID"

# The worker's first lines, run by the worker's own interpreter (any Python >= 3.5,
# standard library only): pin the cores before any framework starts a thread pool,
# ask the kernel to kill this process when its parent thread dies, drop the working
# directory from sys.path, then hand over to ``devicediff.worker``.
BOOT = r"""
import os, sys
cores = os.environ.pop("DEVICEDIFF_CORES", "")
if cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
parent = os.environ.get("DEVICEDIFF_PARENT_PID")
if parent and sys.platform.startswith("linux"):
    try:
        import ctypes, signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != int(parent):  # the parent died before the line above
        os._exit(70)
if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)  # a stray torch/ folder in the working directory must not shadow torch
from devicediff.worker import main
main()
"""


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """GPU ids as ``CUDA_VISIBLE_DEVICES`` would name them, without importing a
    framework: the parent's own ``CUDA_VISIBLE_DEVICES`` if set (indices or
    UUIDs), else ``0..n-1`` from ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return [str(i) for i in range(sum(1 for line in out.stdout.splitlines() if line.startswith("GPU")))]
    except (OSError, subprocess.SubprocessError):
        return []


def requested_gpu(device: str) -> int | None:
    """``cuda:N`` → N; ``cuda`` or ``cpu`` → None."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def place_job(job: Job, gpu: str | None) -> tuple[Job, dict]:
    """The job as the worker must see it when ``gpu`` is its only visible GPU
    (device rewritten to ``cuda:0``), and a note of what was changed."""
    device = job.device
    note: dict = {"requested_device": device, "device": device}
    if device.startswith("cuda") and gpu is not None:
        job = job.with_device("cuda:0")
        note.update(device="cuda:0", gpu=gpu, cuda_visible_devices=gpu)
    return job, note


def spawn_worker(task: Task, env: dict, cores: list[int] | None) -> tuple[subprocess.Popen, int]:
    """Start the worker with the job on stdin and a record pipe; returns ``(proc, read_fd)``."""
    r, w = os.pipe()
    env = {**env, RECORD_FD_ENV: str(w), PARENT_ENV: str(os.getpid())}
    env.pop(CORES_ENV, None)
    if cores and hasattr(os, "sched_setaffinity"):
        env[CORES_ENV] = ",".join(map(str, cores))
    try:
        with open(task.log_path, "ab") as log:
            proc = subprocess.Popen(
                [task.python or sys.executable, "-c", BOOT],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                pass_fds=(w,), start_new_session=True,
            )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        proc.stdin.write(task.job.to_json().encode())
        proc.stdin.close()
    except BrokenPipeError:  # the worker died at once; its exit code says why
        pass
    return proc, r


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started (its own session/process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def run_worker(
    task: Task,
    env: dict,
    cores: list[int] | None,
    emit: Callable[[dict], None],
    *,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> None:
    """Run one task to the end in this thread, passing each record to ``emit``.

    Always ends with exactly one ``done`` record: the worker's own, or one made
    here from the exit status and the log's last lines if the worker died.
    Records after ``done`` are dropped.
    """
    try:
        proc, r = spawn_worker(task, env, cores)
    except OSError as e:
        emit({"kind": "done", "state": FAILED, "error": f"cannot start worker with {task.python}: {e}"})
        return
    if on_start is not None:
        on_start(proc)
    done = False
    with os.fdopen(r, "r", errors="replace") as stream:
        for rec in read_records(stream):
            if done:
                continue
            done = rec["kind"] == "done"
            emit(rec)
    code = proc.wait()
    if not done:
        tail = [line for line in log_tail(task.log_path, 600).splitlines() if line.strip()][-3:]
        emit({"kind": "done", "state": FAILED, "error": describe_exit(code) + (": " + " | ".join(tail) if tail else "")})


class LocalExecutor(Executor):
    def __init__(self, *, jobs: int = 1, slots_per_gpu: int = 1, pin_cores: bool | None = None):
        self.jobs = max(1, int(jobs))
        self.slots_per_gpu = max(1, int(slots_per_gpu))
        # Pin only when running several at once: a lone run keeps the cores it was given.
        self.pin_cores = (self.jobs > 1) if pin_cores is None else pin_cores
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._closing = False

    # -- resources -----------------------------------------------------------------------
    def _pick_gpu(self, task: Task, gpus: list[str], slots: dict[str, int]) -> tuple[bool, str | None]:
        """``(can_start, gpu)`` for a task; ``gpu`` None when no GPU is involved or known."""
        if not task.gpus or not gpus:
            return True, None
        want = requested_gpu(task.job.device)
        if want is not None:
            g = gpus[want]
            return slots[g] > 0, g
        best = max(gpus, key=lambda g: slots[g])  # spread: the GPU with most free slots
        return slots[best] > 0, best

    # -- run -----------------------------------------------------------------------------------
    def execute(self, tasks: list[Task]) -> Iterator[tuple[Task, dict]]:
        cores_all = available_cores()
        free_cores = list(cores_all)
        gpus = visible_gpus()
        slots = {g: self.slots_per_gpu for g in gpus}
        out: queue.Queue = queue.Queue()
        pending: list[Task] = []
        for task in tasks:
            want = requested_gpu(task.job.device) if task.gpus else None
            if want is not None and gpus and want >= len(gpus):
                yield task, {"kind": "done", "state": SKIPPED,
                             "error": f"config asks for cuda:{want} but this machine shows {len(gpus)} GPU(s)"}
            else:
                pending.append(task)
        held: dict[str, tuple[list[int], str | None]] = {}

        def start(task: Task, cores: list[int], gpu: str | None) -> None:
            job, note = place_job(task.job, gpu)
            pinned = cores if self.pin_cores else None
            placement = {"executor": "local", **note, "cores": pinned}
            env = worker_env(job, gpu_index=gpu)
            wtask = Task(**{**task.__dict__, "job": job})

            def emit(rec: dict) -> None:
                if rec.get("kind") == "effective" and isinstance(rec.get("settings"), dict):
                    rec = {**rec, "settings": {**rec["settings"], "placement": placement}}
                out.put((task, rec))

            def register(proc: subprocess.Popen) -> None:
                with self._lock:
                    self._procs[task.run_id] = proc
                    closing = self._closing
                if closing:  # started just as the executor was stopped
                    kill_worker(proc)

            def body() -> None:
                try:
                    out.put((task, {"kind": "effective", "settings": {"placement": placement}}))
                    run_worker(wtask, env, pinned, emit, on_start=register)
                except BaseException as e:  # noqa: BLE001 - a run's failure is a record
                    out.put((task, {"kind": "done", "state": FAILED, "error": f"executor: {type(e).__name__}: {e}"}))
                finally:
                    with self._lock:
                        self._procs.pop(task.run_id, None)
                    out.put((task, None))  # finished: release its resources

            # The worker dies with this thread (PR_SET_PDEATHSIG), which lives until the worker ends.
            threading.Thread(target=body, daemon=True, name=f"run-{task.run_id}").start()

        running = 0
        finished: set[str] = set()
        self._closing = False
        try:
            while pending or running:
                i = 0
                while i < len(pending) and running < self.jobs:
                    task = pending[i]
                    need = min(max(1, task.cpus), len(cores_all))
                    ok, gpu = self._pick_gpu(task, gpus, slots)
                    if not ok or (len(free_cores) < need and running):
                        i += 1
                        continue
                    cores = free_cores[:need]
                    del free_cores[:need]
                    if gpu is not None:
                        slots[gpu] -= 1
                    held[task.run_id] = (cores, gpu)
                    pending.pop(i)
                    running += 1
                    start(task, cores, gpu)
                task, rec = out.get()
                if rec is None:
                    cores, gpu = held.pop(task.run_id)
                    free_cores = sorted(free_cores + cores)
                    if gpu is not None:
                        slots[gpu] += 1
                    running -= 1
                    continue
                if task.run_id in finished:
                    continue
                if rec.get("kind") == "done":
                    finished.add(task.run_id)
                yield task, rec
        finally:
            # Closed early (the parent failed or was interrupted): stop what still runs.
            self.kill_all()

    def kill_all(self) -> None:
        with self._lock:
            self._closing = True
            procs = list(self._procs.values())
        for proc in procs:
            kill_worker(proc)

    def close(self) -> None:
        self.kill_all()
