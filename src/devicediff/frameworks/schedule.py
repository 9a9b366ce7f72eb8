"""When a loop trains, evaluates and checkpoints: shared by every framework's loop.

Standard library only (the Chainer environment imports it too). ``ctx`` is any
loop context with ``job``, ``workload``, ``steps_per_epoch`` and ``total_steps``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator


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
