"""The PyTorch side of ``devicediff diverge``: one config stepped in lockstep.

The worker builds this side over a ``TorchBackend`` when the job carries a ``Lockstep``;
the config's settings (threads, device, cuDNN, TF32) were applied by the backend exactly
as in a normal run; this module only changes what is done with the model.
``frameworks._driver.lockstep`` runs the steps and writes the step files.

Each step ``s = 1..N`` from one batch (the same batches a normal run sees):

1. **Teacher forcing.** The working model (the config's dtype and device) and
   its optimizer take the *teacher state*: the float64 reference state of the
   previous step, rounded to float32 (round to nearest, IEEE 754). The float64
   reference then takes the working copy's values back, which is exact
   (every float32 is a float64). So the config's step and the reference step
   start from the same numbers, and both sides of a diverge start every step
   from the same state as long as their float64 references agree; at step 1
   that state is the initial weights, bit for bit.
2. **The config's step**, with forward hooks on the modules and
   post-accumulate-grad hooks on the parameters: per module outputs, loss,
   gradients (in the order backward produced them), weights after the step.
3. **Repeat** (``repeat="auto"``: at step 1 always, later only on a GPU or if
   step 1 showed run-to-run variation): the same step again from the same
   state; tensors whose bits differ are written as ``rep/...``, so run-to-run
   variation is measured, not blamed on the config.
4. **The float64 reference**: a copy of the model in float64 on the CPU, with a
   float64 copy of the optimizer state, the same batch cast to float64, under
   ``torch.set_default_dtype(torch.float64)`` so tensors the workload creates
   are float64 too. Its result is the next step's teacher state.
5. **Free running** (``free=True``): a third copy, trained normally on the
   config and never re-synchronised; its loss and weights show how the two
   sides drift apart over steps.

The step file is written with :func:`devicediff.stepfiles.write_step`
and announced with a ``lockstep`` record.

Workloads that carry state between batches (PredNet's truncated BPTT) are
shallow-copied (``copy.copy``) for the reference and the free-running copy,
so each keeps its own carried state; such a workload must *reassign* its
state attributes (``self.state = ...``), not mutate them in place. The carried
state itself is not teacher-forced.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from devicediff.stepfiles import KINDS, LOSS_NAME, MODEL_NAME, key
from devicediff.frameworks import _driver
from devicediff.frameworks.torch.backend import TorchBackend
from devicediff.spec import Batch, Workload, move_to

# -- capture --------------------------------------------------------------------------------


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Tensors in a module output, depth first (tuples, lists, dicts, NamedTuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensor_leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensor_leaves(v)]
    return []


class Recorder:
    """Forward hooks on every leaf module (and the model itself) and
    post-accumulate-grad hooks on every parameter, active only between
    :meth:`start` and :meth:`stop`.

    Outputs are cloned on the device when produced (a later in-place op, e.g.
    ``ReLU(inplace=True)``, must not change what we saw) and copied to the CPU
    once, after the step.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.active = False
        self.grad_order: list[str] = []
        self.calls: dict[str, int] = {}
        self.first: dict[str, list[torch.Tensor]] = {}
        self.last: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        for name, m in model.named_modules():
            is_root = name == ""
            if is_root or next(m.children(), None) is None:
                self._handles.append(m.register_forward_hook(self._fwd_hook(MODEL_NAME if is_root else name, is_root)))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _fwd_hook(self, name: str, is_root: bool):
        def hook(_mod, _inp, out):
            if not self.active:
                return
            if is_root and not isinstance(out, torch.Tensor):
                return  # a structured model output (PredNet's) is seen through its leaves
            leaves = _tensor_leaves(out)
            if not leaves:
                return
            snap = [t.detach().clone() for t in leaves]
            k = self.calls.get(name, 0) + 1
            self.calls[name] = k
            if k == 1:
                self.first[name] = snap
            else:
                self.last[name] = snap

        return hook

    def _grad_hook(self, name: str):
        def hook(_p):
            if self.active and name not in self.grad_order:
                self.grad_order.append(name)

        return hook

    def start(self) -> None:
        self.calls, self.first, self.last, self.grad_order = {}, {}, {}, []
        self.active = True

    def stop(self) -> None:
        self.active = False

    def forward_outputs(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in first-call order with the ``@K`` / ``:I`` suffixes."""
        from devicediff.stepfiles import name_outputs

        return name_outputs(self.first, self.last, self.calls)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# -- one step -----------------------------------------------------------------------------


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor of a nested batch to ``dtype`` (others untouched)."""
    if isinstance(data, torch.Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, dict):
        return {k: cast_floats(v, dtype) for k, v in data.items()}
    if isinstance(data, (list, tuple)) and not hasattr(data, "_fields"):
        return type(data)(cast_floats(v, dtype) for v in data)
    if isinstance(data, tuple):  # NamedTuple
        return type(data)(*(cast_floats(v, dtype) for v in data))
    return data


def clone_state(obj: Any) -> Any:
    """Deep copy of an optimizer state dict whose tensors are cloned.

    ``Optimizer.load_state_dict`` keeps ``state["step"]`` tensors as given
    (torch/optim/optimizer.py, ``_process_value_according_to_param_policy``), so
    without a clone two optimizers would share and both increment one counter.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def _set_lr(opt: torch.optim.Optimizer, lr: float | None) -> None:
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr


def run_step(
    *,
    workload: Workload,
    forward_model: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
    seed: int,
    lr: float | None,
    recorder: Recorder | None,
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """One training step; returns ``{kind: {name: tensor}}`` (tensors on ``device``)."""
    _set_lr(optimizer, lr)
    if not isinstance(batch, Batch):  # a workload may yield plain tensors
        batch = Batch(batch)
    torch.manual_seed(seed)  # any in-step randomness draws the same numbers in every run of the step
    data = move_to(batch.data, device)
    if dtype is not None:
        data = cast_floats(data, dtype)
    b = Batch(data, batch.new_sequence)
    optimizer.zero_grad(set_to_none=True)
    if recorder is not None:
        recorder.start()
    try:
        loss = workload.loss(forward_model, b)
        loss.backward()
    finally:
        if recorder is not None:
            recorder.stop()
    params = dict(model.named_parameters())
    order = list(recorder.grad_order) if recorder is not None else []
    order += [n for n in params if n not in order]  # params without hooks fire (none, or unused)
    grads = {n: params[n].grad.detach().clone() for n in order if params[n].grad is not None}
    optimizer.step()
    weights = {n: p.detach().clone() for n, p in params.items()}
    return {
        "fwd": recorder.forward_outputs() if recorder is not None else {},
        "loss": {LOSS_NAME: loss.detach().clone()},
        "grad": grads,
        "weight": weights,
    }


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # numpy has no bfloat16; float32 holds both exactly
    return t.to("cpu").numpy()


def _flatten(result: dict[str, dict[str, torch.Tensor]], prefix: str | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for kind in KINDS:
        for name, t in result.get(kind, {}).items():
            out[key(kind, name, prefix)] = to_numpy(t)
    return out


def _round_into(work: torch.Tensor, ref: torch.Tensor) -> None:
    """``ref`` := ``ref`` rounded to ``work``'s dtype (in place, on the CPU, exact in float64);
    ``work`` := the same values (one copy to its device). Non-float tensors are copied as they are."""
    if ref.is_floating_point() and work.is_floating_point():
        rounded = ref.to(work.dtype)
        ref.copy_(rounded)
        work.copy_(rounded)
    else:
        work.copy_(ref)


def _paired_state(optimizer, optimizer64) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The two optimizers' state tensors side by side, or None where their states do not
    pair up one to one (no state yet, other keys, a value that is not a tensor)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    params64 = [p for g in optimizer64.param_groups for p in g["params"]]
    if len(params) != len(params64):
        return None
    pairs = []
    for p, q in zip(params, params64):
        st, st64 = optimizer.state.get(p, {}), optimizer64.state.get(q, {})
        if st.keys() != st64.keys():
            return None
        for k, v in st.items():
            v64 = st64[k]
            if not (isinstance(v, torch.Tensor) and isinstance(v64, torch.Tensor)) or v.shape != v64.shape:
                return None
            pairs.append((v, v64))
    return pairs if pairs else None


@torch.no_grad()
def teacher_sync(model, optimizer, model64, optimizer64) -> None:
    """Working copy := float64 teacher state rounded to its dtype; reference := working copy (exact).

    The rounding is done once on the CPU and each tensor copied once to the working
    copy's device (no round trip from a GPU). Optimizer states that do not pair up
    tensor for tensor (before the first step, say) go through ``load_state_dict``.
    """
    sd, sd64 = model.state_dict(keep_vars=True), model64.state_dict(keep_vars=True)
    for k, t in sd.items():
        _round_into(t.detach(), sd64[k].detach())
    pairs = _paired_state(optimizer, optimizer64)
    if pairs is None:
        optimizer.load_state_dict(clone_state(optimizer64.state_dict()))  # copies with dtype/device cast
        optimizer64.load_state_dict(clone_state(optimizer.state_dict()))
    else:
        for v, v64 in pairs:
            _round_into(v, v64)


# -- the side ------------------------------------------------------------------------------------


class TorchLockstep(_driver.LockstepSide):
    """The working model (the config's dtype and device), its float64 reference on the CPU,
    and a free-running copy, each with its own optimizer and its own copy of the workload's
    carried state (``copy.copy``: a workload must *reassign* carried state, not mutate it)."""

    def __init__(self, backend: TorchBackend):
        self.backend = b = backend
        wl, model, opt = b.workload, b.model, b.optimizer
        self.on_gpu = b.device.type == "cuda"
        self.use_lr = type(wl).learning_rate is not Workload.learning_rate
        self.base_seed = int(b.job.init_seed) * 1_000_003
        # Copies first, hooks after: a deep copy would carry the hooks along.
        self.model64 = copy.deepcopy(model).to("cpu", torch.float64)
        self.opt64 = wl.make_optimizer(self.model64)
        self.wl64 = copy.copy(wl)
        if b.job.lockstep.free:
            self.model_free = copy.deepcopy(model)
            self.opt_free = wl.make_optimizer(self.model_free)
            self.opt_free.load_state_dict(clone_state(opt.state_dict()))
            self.fwd_free = torch.compile(self.model_free) if b.job.config.get("compile") else self.model_free
            self.wl_free = copy.copy(wl)
        self.rec = Recorder(model)
        self.rec64 = Recorder(self.model64)
        self.opt64.load_state_dict(clone_state(opt.state_dict()))

    def learning_rate(self, step: int) -> float | None:
        return super().learning_rate(step) if self.use_lr else None

    def teacher_sync(self) -> None:
        teacher_sync(self.backend.model, self.backend.optimizer, self.model64, self.opt64)

    def carried_state(self) -> dict:
        return dict(vars(self.backend.workload))

    def restore_carried(self, state: dict) -> None:
        vars(self.backend.workload).clear()
        vars(self.backend.workload).update(state)

    def step(self, step: int, batch, lr):
        b = self.backend
        res = run_step(workload=b.workload, forward_model=b.forward_model, model=b.model, optimizer=b.optimizer,
                       batch=batch, device=b.device, seed=self.base_seed + step, lr=lr, recorder=self.rec)
        return _flatten(res, None)

    def reference_step(self, step: int, batch, lr):
        with default_dtype(torch.float64):
            ref = run_step(workload=self.wl64, forward_model=self.model64, model=self.model64, optimizer=self.opt64,
                           batch=batch, device=torch.device("cpu"), seed=self.base_seed + step, lr=lr,
                           recorder=self.rec64, dtype=torch.float64)
        return _flatten(ref, "ref64")

    def free_step(self, step: int, batch, lr):
        res = run_step(workload=self.wl_free, forward_model=self.fwd_free, model=self.model_free,
                       optimizer=self.opt_free, batch=batch, device=self.backend.device, seed=self.base_seed + step,
                       lr=lr, recorder=None)
        return to_numpy(res["loss"][LOSS_NAME]), {n: to_numpy(t) for n, t in res["weight"].items()}

    def close(self) -> None:
        self.rec.remove()
        self.rec64.remove()
