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

Warm workers (``devicediff.executors.warm``): each *slot* (cores + GPU slot) runs one
config's cells one after another in one worker process, taking the next cell of
that config as soon as one ends, until none is left; then it gives its cores
back. Several slots may run the same config. Configs whose process state cannot
be reset, and every run with ``isolate=True`` (``--isolate``), get a fresh
process per run. Each run's ``effective.placement.worker`` says which.

Prestarting (``prestart=True``, what ``devicediff run`` uses): a warm worker spends seconds
loading its framework before it can run anything, so the executor starts some ahead of time,
each with exactly the environment, interpreter and cores its slot will give it, and the slot
adopts it when it starts: the first slots' workers (``prestart(tasks)``, called before the
runner's preflight), and, with ``jobs == 1``, the next config's worker while the current run
leaves cores idle. A prestarted worker that no slot adopts (the prediction was wrong, e.g. a
resumed study) is killed at the end; its output until its first job goes to a file without a
name. Runs never overlap more than ``jobs`` allows: a prestarted worker runs nothing until its
slot starts. One of them may build the workload for the runner's
preflight (``check_workload``), so that the runner need not import torch.

Every worker runs in a session of its own. It dies with the thread that
started it (Linux ``PR_SET_PDEATHSIG``), so a runner killed by ``SIGKILL``
leaves no orphan behind that could write checkpoints or artifacts; elsewhere
the worker dies at its next record, when the record pipe breaks. Workers never
touch the store: the parent is its only writer.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, TextIO

from devicediff.executors.base import Executor, Task, describe_exit, log_tail, worker_env
from devicediff.executors.warm import isolation_reason, run_session, warm_key
from devicediff import errors
from devicediff.job import Job
from devicediff.protocol import FAILED, RECORD_FD_ENV, SKIPPED, read_records
from devicediff.worker import EARLY_LOG_ENV, PRELOAD_ENV, SPAWNED_ENV

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


def start_worker(task: Task, env: dict, cores: list[int] | None, *,
                 log: BinaryIO | None = None) -> tuple[subprocess.Popen, int]:
    """Start a worker (jobs go to its stdin) with a record pipe, its output to ``log`` (default:
    the task's log file); returns ``(proc, read_fd)``."""
    r, w = os.pipe()
    env = {**env, RECORD_FD_ENV: str(w), PARENT_ENV: str(os.getpid()), SPAWNED_ENV: repr(time.time())}
    env.pop(CORES_ENV, None)
    if cores and hasattr(os, "sched_setaffinity"):
        env[CORES_ENV] = ",".join(map(str, cores))
    try:
        with (log or open(task.log_path, "ab")) as log:
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
    return proc, r


def spawn_worker(task: Task, env: dict, cores: list[int] | None) -> tuple[subprocess.Popen, int]:
    """Start a worker for this one job (the end of its input follows); returns ``(proc, read_fd)``."""
    proc, r = start_worker(task, env, cores)
    try:
        proc.stdin.write(task.job.to_json().encode() + b"\n")
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


@dataclass
class _Prestarted:
    """A warm worker started ahead of its slot, loading its framework (or ready), not yet adopted."""

    signature: str
    proc: subprocess.Popen
    stream: TextIO  # its records
    python: str
    plain_env: bool  # its config sets no environment variables of its own

    def __post_init__(self) -> None:
        self.records = read_records(self.stream)

    def discard(self) -> None:
        kill_worker(self.proc)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.stream.close()
        except OSError:
            pass


def _signature(key: str, env: dict, cores: list[int] | None) -> str:
    """What a warm worker is fixed to at its start: only a slot with the same may adopt it."""
    return json.dumps([key, sorted(env.items()), cores])


class _Slot:
    """Cores and a GPU slot held by one worker thread, running tasks of one warm key (or one task)."""

    def __init__(self, key: str | None, cores: list[int], gpu: str | None):
        self.key, self.cores, self.gpu = key, cores, gpu
        self.inbox: queue.Queue = queue.Queue()
        self.tasks: list[Task] = []  # handed to this slot, in order
        self.error: str | None = None


class LocalExecutor(Executor):
    def __init__(self, *, jobs: int = 1, slots_per_gpu: int = 1, pin_cores: bool | None = None,
                 isolate: bool = False, prestart: bool = False):
        self.jobs = max(1, int(jobs))
        self.slots_per_gpu = max(1, int(slots_per_gpu))
        # Pin only when running several at once: a lone run keeps the cores it was given.
        self.pin_cores = (self.jobs > 1) if pin_cores is None else pin_cores
        self.isolate = bool(isolate)  # one fresh process per run (--isolate)
        self.prestart_workers = bool(prestart) and not self.isolate  # start warm workers ahead of their slots
        self.fallbacks: dict[str, str] = {}  # config name -> why its runs got a process each
        self.adopted = 0  # prestarted workers a slot took over (tests, benchmarks)
        self.checked = 0  # preflight builds a prestarted worker did (check_workload)
        self._procs: dict[int, subprocess.Popen] = {}
        self._idle: list[_Prestarted] = []  # prestarted, not adopted yet
        self._prestarted_for: set[str] = set()  # run ids a worker was prestarted for during execute
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

    def _keys(self, tasks: list[Task]) -> dict[str, str | None]:
        """Each task's warm key; None for a task that runs in a process of its own."""
        keys: dict[str, str | None] = {}
        for task in tasks:
            reason = "--isolate" if self.isolate else isolation_reason(task)
            keys[task.run_id] = None if reason else warm_key(task)
            if reason and not self.isolate:
                self.fallbacks[str(task.job.config.get("name", task.run_id))] = reason
        return keys

    # -- run -----------------------------------------------------------------------------------
    @staticmethod
    def _beyond(task: Task, gpus: list[str]) -> int | None:
        """N when the task asks for ``cuda:N`` and this machine shows no GPU N (it is skipped)."""
        want = requested_gpu(task.job.device) if task.gpus else None
        return want if want is not None and gpus and want >= len(gpus) else None

    def execute(self, tasks: list[Task]) -> Iterator[tuple[Task, dict]]:
        cores_all = available_cores()
        free = {"cores": list(cores_all), "gpus": {g: self.slots_per_gpu for g in visible_gpus()}}
        gpus = list(free["gpus"])
        out: queue.Queue = queue.Queue()
        pending: list[Task] = []
        for task in tasks:
            want = self._beyond(task, gpus)
            if want is not None:
                yield task, {"kind": "done", "state": SKIPPED,
                             "error": f"config asks for cuda:{want} but this machine shows {len(gpus)} GPU(s)"}
            else:
                pending.append(task)
        keys = self._keys(pending)
        running: list[_Slot] = []
        finished: set[str] = set()
        store_time: dict[str, float] = {}
        self._closing = False
        try:
            while pending or running:
                self._start_fitting(pending, keys, free, len(cores_all), running, out)
                self._prestart_next(pending, keys, cores_all, gpus, running)
                msg = out.get()
                if msg[0] == "next":  # a warm slot finished a run: the next cell of its config, if any
                    slot = msg[1]
                    i = next((i for i, t in enumerate(pending) if keys[t.run_id] == slot.key), None)
                    slot.inbox.put(None if i is None else pending.pop(i))
                    continue
                if msg[0] == "end":
                    slot = msg[1]
                    running.remove(slot)
                    free["cores"] = sorted(free["cores"] + slot.cores)
                    if slot.gpu is not None:
                        free["gpus"][slot.gpu] += 1
                    msg = ("lost", slot)
                for task, rec in self._records(msg, finished):
                    if rec.get("kind") == "done":
                        finished.add(task.run_id)
                        rec = {**rec, "timing": {**(rec.get("timing") or {}), "store": round(store_time.get(task.run_id, 0.0), 6)}}
                    t = time.perf_counter()
                    yield task, rec
                    store_time[task.run_id] = store_time.get(task.run_id, 0.0) + time.perf_counter() - t
        finally:
            # Closed early (the parent failed or was interrupted): stop what still runs;
            # and prestarted workers no slot took.
            self.kill_all()

    @staticmethod
    def _records(msg: tuple, finished: set[str]) -> Iterator[tuple[Task, dict]]:
        """The records a message carries: a worker's, or a ``done`` for each task an ended slot
        was given and never finished (the executor itself failed there)."""
        if msg[0] == "rec":
            if msg[1].run_id not in finished:
                yield msg[1], msg[2]
            return
        slot = msg[1]
        for task in slot.tasks:
            if task.run_id not in finished:
                yield task, {"kind": "done", "state": FAILED, "error": f"executor: {slot.error or 'the run ended without a result'}"}

    def _fitting(self, pending: list[Task], free: dict, n_cores: int, n_running: int) -> Iterator[tuple[Task, list[int], str | None]]:
        """Take each pending task (in order) whose cores and GPU slot are free: ``(task, cores, gpu)``,
        removed from ``pending`` and its resources from ``free``."""
        i = 0
        while i < len(pending) and n_running < self.jobs:
            task = pending[i]
            need = min(max(1, task.cpus), n_cores)
            ok, gpu = self._pick_gpu(task, list(free["gpus"]), free["gpus"])
            if not ok or (len(free["cores"]) < need and n_running):
                i += 1
                continue
            cores = free["cores"][:need]
            del free["cores"][:need]
            if gpu is not None:
                free["gpus"][gpu] -= 1
            pending.pop(i)
            n_running += 1
            yield task, cores, gpu

    def _start_fitting(self, pending: list[Task], keys: dict, free: dict, n_cores: int, running: list[_Slot],
                       out: queue.Queue) -> None:
        """Start a slot for each pending task (in order) whose cores and GPU slot are free."""
        for task, cores, gpu in self._fitting(pending, free, n_cores, len(running)):
            slot = _Slot(keys[task.run_id], cores, gpu)
            running.append(slot)
            self._start_slot(slot, task, out)

    # -- prestarted warm workers ---------------------------------------------------------------
    def _slot_env(self, task: Task, key: str, cores: list[int], gpu: str | None) -> tuple[dict, list[int] | None, str]:
        """The environment and cores a warm slot for ``task`` starts its worker with, and their signature."""
        job, _ = place_job(task.job, gpu)
        env = worker_env(job, gpu_index=gpu)
        pinned = cores if self.pin_cores else None
        return env, pinned, _signature(key, env, pinned)

    def prestart(self, tasks: list[Task]) -> int:
        """Start the warm workers of the slots ``execute(tasks)`` will start first, so that they load
        their framework while the caller still prepares (preflight, store). Returns how many."""
        if not self.prestart_workers:
            return 0
        cores_all = available_cores()
        gpus = visible_gpus()
        free = {"cores": list(cores_all), "gpus": {g: self.slots_per_gpu for g in gpus}}
        pending = [t for t in tasks if self._beyond(t, gpus) is None]
        started = 0
        for task, cores, gpu in list(self._fitting(pending, free, len(cores_all), 0)):
            if isolation_reason(task) is None and self._start_idle(task, warm_key(task), cores, gpu):
                started += 1
        return started

    def _prestart_next(self, pending: list[Task], keys: dict, cores_all: list[int], gpus: list[str],
                       running: list[_Slot]) -> None:
        """With one slot at a time: start the worker of the slot that comes next (the first pending
        task of another config) while the running one leaves cores idle. At most two wait at once."""
        if not self.prestart_workers or self.jobs != 1 or len(running) != 1 or len(self._idle) >= 2:
            return
        slot = running[0]
        if slot.key is None or len(slot.cores) >= len(cores_all):
            return
        nxt = next((t for t in pending if keys[t.run_id] != slot.key), None)
        if nxt is None or keys[nxt.run_id] is None or nxt.run_id in self._prestarted_for:
            return
        self._prestarted_for.add(nxt.run_id)
        free = {"cores": list(cores_all), "gpus": {g: self.slots_per_gpu for g in gpus}}  # as when this slot ends
        for task, cores, gpu in self._fitting([nxt], free, len(cores_all), 0):
            self._start_idle(task, keys[task.run_id], cores, gpu)

    def _start_idle(self, task: Task, key: str, cores: list[int], gpu: str | None) -> bool:
        env, pinned, sig = self._slot_env(task, key, cores, gpu)
        env = {**env, PRELOAD_ENV: task.job.framework, EARLY_LOG_ENV: "1"}
        try:
            # Its output until its first job: a file without a name (nothing is left if it is killed),
            # readable by the worker, which copies it into that job's log.
            proc, r = start_worker(task, env, pinned, log=tempfile.TemporaryFile("w+b"))
        except OSError:
            return False  # its slot will start one itself, and say what is wrong
        stream = os.fdopen(r, "r", errors="replace")
        with self._lock:
            self._idle.append(_Prestarted(sig, proc, stream, task.python, not task.job.config.get("env")))
        return True

    def _adopt(self, signature: str) -> tuple[subprocess.Popen, TextIO] | None:
        """A prestarted worker with this signature, still alive, handed over; None if there is none."""
        with self._lock:
            for i, w in enumerate(self._idle):
                if w.signature == signature and w.proc.poll() is None:
                    del self._idle[i]
                    self.adopted += 1
                    return w.proc, w.stream
        return None

    def check_workload(self, name: str, params: dict) -> bool:
        """The runner's preflight build of a built-in workload with ``params``, done in a prestarted
        worker of this interpreter (which loads torch anyway) instead of in this process, which then
        need not import torch at all. True: built without error. Raises the ``DevicediffError``
        the build raised (the same class and message). False: not done there (no such worker, it
        died, or the error was no user's): build it here, as without a worker."""
        from devicediff.workloads import builtin_name

        if builtin_name(name) is None:  # a user's workload may read what differs in a worker's environment
            return False
        with self._lock:
            w = next((w for w in self._idle if w.python == sys.executable and w.plain_env and w.proc.poll() is None), None)
        if w is None:
            return False
        try:
            w.proc.stdin.write((json.dumps({"check": {"workload": name, "params": params}}) + "\n").encode())
            w.proc.stdin.flush()
        except (OSError, TypeError, ValueError):  # a dead worker, or parameters JSON cannot carry
            return False
        rec = next((r for r in w.records if r.get("kind") == "checked"), None)
        if rec is None:
            return False  # it died
        err = rec.get("error")
        if err is None:
            self.checked += 1
            return True
        cls = getattr(errors, str(err.get("type")), None) if err.get("module") == errors.__name__ else None
        if isinstance(cls, type) and issubclass(cls, errors.DevicediffError):
            raise cls(err.get("message", ""))
        return False

    def _discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.discard()

    def _start_slot(self, slot: _Slot, first: Task, out: queue.Queue) -> None:
        """A thread that runs ``first`` (and, warm, the further tasks of its key) and then ends the slot.
        Its workers die with it (PR_SET_PDEATHSIG); it lives until they end."""
        pinned = slot.cores if self.pin_cores else None
        reason = None if slot.key is not None else ("--isolate" if self.isolate else isolation_reason(first))
        originals: dict[str, Task] = {}
        placements: dict[str, dict] = {}

        def placed(task: Task) -> Task:
            """The task as its worker sees it (device rewritten for the visible GPU); noted."""
            slot.tasks.append(task)
            job, note = place_job(task.job, slot.gpu)
            placements[task.run_id] = {"executor": "local", **note, "cores": pinned}
            if reason:
                placements[task.run_id]["worker"] = {"mode": "isolated", "reason": reason}
            originals[task.run_id] = task
            return Task(**{**task.__dict__, "job": job})

        def emit(task: Task, rec: dict) -> None:
            if rec.get("kind") == "effective" and isinstance(rec.get("settings"), dict):
                place = {**placements[task.run_id], **(rec["settings"].get("placement") or {})}
                placements[task.run_id] = place
                rec = {**rec, "settings": {**rec["settings"], "placement": place}}
            out.put(("rec", originals[task.run_id], rec))

        def register(proc: subprocess.Popen) -> None:
            with self._lock:
                self._procs[id(slot)] = proc
                closing = self._closing
            if closing:  # started just as the executor was stopped
                kill_worker(proc)

        def next_task() -> Task | None:
            out.put(("next", slot))
            task = slot.inbox.get()
            return None if task is None else placed(task)

        def body() -> None:
            try:
                task = placed(first)
                emit(task, {"kind": "effective", "settings": {"placement": {}}})
                env = worker_env(task.job, gpu_index=slot.gpu)  # the same for every task of a warm key
                if slot.key is None:
                    run_worker(task, env, pinned, lambda rec: emit(task, rec), on_start=register)
                elif self.prestart_workers:
                    sig = _signature(slot.key, env, pinned)
                    run_session(task, next_task, env, pinned, emit, on_start=register, adopt=lambda: self._adopt(sig))
                else:
                    run_session(task, next_task, env, pinned, emit, on_start=register)
            except BaseException as e:  # noqa: BLE001 - a run's failure is a record (made at "end")
                slot.error = f"{type(e).__name__}: {e}"
            finally:
                with self._lock:
                    self._procs.pop(id(slot), None)
                out.put(("end", slot))

        threading.Thread(target=body, daemon=True, name=f"slot-{first.run_id}").start()

    def kill_all(self) -> None:
        with self._lock:
            self._closing = True
            procs = list(self._procs.values())
        for proc in procs:
            kill_worker(proc)
        self._discard_idle()

    def close(self) -> None:
        self.kill_all()
