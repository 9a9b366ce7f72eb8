"""When a loop trains, evaluates and checkpoints, and how it ends: shared by every framework's loop.

Standard library only (the Chainer environment imports it too). ``ctx`` is any
loop context with ``job``, ``workload``, ``steps_per_epoch`` and ``total_steps``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

from devicediff.protocol import FINISHED


def total_steps(budget: dict, steps_per_epoch: int) -> int:
    return int(budget["steps"]) if budget.get("steps") else int(budget["epochs"]) * steps_per_epoch


def batches_from(ctx: Any, step: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(global_step, batch)`` from ``step`` on, across epochs, until the budget.
    A resumed run skips the batches of its epoch that it already trained on."""
    epoch, skip = divmod(step, ctx.steps_per_epoch)
    while step < ctx.total_steps:
        for i, b in enumerate(ctx.workload.train_batches(int(ctx.job["data_seed"]), epoch)):
            if i < skip:
                continue
            if step >= ctx.total_steps:
                return
            yield step, b
            step += 1
        epoch, skip = epoch + 1, 0


def checkpoint_due(ctx: Any, step: int) -> bool:
    """After ``step`` steps, and never after the last one."""
    if step >= ctx.total_steps:
        return False
    every = ctx.job["budget"].get("checkpoint_every")
    if every:
        return step % every == 0
    # Default: at epoch ends of multi-epoch runs, where no recurrent state is carried.
    return ctx.total_steps > ctx.steps_per_epoch and step % ctx.steps_per_epoch == 0


def eval_due(ctx: Any, step: int) -> bool:
    every = ctx.job["budget"].get("eval_every_steps")
    if every:
        return step % every == 0 or step == ctx.total_steps
    return step % ctx.steps_per_epoch == 0 or step == ctx.total_steps


def orphaned() -> bool:
    """True when the runner that started this worker is gone: such a worker must
    not leave files (checkpoints) behind for the next runner to pick up."""
    parent = os.environ.get("DEVICEDIFF_PARENT_PID")
    return bool(parent) and os.getppid() != int(parent)


def finish(ctx: Any, writer: Any, artifacts: dict, *, final_sha256: str, t_start: float, train_time: float,
           start: int, threads_used: Any) -> None:
    """End of a run that trained to its budget: its artifacts, its checkpoint removed (there is
    nothing left to resume), and the ``done`` record, the same fields from every framework."""
    for name, path in artifacts.items():
        writer.emit("artifact", name=name, path=str(path))
    checkpoint = ctx.job.get("checkpoint_path")
    if checkpoint and os.path.exists(checkpoint):
        os.remove(checkpoint)
    writer.emit(
        "done",
        state=FINISHED,
        final_sha256=final_sha256,
        wall_time=time.perf_counter() - t_start,
        train_time=train_time,
        steps_run=ctx.total_steps - start,
        resumed_from=start,
        threads_used=threads_used,
    )
