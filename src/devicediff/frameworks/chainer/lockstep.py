"""The Chainer side of ``devicediff diverge``: the same protocol, steps and step-file keys
(``devicediff.stepfiles``) as the PyTorch side, so a Chainer config can be diverged
against a PyTorch one.

Each step: teacher-force the working model and Adam state to the float64 reference (rounded
to float32), run the config's step with forward and gradient recorders, repeat it when the
driver asks, run the float64 reference step on the CPU (Chainer in float64, the same
frame-buffer mode), and a free-running copy. Keys use the PyTorch names:
``fwd/layers.0.lstm`` (leaf links; first call, and ``@K`` for the last of K calls;
``fwd/<model>`` when the model itself is called and returns one array), ``grad/NAME`` in the
order backward finished each parameter, ``weight/NAME``, ``loss/loss``, and Adam's state as
``optim/NAME.step|exp_avg|exp_avg_sq`` (PyTorch's names). No rounding model (``local/``) and
no parity check yet: a Chainer side's tensors are judged by the ratio rule alone, and
localisation stops at the module (link), said plainly in docs/diverge.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from devicediff.frameworks import _driver
from devicediff.frameworks.chainer.backend import ChainerBackend


#: the per-function summary ``record_ops`` writes beside ``ops.json`` (read by the diverge parent)
OPS_SUMMARY = "ops-summary.json"


def _link_name(path: str) -> str:
    return path.strip("/").replace("/", ".")


def _make_recorders(model):  # long: two small hook classes that close over the model
    import chainer

    from devicediff.stepfiles import MODEL_NAME

    class ForwardRecorder(chainer.LinkHook):
        """Outputs of the leaf links (and of the model when it is called), host copies."""

        name = "devicediff_lockstep_forward"

        def __init__(self):
            self.names = {}
            for path, link in model.namedlinks():
                root = path == "/"
                if root or next(iter(link.children()), None) is None:
                    self.names[id(link)] = (MODEL_NAME if root else _link_name(path), root)
            self.reset()

        def reset(self):
            self.calls, self.first, self.last = {}, {}, {}

        def forward_postprocess(self, args):
            hit = self.names.get(id(args.link))
            if hit is None:
                return
            name, root = hit
            out = args.out
            leaves = [out] if isinstance(out, chainer.Variable) else (
                [v for v in out if isinstance(v, chainer.Variable)] if isinstance(out, (tuple, list)) else [])
            if not leaves or (root and len(leaves) != 1):
                return
            snap = [chainer.backends.cuda.to_cpu(v.array).copy() for v in leaves]
            k = self.calls.get(name, 0) + 1
            self.calls[name] = k
            (self.first if k == 1 else self.last)[name] = snap

        def outputs(self) -> dict:
            from devicediff.stepfiles import name_outputs

            return name_outputs(self.first, self.last, self.calls)

    class GradOrder(chainer.FunctionHook):
        """Order in which backward finished each parameter: the last backward step that
        fed it (PyTorch's post-accumulate-grad hook fires at that point)."""

        name = "devicediff_lockstep_grad_order"

        def __init__(self):
            from devicediff.frameworks.chainer.common import torch_name

            self.ids = {id(p): torch_name(path) for path, p in model.namedparams()}
            self.reset()

        def reset(self):
            self.tick, self.last = 0, {}

        def backward_postprocess(self, function, in_data, out_grad):
            self.tick += 1
            for node in getattr(function, "inputs", ()):
                v = node.get_variable_or_none()
                if v is not None and id(v) in self.ids:
                    self.last[self.ids[id(v)]] = self.tick

        def order(self) -> list:
            return sorted(self.last, key=self.last.get)

    return ForwardRecorder(), GradOrder()


def _lockstep_step(wl, model, optimizer, batch, feed, lr, recorders=None) -> dict:
    """One training step; returns ``{kind: {name: host array}}``."""
    import contextlib

    import chainer

    from devicediff.frameworks.chainer.common import torch_name

    if lr is not None:
        optimizer.alpha = lr
    model.cleargrads()
    with contextlib.ExitStack() as stack:
        if recorders is not None:
            for r in recorders:
                r.reset()
                stack.enter_context(r)
        loss = wl.loss(model, batch, feed)
        loss.backward()
    loss.unchain_backward()
    params = {torch_name(path): p for path, p in model.namedparams()}
    order = recorders[1].order() if recorders is not None else []
    order += [n for n in params if n not in order]
    to_cpu = chainer.backends.cuda.to_cpu
    grads = {n: to_cpu(params[n].grad).copy() for n in order if params[n].grad is not None}
    optimizer.update()
    return {
        "fwd": recorders[0].outputs() if recorders is not None else {},
        "loss": {"loss": to_cpu(loss.array).copy()},
        "grad": grads,
        "weight": {n: to_cpu(p.array).copy() for n, p in params.items()},
        "optim": _adam_state(params),
    }


#: Chainer's Adam state under PyTorch's names (``torch.optim.Adam``: step, exp_avg, exp_avg_sq)
ADAM_NAMES = {"m": "exp_avg", "v": "exp_avg_sq", "vhat": "max_exp_avg_sq"}


def _adam_state(params: dict) -> dict:
    """``{"PARAM.KEY": host array}`` of each parameter's update rule, named as PyTorch's Adam
    names its state (the step count as a float32 scalar, as PyTorch keeps it), so a Chainer side
    and a PyTorch side compare optimizer state key for key."""
    out = {}
    for n, p in params.items():
        rule = p.update_rule
        if rule is None or rule.state is None:
            continue
        out[f"{n}.step"] = np.float32(rule.t)
        for k, v in rule.state.items():
            out[f"{n}.{ADAM_NAMES.get(k, k)}"] = chainer_to_cpu(v).copy()
    return out


def _copy_state(src_model, src_opt, dst_model, dst_opt) -> None:
    """dst := src, parameters and Adam state, cast to dst's dtype (round to nearest) and device."""
    dst = dict(dst_model.namedparams())
    xp = dst_model.xp
    for path, p in src_model.namedparams():
        q = dst[path]
        host = chainer_to_cpu(p.array)
        q.array[...] = xp.asarray(host.astype(q.array.dtype))
        rs, rd = p.update_rule, q.update_rule
        rd.t = rs.t
        if rs.state is None:
            rd._state = None
        else:
            rd._state = {k: xp.asarray(chainer_to_cpu(v).astype(q.array.dtype)) for k, v in rs.state.items()}
    dst_opt.t, dst_opt.epoch = src_opt.t, src_opt.epoch


def chainer_to_cpu(a):
    import chainer

    return chainer.backends.cuda.to_cpu(a)


def _flatten(result: dict, prefix: str | None) -> dict:
    from devicediff.stepfiles import KINDS, key

    return {key(kind, name, prefix): np.asarray(a) for kind in KINDS for name, a in result.get(kind, {}).items()}


class ChainerLockstep(_driver.LockstepSide):
    def __init__(self, backend: ChainerBackend):
        import chainer

        from devicediff.frameworks.chainer.common import FrameFeeder, make_adam

        self.backend = b = backend
        wl, model, opt = b.workload, b.model, b.optimizer
        mode = b.feed.mode
        self.on_gpu = b.xp is not np

        def new_opt(m):
            o = make_adam(b.adam, wl.lr)
            o.setup(m)
            return o

        with chainer.using_config("dtype", np.float64):
            self.model64 = wl.build_model()  # on the CPU, float64 parameters
        self.opt64 = new_opt(self.model64)
        _copy_state(model, opt, self.model64, self.opt64)  # exact: float32 -> float64
        self.wl64, self.feed64 = copy.copy(wl), FrameFeeder(mode, np, np.float64)
        if b.job.lockstep.free:
            self.model_free = copy.deepcopy(model)
            self.opt_free = new_opt(self.model_free)
            _copy_state(model, opt, self.model_free, self.opt_free)
            self.wl_free, self.feed_free = copy.copy(wl), FrameFeeder(mode, b.xp)
        self.rec, self.rec64 = _make_recorders(model), _make_recorders(self.model64)

    def teacher_sync(self) -> None:
        b = self.backend
        _copy_state(self.model64, self.opt64, b.model, b.optimizer)  # teacher state, rounded to float32
        _copy_state(b.model, b.optimizer, self.model64, self.opt64)  # and back, exactly

    def step(self, step: int, batch, lr):
        b = self.backend
        return _flatten(_lockstep_step(b.workload, b.model, b.optimizer, batch, b.feed, lr, self.rec), None)

    def reference_step(self, step: int, batch, lr):
        return _flatten(_lockstep_step(self.wl64, self.model64, self.opt64, batch, self.feed64, lr, self.rec64), "ref64")

    def free_step(self, step: int, batch, lr):
        from devicediff.stepfiles import LOSS_NAME

        res = _lockstep_step(self.wl_free, self.model_free, self.opt_free, batch, self.feed_free, lr)
        return res["loss"][LOSS_NAME], {f"{kind}/{n}": a for kind in ("weight", "optim") for n, a in res[kind].items()}

    def record_ops(self, step: int, batch, lr, out_dir) -> dict:
        """Per-function record of this step (``frameworks.chainer.ops``): ``ops.json`` and
        ``ops.npz`` in ``out_dir``; returns the summary (first node whose saved inputs changed,
        first suspect, the step's loss).

        Runs the step's forward and backward once more on the working model, with the working
        loop's arithmetic (its frame-buffer mode, a feeder of its own). Call it where the side
        is at the step's start, as for a repeat: before ``step``, or after ``teacher_sync()``
        and ``restore_carried(carried)``; it refuses a model that is not at the teacher-forced
        state. Everything it touches is put back: the workload's carried state, the gradients;
        no optimizer update, the backend's feeder and the step files are not touched."""
        from devicediff.frameworks.chainer import ops
        from devicediff.frameworks.chainer.common import FrameFeeder

        b = self.backend
        model, wl = b.model, b.workload
        ref = dict(self.model64.namedparams())
        for path, p in model.namedparams():
            if not np.array_equal(chainer_to_cpu(p.array), ref[path].array.astype(p.array.dtype)):
                raise RuntimeError(f"record_ops at step {step}: {path} is not at the teacher-forced state; call it "
                                   "before the step's run or after teacher_sync() and restore_carried()")
        carried, grads = self.carried_state(), {path: p.grad for path, p in model.namedparams()}
        feed = FrameFeeder(b.feed.mode, b.feed.xp, b.feed.dtype)

        def run():
            model.cleargrads()
            loss = wl.loss(model, batch, feed)
            loss.backward()
            loss.unchain_backward()
            return loss

        try:
            summary = ops.record(run, model, out_dir, step)
        finally:
            self.restore_carried(carried)
            for path, p in model.namedparams():
                p.grad = grads[path]
        summary["lr"] = lr
        (Path(out_dir) / OPS_SUMMARY).write_text(json.dumps(summary))
        return summary
