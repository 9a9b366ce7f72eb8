"""The measurement behind docs/replication.md: the first training window of a Chainer config,
forward and backward once with ``fresh`` and once with ``reused`` frame buffers, from the same
initial weights (runs inside the Chainer environment; ``devicediff chainer-gradients`` starts it)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from devicediff.frameworks.chainer.backend import chainer_device, load_twin
from devicediff.job import Job


def frame_buffer_gradients(job: Job) -> dict:
    """The first training window of ``job`` (its init and data seeds), forward and backward
    once with ``fresh`` and once with ``reused`` frame buffers, from the same initial weights.
    Returns both losses and the relative L2 error of the reused gradient,
    ||g_reused - g_fresh|| / ||g_fresh||, over all parameters and per parameter."""
    import copy

    import chainer

    from devicediff.frameworks.chainer.common import FrameFeeder, torch_name

    device = chainer_device(job.config)
    out = Path(tempfile.mkdtemp(prefix="devicediff_gradients_"))
    wl, model0, meta = load_twin(job, out)
    batch = next(iter(wl.train_batches(int(job.data_seed), 0)))
    losses, grads = {}, {}
    for mode in ("fresh", "reused"):
        model = copy.deepcopy(model0)
        model.to_device(device)
        wl.reset_state()
        loss = wl.loss(model, batch, FrameFeeder(mode, device.xp))
        model.cleargrads()
        loss.backward()
        losses[mode] = float(loss.array)
        grads[mode] = {torch_name(k): chainer.backends.cuda.to_cpu(p.grad).astype(np.float64) for k, p in model.namedparams()}
    gf, gr = grads["fresh"], grads["reused"]
    num = sum(float(((gr[k] - gf[k]) ** 2).sum()) for k in gf)
    den = sum(float((gf[k] ** 2).sum()) for k in gf)
    per = {k: float(np.linalg.norm(gr[k] - gf[k]) / max(np.linalg.norm(gf[k]), 1e-300)) for k in sorted(gf)}
    return {
        "device": job.device,
        "frames_in_window": int(batch.data.shape[1] - 1),
        "loss_fresh": losses["fresh"],
        "loss_reused": losses["reused"],
        "loss_identical": losses["fresh"] == losses["reused"],
        "grad_rel_l2": math.sqrt(num / den) if den else float("nan"),
        "grad_rel_l2_per_param": per,
        "init_sha256": meta["sha256"],
    }


def main() -> None:
    """Entry in the Chainer environment: a job as JSON on stdin, the result as JSON on stdout."""
    import json
    import sys

    print(json.dumps(frame_buffer_gradients(Job.from_json(sys.stdin.read())), indent=1))


if __name__ == "__main__":
    main()
