"""One training driver and one lockstep driver for every framework.

A framework supplies two small objects (``frameworks/<name>/``):

* a :class:`Backend`: one run's model, optimizer and workload in that framework: one
  training step, evaluation, weights, checkpoints;
* a :class:`LockstepSide` (``devicediff diverge``): the same step under teacher forcing,
  its float64 reference, a repeat, and a free-running copy, as flat numpy arrays.

Everything else (when to evaluate and checkpoint, atomic checkpoint files, the record
stream, clocks, the order of lockstep work and the step files) lives here once.
Standard library and numpy only: the Chainer environment runs it too.
"""

from __future__ import annotations

import math
import os
import sys
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from devicediff.frameworks.threads import ThreadSampler
from devicediff.job import Job
from devicediff.protocol import FINISHED, RecordWriter

MAX_SNAPSHOT_PARAMS = 5_000_000  # larger models get weight hashes at evaluations, no snapshots


class Backend(ABC):
    """One run in one framework, prepared (settings applied, ``env``/``effective``/``init``
    records emitted, model on its device) by the constructor."""

    job: Job
    writer: RecordWriter
    workload: Any
    total_steps: int
    steps_per_epoch: int
    outdir: Path

    @abstractmethod
    def train_step(self, step: int, batch: Any) -> Any:
        """One optimizer update on ``batch`` (0-based ``step``); return the loss, unsynchronised."""

    @abstractmethod
    def loss_value(self, loss: Any) -> float:
        """The loss as a Python float (synchronises)."""

    @abstractmethod
    def evaluate(self) -> Mapping[str, float]:
        """Held-out metrics of the current model."""

    @abstractmethod
    def artifacts(self) -> Mapping[str, Any]:
        """Files for the report at the end of the run, ``{name: path}``."""

    @abstractmethod
    def state_sha256(self) -> str:
        """SHA-256 of the model's state, equal across frameworks for equal weights."""

    @abstractmethod
    def flat_weights(self) -> np.ndarray:
        """All parameters, sorted by name, flattened, in their own dtype."""

    @abstractmethod
    def n_params(self) -> int: ...

    @abstractmethod
    def write_checkpoint(self, path: str, step: int) -> None:
        """Write model, optimizer and RNG state after ``step`` steps to ``path``."""

    @abstractmethod
    def read_checkpoint(self, path: str) -> tuple[int, Callable[[], None]]:
        """Read a checkpoint without touching the run: return its step and a function that
        restores it. Raise anything if the file is unusable."""

    def sync(self) -> None:
        """Wait for the device (clocks are read after it)."""


# -- schedule ------------------------------------------------------------------------------------------


def total_steps(budget: dict, steps_per_epoch: int) -> int:
    return int(budget["steps"]) if budget.get("steps") else int(budget["epochs"]) * steps_per_epoch


def batches_from(workload: Any, data_seed: int, steps_per_epoch: int, step: int, total: int) -> Iterator[tuple[int, Any]]:
    """``(global_step, batch)`` from ``step`` on, across epochs, until ``total``; a resumed run
    skips the batches of its epoch that it already trained on."""
    epoch, skip = divmod(step, steps_per_epoch)
    while step < total:
        for i, b in enumerate(workload.train_batches(int(data_seed), epoch)):
            if i < skip:
                continue
            if step >= total:
                return
            yield step, b
            step += 1
        epoch, skip = epoch + 1, 0


def endless_batches(workload: Any, data_seed: int) -> Iterator[Any]:
    """The run's batches in order, across epochs, without end (lockstep)."""
    epoch = 0
    while True:
        n = 0
        for b in workload.train_batches(int(data_seed), epoch):
            n += 1
            yield b
        if n == 0:
            raise RuntimeError("the workload yielded no batches")
        epoch += 1


def checkpoint_due(b: Backend, step: int) -> bool:
    """After ``step`` steps, and never after the last one."""
    if step >= b.total_steps:
        return False
    every = b.job.budget.get("checkpoint_every")
    if every:
        return step % every == 0
    # Default: at epoch ends of multi-epoch runs, where no recurrent state is carried.
    return b.total_steps > b.steps_per_epoch and step % b.steps_per_epoch == 0


def eval_due(b: Backend, step: int) -> bool:
    every = b.job.budget.get("eval_every_steps") or b.steps_per_epoch
    return step % every == 0 or step == b.total_steps


def orphaned() -> bool:
    """True when the runner that started this worker is gone: such a worker must not leave
    files (checkpoints) behind for the next runner to pick up."""
    parent = os.environ.get("DEVICEDIFF_PARENT_PID")
    return bool(parent) and os.getppid() != int(parent)


# -- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(b: Backend, step: int) -> None:
    """Through a temporary file private to this process, then an atomic rename: a kill leaves
    the old checkpoint or the new one, never half of one."""
    path = b.job.checkpoint_path
    if not path:
        return
    if orphaned():
        raise SystemExit("devicediff worker: the runner is gone; exiting without writing a checkpoint")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        b.write_checkpoint(tmp, step)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(b: Backend) -> int:
    """Restore this run's last checkpoint, if any; return the step to go on from. One that cannot
    be read (another framework's or torch's, a torn file) is set aside and the run starts over."""
    path = b.job.checkpoint_path
    if not path:
        return 0
    folder, base = os.path.split(path)
    for name in os.listdir(folder or "."):  # temporaries of killed writers
        if name.startswith(base + ".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    if not os.path.exists(path):
        return 0
    try:
        step, restore = b.read_checkpoint(path)
        if not 0 < step < b.total_steps:
            raise ValueError(f"step {step} of {b.total_steps}")
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start over
        os.replace(path, path + ".unreadable")
        print(f"devicediff: checkpoint {path} unreadable ({type(e).__name__}: {e}); starting from step 0",
              file=sys.stderr, flush=True)
        return 0
    restore()  # a file that reads but does not fit the model fails the run, as it should
    b.workload.reset_state()
    return step


# -- training ------------------------------------------------------------------------------------------


def evaluate(b: Backend, step: int) -> None:
    for name, value in b.evaluate().items():
        b.writer.metric(step, name, float(value))
    snap = None
    if b.job.snapshots and b.n_params() <= MAX_SNAPSHOT_PARAMS:
        snap = b.outdir / f"weights_step{step:07d}.npy"
        np.save(snap, b.flat_weights())
    b.writer.emit("weights", step=step, sha256=b.state_sha256(), path=str(snap) if snap else None)


def train(b: Backend, t_start: float) -> None:
    """Train ``b`` to its budget (resuming from its checkpoint), evaluating and checkpointing on
    the schedule, and end with the ``done`` record."""
    writer = b.writer
    every = max(1, int(b.job.budget.get("metric_every", 10)))
    t_first = time.perf_counter()
    start = load_checkpoint(b)
    t_loaded = time.perf_counter()
    if start == 0:
        evaluate(b, 0)
    writer.emit("progress", step=start, total=b.total_steps)

    sampler = ThreadSampler()
    b.sync()
    t_train = time.perf_counter()
    side = {"eval": 0.0, "checkpoint": 0.0}  # seconds in the loop spent outside training steps
    for step, batch in batches_from(b.workload, b.job.data_seed, b.steps_per_epoch, start, b.total_steps):
        loss = b.train_step(step, batch)
        done = step + 1
        if done % every == 0 or done == b.total_steps:
            value = b.loss_value(loss)  # synchronises, only at the metric cadence
            writer.metric(done, "train_loss", value)
            writer.emit("progress", step=done, total=b.total_steps)
            if not math.isfinite(value):
                raise FloatingPointError(f"diverged: train_loss is {value} at step {done}")
        for due, part, act in ((eval_due, "eval", evaluate), (checkpoint_due, "checkpoint", save_checkpoint)):
            if due(b, done):
                b.sync()
                t_side = time.perf_counter()
                act(b, done)
                b.sync()
                side[part] += time.perf_counter() - t_side
    b.sync()
    t_end = time.perf_counter()
    train_time = t_end - t_train - side["eval"] - side["checkpoint"]

    for name, path in b.artifacts().items():
        writer.emit("artifact", name=name, path=str(path))
    if b.job.checkpoint_path and os.path.exists(b.job.checkpoint_path):
        os.remove(b.job.checkpoint_path)  # nothing left to resume
    final = b.state_sha256()
    # Where the run's time went (s): eval includes step 0's, checkpoint the one read at the start.
    timing = {"train": train_time, "eval": side["eval"] + t_train - t_loaded,
              "checkpoint": side["checkpoint"] + t_loaded - t_first, "finish": time.perf_counter() - t_end}
    writer.emit("done", state=FINISHED, final_sha256=final, wall_time=time.perf_counter() - t_start,
                train_time=train_time, steps_run=b.total_steps - start, resumed_from=start,
                threads_used=sampler.report(), timing={k: round(v, 6) for k, v in timing.items()})


# -- lockstep ------------------------------------------------------------------------------------------


class LockstepSide(ABC):
    """One config stepped under teacher forcing (see docs/diverge.md). Each ``*_step`` returns
    flat step-file arrays (``devicediff.stepfiles`` keys)."""

    backend: Backend
    on_gpu: bool = False

    @abstractmethod
    def teacher_sync(self) -> None:
        """Working copy := float64 reference state rounded to its dtype; reference := working (exact)."""

    def carried_state(self) -> Any:
        """The workload's state carried between batches (its attributes), to restore before a repeat."""
        return dict(vars(self.backend.workload))

    def restore_carried(self, state: Any) -> None:
        vars(self.backend.workload).clear()
        vars(self.backend.workload).update(state)

    #: what the last first-run ``step`` found out, sent with the step's ``lockstep`` record:
    #: ``parity`` (step 1: None, or ``{"tensor", "rel"}`` where the faithful replay differs),
    #: ``random`` (draws on the framework's generators, described), ``random_modules``,
    #: ``random_devices``, ``random_generators``
    info: dict = {}

    @abstractmethod
    def step(self, step: int, batch: Any, lr: float | None) -> dict[str, np.ndarray]:
        """The config's step with recorders: ``fwd/``, ``loss/``, ``grad/`` arrays and what carries
        over (``weight/``, ``buffer/``, ``optim/``, ``scaler/``, ``carry/``), plus the side's
        rounding model (``local/``) where it has one. Called again for a repeat."""

    @abstractmethod
    def reference_step(self, step: int, batch: Any, lr: float | None) -> dict[str, np.ndarray]:
        """The float64 reference's step, keys prefixed ``ref64/``."""

    @abstractmethod
    def free_step(self, step: int, batch: Any, lr: float | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The free-running copy's step: (loss, {weight name or "kind/name": array})."""

    def record_ops(self, step: int, batch: Any, lr: float | None, out_dir: str) -> None:
        """The config's step ``step`` from the teacher state, with every operation recorded into
        ``out_dir`` (docs/diverge.md, "Operation-level localisation"). This default records
        nothing: the localisation then says so and stops at the module."""

    def learning_rate(self, step: int) -> float | None:
        return self.backend.workload.learning_rate(step, self.backend.total_steps)

    def close(self) -> None:
        pass


def _timed_write(outdir: str, step: int, arrays: dict) -> tuple[Any, float]:
    from devicediff.stepfiles import write_step

    t = time.perf_counter()
    path = write_step(outdir, step, arrays)
    return path, time.perf_counter() - t


def lockstep(side: LockstepSide, t_start: float) -> None:  # long: one step's timed phases, in order
    """Run ``side`` for the job's lockstep steps, one step file each, then ``done``; or, for the
    operation pass (``ops_at``), the steps before it without files and then its operation record."""
    from devicediff.stepfiles import assemble_step

    b = side.backend
    spec = b.job.lockstep
    writer = b.writer
    varied = False  # has any repeat come out with other bits?
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lockstep-write")
    pending = None

    def announce(p) -> None:
        fut, s, tm, extra = p
        path, dt = fut.result()
        tm["write"] = dt
        writer.emit("lockstep", step=s, path=str(path), total=spec.steps,
                    timing={k: round(v, 6) for k, v in tm.items()}, **extra)

    batches = endless_batches(b.workload, b.job.data_seed)
    try:
        for step in range(1, spec.steps + 1):
            batch = next(batches)
            lr = side.learning_rate(step - 1)
            if spec.ops_at is not None:  # the operation pass: the teacher-forced trajectory, then one record
                side.teacher_sync()
                if step == spec.ops_at:
                    side.record_ops(step, batch, lr, spec.dir)
                    break
                side.step(step, batch, lr)
                side.reference_step(step, batch, lr)
                continue
            timing: dict[str, float] = {}
            b.sync()
            t0 = time.perf_counter()
            side.teacher_sync()
            b.sync()
            timing["sync"] = time.perf_counter() - t0
            carried = side.carried_state()
            res = side.step(step, batch, lr)
            # the working state after the step, hashed as in a normal run: the parent checks
            # that bitwise-equal tensors mean equal states
            extra = {"sha256": b.state_sha256(), **dict(getattr(side, "info", None) or {})}
            b.sync()
            t1 = time.perf_counter()
            timing["config"] = t1 - t0 - timing["sync"]

            res2 = None
            if spec.repeat == "always" or (spec.repeat == "auto" and (step == 1 or varied or side.on_gpu)):
                side.teacher_sync()  # the reference still holds the exact pre-step state
                side.restore_carried(carried)
                res2 = side.step(step, batch, lr)
                b.sync()
            t2 = time.perf_counter()
            timing["repeat"] = t2 - t1
            ref = side.reference_step(step, batch, lr)
            t3 = time.perf_counter()
            timing["ref64"] = t3 - t2
            free_loss, free_weights = side.free_step(step, batch, lr) if spec.free else (None, None)
            b.sync()
            t4 = time.perf_counter()
            timing["free"] = t4 - t3

            arrays, step_varied = assemble_step(step, res, ref, res2, free_loss=free_loss, free_weights=free_weights)
            varied = varied or step_varied
            t5 = time.perf_counter()
            timing["gather"] = t5 - t4
            # Written by a helper thread while the next step computes (numpy releases the GIL
            # while writing); the record goes out once the file is complete.
            if pending is not None:
                announce(pending)
            timing["wait"] = time.perf_counter() - t5
            timing["total"] = time.perf_counter() - t0
            pending = (pool.submit(_timed_write, spec.dir, step, arrays), step, timing, extra)
        if pending is not None:
            announce(pending)
    finally:
        pool.shutdown()
        side.close()
    writer.emit("done", state=FINISHED, final_sha256=b.state_sha256(), wall_time=time.perf_counter() - t_start,
                steps_run=spec.steps)
