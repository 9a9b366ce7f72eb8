"""The PyTorch side of ``devicediff diverge``: one config stepped in lockstep.

The worker builds this side over a ``TorchBackend`` when the job carries a ``Lockstep``;
the config's settings (threads, device, cuDNN, TF32) were applied by the backend exactly
as in a normal run; this module only changes what is done with the model.
``frameworks._driver.lockstep`` runs the steps and writes the step files.

Each step ``s = 1..N`` from one batch (the same batches a normal run sees):

1. **Teacher forcing.** The working model (the config's dtype and device), its
   optimizer and the workload's carried state take the *teacher state*: the
   float64 reference state of the previous step, rounded to the working dtype
   (round to nearest, IEEE 754). The float64 reference then takes the working
   copy's values back, which is exact. At step 1 that state is the initial
   weights, bit for bit.
2. **The config's step** (with ``precision``: under ``torch.autocast``, fp16 with a
   ``GradScaler``), with forward hooks on the modules and post-accumulate-grad
   hooks on the parameters: per module outputs, loss, gradients (in the order
   backward produced them), then everything that carries over to the next step:
   weights, buffers, optimizer state, scaler state, the workload's carried state.
   Alongside, the **rounding model** (:class:`LocalModel`): every leaf module is
   replayed in float64 on the working step's own inputs (its output, its buffers,
   its parameters' gradients from the working step's output gradient) and the
   optimizer step in float64 on the working gradients; each replay gives the
   tensor's *own* error and the bound its precision explains (componentwise
   ``|A|·|B|`` × unit roundoff × reduction length; Higham, *Accuracy and Stability
   of Numerical Algorithms*, 2nd ed., ch. 3). A ``RandomOpWatch`` names modules
   that draw on torch's generators.
3. **Repeat** (driver's choice): the same step from the same state.
4. **The float64 reference**: a *faithful* float64 copy on the CPU, built the way
   the side was built (the workload's ``build_model``, then the state loaded, so
   hooks, module hooks and global flags are the same; never ``copy.deepcopy``,
   which drops tensor hooks), drawing on the side's own CPU generator state (or,
   with portable dropout, the same portable counters). Its result is the next
   step's teacher state.
5. **Free running** (``free=True``): a third faithful copy, trained normally on the
   config and never re-synchronised.

For ``devicediff diverge``'s operation pass, :meth:`TorchLockstep.record_ops` runs one step with
every aten operation recorded (``frameworks/torch/ops.py``).

Before step 1 a **parity check** runs the working model and a faithful copy of it
in the working dtype on the first batch: if they differ, the reference is not the
side's mathematics and the ``lockstep`` record says at which tensor.

Workloads that carry state between batches (PredNet's truncated BPTT) are
shallow-copied (``copy.copy``) for the reference and the free-running copy; such a
workload must *reassign* its state attributes (``self.state = ...``), not mutate them.
Attributes reassigned during a step are recorded (``carry/``) and teacher-forced.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from devicediff.stepfiles import KINDS, LOSS_NAME, MODEL_NAME, key
from devicediff.frameworks import _driver
from devicediff.frameworks.torch.backend import TorchBackend, build_initial_model
from devicediff.spec import Batch, Workload, move_to

U = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}
AUTOCAST = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}

# -- capture --------------------------------------------------------------------------------


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """Tensors in a module output, depth first (tuples, lists, dicts, NamedTuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensor_leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensor_leaves(v)]
    return []


def _map_tensors(fn, obj: Any) -> Any:
    """``obj`` with every tensor ``t`` replaced by ``fn(t)`` (tuples, lists, dicts, NamedTuples)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    return obj


class Recorder:
    """Forward hooks on every leaf module (and the model itself) and
    post-accumulate-grad hooks on every parameter, active only between
    :meth:`start` and :meth:`stop`.

    Outputs are cloned on the device when produced (a later in-place op, e.g.
    ``ReLU(inplace=True)``, must not change what we saw) and copied to the CPU
    once, after the step. With a ``local`` model (:class:`LocalModel`), each leaf
    module's inputs are captured by a pre-hook and handed to it with the output.
    """

    def __init__(self, model: torch.nn.Module, local: "LocalModel | None" = None):
        self.model = model
        self.local = local
        self.use_local = True
        self.active = False
        self.grad_order: list[str] = []
        self.calls: dict[str, int] = {}
        self.first: dict[str, list[torch.Tensor]] = {}
        self.last: dict[str, list[torch.Tensor]] = {}
        self._inputs: dict[str, list] = {}
        self._handles = []
        for name, m in model.named_modules():
            is_root = name == ""
            if is_root or next(m.children(), None) is None:
                label = MODEL_NAME if is_root else name
                if local is not None and not is_root:
                    self._handles.append(m.register_forward_pre_hook(self._pre_hook(label)))
                self._handles.append(m.register_forward_hook(self._fwd_hook(label, is_root)))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _pre_hook(self, name: str):
        def hook(_mod, inp):
            if self.active:
                self._inputs.setdefault(name, []).append(
                    _map_tensors(lambda t: t.detach().clone() if t.is_floating_point() else t, inp))

        return hook

    def _fwd_hook(self, name: str, is_root: bool):
        def hook(mod, _inp, out):
            if not self.active:
                return
            if is_root and not isinstance(out, torch.Tensor):
                return  # a structured model output (PredNet's) is seen through its leaves
            leaves = tensor_leaves(out)
            if not leaves:
                return
            snap = [t.detach().clone() for t in leaves]
            k = self.calls.get(name, 0) + 1
            self.calls[name] = k
            if k == 1:
                self.first[name] = snap
            else:
                self.last[name] = snap
            stack = self._inputs.get(name)
            if self.local is not None and self.use_local and stack:
                self.local.on_call(name, k, mod, stack.pop(), leaves, snap)

        return hook

    def _grad_hook(self, name: str):
        def hook(_p):
            if self.active and name not in self.grad_order:
                self.grad_order.append(name)

        return hook

    def start(self) -> None:
        self.calls, self.first, self.last, self.grad_order, self._inputs = {}, {}, {}, [], {}
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


# -- the rounding model -------------------------------------------------------------------------

#: elementary operations assumed per element where no reduction is involved (a module without
#: parameters: activations, pooling of a few elements; an optimizer update; a buffer update)
ELEMENTWISE_OPS = 8


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 where it is floating point, on its own device (a side's float64 reference
    lives on the side's device)."""
    return t.detach().to(torch.float64) if t.is_floating_point() else t.detach()


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``t`` in float64, as a tensor on ``t``'s device (no synchronisation)."""
    if not t.numel():
        return torch.zeros((), dtype=torch.float64, device=t.device)
    return torch.linalg.vector_norm(t.double().reshape(-1))


def _l2(t: torch.Tensor) -> float:
    return float(_norm(t))


def _local_entry(work: torch.Tensor, replay: torch.Tensor, magnitude: torch.Tensor, k: float, u: float) -> torch.Tensor:
    """``[‖work − replay‖, k·u·‖M‖ + u·‖replay‖, ‖M‖]`` in float64: the tensor's own error, the
    bound its arithmetic explains (first order, componentwise: |fl(x) − x| ≤ k·u·M, Higham ch. 3)
    and the scale of the operation. Left on the replay's device (``entries_to_host`` brings a
    step's entries over at once: one synchronisation, not three per tensor)."""
    w = _f64(work).to(replay.device)  # an optimizer's step counter lives on the CPU beside GPU weights
    if w.shape != replay.shape:
        return torch.full((3,), math.nan, dtype=torch.float64, device=replay.device)
    err, scale = _norm(w - replay), _norm(magnitude)
    return torch.stack([err, k * u * scale + u * _norm(replay), scale])


def entries_to_host(entries: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``_local_entry`` results as numpy arrays, in one copy to the host."""
    if not entries:
        return {}
    vals = list(entries.values())
    dev = next((v.device for v in vals if v.device.type != "cpu"), torch.device("cpu"))
    flat = torch.stack([v.to(dev) for v in vals]).cpu().numpy()
    return dict(zip(entries, flat))


def _device_of(m: torch.nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rng_states(dev: torch.device) -> list[torch.Tensor]:
    """The generator states a replay on ``dev`` could advance: the CPU's, and that GPU's."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])


@contextmanager
def _quiet_replay(m64: torch.nn.Module):
    """A float64 replay of ``m64`` that leaves no trace: its buffers (BatchNorm statistics) and
    torch's generators (the CPU's, and its GPU's when it lives on one) are restored afterwards,
    dispatch modes (a RandomOpWatch) and autocast are off while it runs."""
    from torch.utils._python_dispatch import _disable_current_modes

    saved = {n: b.detach().clone() for n, b in m64.named_buffers()}
    dev = _device_of(m64)
    gpus = [dev] if dev.type == "cuda" else []
    try:
        with _disable_current_modes(), torch.random.fork_rng(devices=gpus), torch.autocast("cpu", enabled=False), \
                (torch.autocast("cuda", enabled=False) if gpus else nullcontext()):
            yield
    finally:
        with torch.no_grad():
            for n, b in m64.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def _norm_parts(m: torch.nn.Module, x: torch.Tensor):
    """For BatchNorm (training mode) and LayerNorm: ``(x̂, reduce dims, n, σ)`` of input ``x``
    (float64), else None."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
        dims = tuple(d for d in range(x.dim()) if d != 1)
        shape = [1] * x.dim()
        shape[1] = -1
    elif isinstance(m, torch.nn.LayerNorm):
        nd = len(m.normalized_shape)
        dims = tuple(range(x.dim() - nd, x.dim()))
        shape = None
    else:
        return None
    mu = x.mean(dim=dims, keepdim=True)
    sigma = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + m.eps)
    n = int(np.prod([x.shape[d] for d in dims]))
    return (x - mu) / sigma, dims, n, sigma, shape


def _reduction_length(m: torch.nn.Module) -> int:
    """Products summed per output element by a module with weights: the largest over its
    weights of fan-in (``prod(shape[1:])``, Linear/Conv) or, for transposed layouts,
    ``shape[0]·prod(shape[2:])``; 1 for a module without a weight of two or more dimensions."""
    k = 1
    for p in m.parameters(recurse=False):
        if p.dim() >= 2:
            k = max(k, int(np.prod(p.shape[1:])), int(p.shape[0] * np.prod(p.shape[2:])))
    return k


class LocalModel:
    """Each side's own rounding model for one step (see the module docstring).

    For every call of a leaf module of the working model, its float64 twin in the faithful
    reference (``model64``, still at the step's starting state while the working step runs) is
    run on the call's own inputs: the difference is the module's own error, free of what it
    inherits; the bound is ``k·u·‖M‖`` with ``M`` the componentwise magnitude of the operation
    (the module replayed on absolute values of inputs and parameters: ``|W|·|x| + |b|`` for
    Linear/Conv, computed with ``F.linear``/``F.conv*`` themselves; for BatchNorm/LayerNorm
    ``(|x| + mean|x|)/σ·|γ| + |β|``), ``k`` the reduction length and ``u`` the unit roundoff
    in force (``u_of``). Gradients of a leaf module's parameters are replayed the same way from
    the working step's output gradient. Modules that drew random numbers, and portable layers,
    are left out (their draws are not replayable here); so are modules with several outputs
    (gradients only).
    """

    def __init__(self, model64: torch.nn.Module, u_of):
        self.mods64 = dict(model64.named_modules())
        self.device = _device_of(model64)
        self.u_of = u_of
        self.begin()

    def begin(self) -> None:
        self.entries: dict[str, np.ndarray] = {}  # "kind/name" -> [err, bound, scale]
        self.calls: dict[str, list] = {}  # module -> [(inputs64, {"g": grad of output}, u)]
        self.ncalls: dict[str, int] = {}
        self.random: set[str] = set()

    def on_call(self, name: str, k: int, mod, inputs, leaves: list, snap: list) -> None:
        m64 = self.mods64.get(name)
        self.ncalls[name] = k
        if m64 is None or type(mod).__module__.startswith("devicediff.portable") or name in self.random:
            return
        x64 = _map_tensors(_f64, inputs)
        u = self.u_of(mod)
        with _quiet_replay(m64), torch.no_grad():
            before = _rng_states(self.device)
            outs = tensor_leaves(m64(*x64))
            if not all(torch.equal(a, b) for a, b in zip(before, _rng_states(self.device))):
                self.random.add(name)
                return
            mags = self._magnitudes(m64, x64, outs)
            bufs = {n: b.detach().clone() for n, b in m64.named_buffers(recurse=False)}
        if len(outs) != len(snap):
            return
        kk = _reduction_length(m64)
        norm = _norm_parts(m64, x64[0]) if x64 and isinstance(x64[0], torch.Tensor) else None
        if norm is not None:
            kk = norm[2] + 4
        elif not any(True for _ in m64.parameters(recurse=False)):
            kk = ELEMENTWISE_OPS
        for i, (s, r, mag) in enumerate(zip(snap, outs, mags)):
            label = name if k == 1 else f"{name}@{k}"
            label = label if len(outs) == 1 else f"{label}:{i}"
            self.entries[f"fwd/{label}"] = _local_entry(s, r, mag, kk, u)
        if k == 1 and norm is not None:
            self._buffers(name, mod, bufs, x64[0], norm)
        if len(leaves) == 1 and leaves[0].requires_grad and any(p.requires_grad for p in m64.parameters(recurse=False)):
            holder: dict = {}
            leaves[0].register_hook(lambda g, h=holder: h.__setitem__("g", g.detach()))
            self.calls.setdefault(name, []).append((x64, holder, u))

    @staticmethod
    def _magnitudes(m64, x64, outs) -> list[torch.Tensor]:
        """Componentwise magnitude of each output: ``|out|`` plus the module on absolute values."""
        mags = [o.abs() for o in outs]
        norm = _norm_parts(m64, x64[0]) if x64 and isinstance(x64[0], torch.Tensor) else None
        params = dict(m64.named_parameters(recurse=False))
        if norm is not None and len(outs) == 1:
            xhat, dims, _, sigma, shape = norm
            x = x64[0]
            scale = (x.abs() + x.abs().mean(dim=dims, keepdim=True)) / sigma
            w, b = params.get("weight"), params.get("bias")
            if w is not None:
                scale = scale * (w.detach().abs().reshape(shape) if shape else w.detach().abs())
            if b is not None:
                scale = scale + (b.detach().abs().reshape(shape) if shape else b.detach().abs())
            return [mags[0] + scale]
        if params and norm is None:
            absp = {n: p.detach().abs() for n, p in params.items()}
            absx = _map_tensors(lambda t: t.abs() if t.is_floating_point() else t, x64)
            absouts = tensor_leaves(torch.func.functional_call(m64, absp, tuple(absx)))
            if len(absouts) == len(outs):
                mags = [m + a.abs() for m, a in zip(mags, absouts)]
        return mags

    def _buffers(self, name: str, mod, bufs64: dict, x: torch.Tensor, norm) -> None:
        """Running statistics after the module's (single) call: the replay's against the working
        module's, bound ``(n + 4)·u·(|old| + |new| + momentum·(mean|x| or mean x²))``."""
        _, dims, n, _, _ = norm
        work = dict(mod.named_buffers(recurse=False))
        old = {nm: b.detach() for nm, b in self.mods64[name].named_buffers(recurse=False)}
        mom = getattr(mod, "momentum", None) or 0.1
        stat = {"running_mean": x.abs().mean(dim=dims), "running_var": (x * x).mean(dim=dims) * n / max(n - 1, 1)}
        u = self.u_of(None)
        for bn, new64 in bufs64.items():
            w = work.get(bn)
            if w is None:
                continue
            mag = new64.abs() + old[bn].abs() if new64.is_floating_point() else new64.double().abs()
            if bn in stat:
                mag = mag + mom * stat[bn]
            full = f"{name}.{bn}" if name != MODEL_NAME else bn
            self.entries[f"buffer/{full}"] = _local_entry(w.detach().clone(), new64.double(), mag.double(), n + 4, u)

    def grads(self, work: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """After backward: replay each leaf module's parameter gradients from its calls. ``scale``:
        the loss scale the backward ran with (fp16's GradScaler; a power of two, so dividing the
        held output gradients by it is exact), since ``work`` holds the unscaled gradients."""
        for name, calls in self.calls.items():
            m64 = self.mods64[name]
            params = [(pn, p) for pn, p in m64.named_parameters(recurse=False) if p.requires_grad]
            if len(calls) != self.ncalls.get(name) or not params:
                continue  # a call we could not replay: its share of the gradient is unknown
            acc = [torch.zeros_like(p) for _, p in params]
            mag = [torch.zeros_like(p) for _, p in params]
            ks = [0] * len(params)
            for x64, holder, u in calls:
                g = holder.get("g")
                if g is None:
                    continue
                g64 = _f64(g) / scale
                with _quiet_replay(m64), torch.enable_grad():
                    # inputs that want a gradient, as in the step (a module's backward hooks see one)
                    xg = _map_tensors(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t, x64)
                    out = tensor_leaves(m64(*xg))[0]
                    got = torch.autograd.grad(out, [p for _, p in params], g64, allow_unused=True)
                    absp = {pn: p.detach().abs().requires_grad_() for pn, p in params}
                    absx = _map_tensors(lambda t: t.abs().requires_grad_() if t.is_floating_point() else t, x64)
                    aout = tensor_leaves(torch.func.functional_call(m64, absp, tuple(absx)))[0]
                    agot = torch.autograd.grad(aout, list(absp.values()), g64.abs(), allow_unused=True)
                norm = _norm_parts(m64, x64[0]) if isinstance(x64[0], torch.Tensor) else None
                for i, (pn, p) in enumerate(params):
                    if got[i] is not None:
                        acc[i] += got[i]
                    if norm is not None:  # dγ = Σ g·x̂, dβ = Σ g: magnitudes Σ|g||x̂|, Σ|g|
                        xhat, dims = norm[0], norm[1]
                        t = g64.abs() * (xhat.abs() if pn == "weight" else 1.0)
                        mag[i] += t.sum(dim=dims).reshape(p.shape)
                    elif agot[i] is not None:
                        mag[i] += agot[i].abs()
                    ks[i] += max(1, g.numel() // max(1, p.shape[0]))
            for i, (pn, p) in enumerate(params):
                full = f"{name}.{pn}"
                if full in work:
                    u = calls[0][2]
                    self.entries[f"grad/{full}"] = _local_entry(work[full], acc[i], mag[i], ks[i] + 1, u)

    def arrays(self) -> dict[str, np.ndarray]:
        return entries_to_host({f"local/{k}": v for k, v in self.entries.items()})


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
    return _map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, data)


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


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``{"PARAM.KEY": tensor}``: every optimizer state entry, named by its parameter."""
    out = {}
    for n, p in model.named_parameters():
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{n}.{k}"] = v.detach().clone()
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{n}.{k}"] = torch.tensor(float(v), dtype=torch.float64)
    return out


def carried_attrs(workload: Workload, before: dict) -> dict[str, Any]:
    """The workload's attributes reassigned during a step (``before``: ``vars`` at its start)
    that hold tensors: the recurrent state it carries to the next batch."""
    return {k: v for k, v in vars(workload).items() if v is not before.get(k) and tensor_leaves(v)}


def carry_tensors(attrs: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in attrs.items():
        leaves = tensor_leaves(v)
        for i, t in enumerate(leaves):
            out[k if len(leaves) == 1 else f"{k}.{i}"] = t.detach().clone()
    return out


def _scaler_state(scaler) -> dict[str, torch.Tensor]:
    if scaler is None or not scaler.is_enabled():
        return {}
    sd = scaler.state_dict()
    return {k: torch.tensor(float(sd[k]), dtype=torch.float64) for k in ("scale", "_growth_tracker") if k in sd}


def run_step(  # long: a keyword-only signature of ten names and the step's fixed order
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
    autocast: torch.dtype | None = None,
    scaler=None,
    local: LocalModel | None = None,
    watch=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """One training step; returns ``{kind: {name: tensor}}`` (tensors on ``device``).

    ``autocast``: run the forward under ``torch.autocast`` with this dtype; ``scaler``: a
    ``GradScaler`` (fp16): gradients are recorded unscaled. ``local``: the side's rounding
    model, fed during the step; ``watch``: a ``RandomOpWatch`` active over forward and backward.
    """
    _set_lr(optimizer, lr)
    if not isinstance(batch, Batch):  # a workload may yield plain tensors
        batch = Batch(batch)
    torch.manual_seed(seed)  # any in-step randomness draws the same numbers in every run of the step
    data = move_to(batch.data, device)
    if dtype is not None:
        data = cast_floats(data, dtype)
    b = Batch(data, batch.new_sequence)
    optimizer.zero_grad(set_to_none=True)
    before = dict(vars(workload))
    ac = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    if recorder is not None:
        recorder.start()
    try:
        with watch if watch is not None else nullcontext():
            with ac:
                loss = workload.loss(forward_model, b)
            (scaler.scale(loss) if scaler is not None else loss).backward()
    finally:
        if recorder is not None:
            recorder.stop()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = dict(model.named_parameters())
    order = list(recorder.grad_order) if recorder is not None else []
    order += [n for n in params if n not in order]  # params without hooks fire (none, or unused)
    grads = {n: params[n].grad.detach().clone() for n in order if params[n].grad is not None}
    if local is not None:  # the output gradients it holds carry the scaler's factor; the gradients do not
        local.grads(grads, scale=float(scaler.get_scale()) if scaler is not None else 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {
        "fwd": recorder.forward_outputs() if recorder is not None else {},
        "loss": {LOSS_NAME: loss.detach().clone()},
        "grad": grads,
        "weight": {n: p.detach().clone() for n, p in params.items()},
        "buffer": {n: t.detach().clone() for n, t in model.named_buffers()},
        "optim": optimizer_state(model, optimizer),
        "scaler": _scaler_state(scaler),
        "carry": carry_tensors(carried_attrs(workload, before)),
    }


#: the most bytes one flat copy from a device holds (several copies for more: bounded extra device memory)
FLAT_CHUNK_BYTES = 64 << 20


def flat_to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors of one device and dtype to the host in one copy (concatenated, then split into views)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).to("cpu").numpy()
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].reshape(tuple(t.shape)))
        at += t.numel()
    return out


def host_copies(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor as a host array (bf16/fp16 as float32), the values exactly. Tensors on a device
    go to the host as one flat buffer per dtype (``flat_to_host``, up to ``FLAT_CHUNK_BYTES`` a
    copy), not one copy each: a lockstep step records some 40 to hundreds of tensors, and each copy
    from a GPU is a synchronisation and a transfer's latency. CPU tensors are converted as they are."""
    out: list = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    prepared = []
    for i, t in enumerate(tensors):
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # numpy has no bfloat16; float32 holds both exactly
        prepared.append(t)
        if t.device.type == "cpu":
            out[i] = t.numpy()
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        chunk: list[int] = []
        size = 0
        for n, i in enumerate(idx):
            chunk.append(i)
            size += prepared[i].numel() * prepared[i].element_size()
            if size >= FLAT_CHUNK_BYTES or n == len(idx) - 1:
                for j, a in zip(chunk, flat_to_host([prepared[j] for j in chunk])):
                    out[j] = a
                chunk, size = [], 0
    return out


def _flatten(result: dict[str, dict[str, torch.Tensor]], prefix: str | None) -> dict[str, np.ndarray]:
    keys, tensors = [], []
    for kind in KINDS:
        for name, t in result.get(kind, {}).items():
            keys.append(key(kind, name, prefix))
            tensors.append(t)
    return dict(zip(keys, host_copies(tensors)))


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


def faithful_copy(backend: TorchBackend, dtype: torch.dtype | None, device: torch.device, portable=None) -> torch.nn.Module:
    """A copy of the side's model built the way the side was built: the workload's own
    ``build_model`` from the init seed (so its tensor hooks, module hooks and the flags it
    reads are there), portable dropout attached to ``portable`` when the job asks for it,
    then the working model's current state loaded and the copy moved to ``dtype``/``device``.
    ``copy.deepcopy`` would drop tensor hooks (issue 14)."""
    b = backend
    m = build_initial_model(b.workload, b.job.init_seed)
    if b.job.portable_random and portable is not None:
        from devicediff.portable.torch import make_portable

        make_portable(m, portable)
    m.load_state_dict({k: v.detach().to("cpu") for k, v in b.model.state_dict().items()})
    m = m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
    if b.job.config.get("channels_last") and dtype != torch.float64:
        m = m.to(memory_format=torch.channels_last)
    m.train(b.model.training)
    return m


# -- the side ------------------------------------------------------------------------------------


def unit_roundoff(backend: TorchBackend, precision: str):
    """``u_of(module)``: the unit roundoff of the arithmetic a module's output gets on this side:
    bf16/fp16 under autocast; TF32 (2^-11) for matmuls/convolutions on a GPU where the config's
    flags allow it; else the parameters' own dtype (float32: 2^-24). ``u_of(None)``: the
    optimizer's and the buffers' updates (float32)."""
    dev = backend.device

    def u_of(mod) -> float:
        if mod is None:  # optimizer and buffer updates: float32 master state, outside autocast
            return U["fp32"]
        if precision == "bf16-autocast":
            return U["bf16"]
        if precision == "fp16-autocast":
            return U["fp16"]
        p = next(mod.parameters(recurse=False), None) if mod is not None else None
        if p is not None and p.dtype in (torch.float16, torch.bfloat16):
            return U["fp16"] if p.dtype == torch.float16 else U["bf16"]
        if dev.type == "cuda" and p is not None and p.dim() >= 2:
            conv = p.dim() > 2
            tf32 = (torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.enabled) if conv else (
                torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest")
            if tf32:
                return U["tf32"]
        return U["fp32"]

    return u_of


def parity(work: dict, replay: dict, exact: bool) -> tuple[str, float] | None:
    """The first tensor (in computation order) where a working step and its faithful replay
    in the same dtype differ (``exact``: any bit; else relative L2 above 1e-4), or None."""
    for kind in KINDS:
        for name, t in work.get(kind, {}).items():
            r = replay.get(kind, {}).get(name)
            if r is None or r.shape != t.shape:
                return f"{kind}/{name}", math.inf
            if torch.equal(t, r):
                continue
            d = _l2(_f64(t) - _f64(r))
            rel = d / max(_l2(_f64(r)), 1e-300)
            if exact or rel > 1e-4:
                return f"{kind}/{name}", rel
    return None


class TorchLockstep(_driver.LockstepSide):
    """The working model (the config's dtype and device), its faithful float64 reference on the
    same device, a faithful float64 scratch copy for the optimizer's replay, and a free-running copy,
    each with its own optimizer and its own copy of the workload's carried state."""

    def __init__(self, backend: TorchBackend):
        self.backend = b = backend
        wl, model, opt = b.workload, b.model, b.optimizer
        cfg = b.job.config
        self.on_gpu = b.device.type == "cuda"
        self.use_lr = type(wl).learning_rate is not Workload.learning_rate
        self.base_seed = int(b.job.init_seed) * 1_000_003
        self.precision = cfg.get("precision") or "fp32"
        self.autocast = AUTOCAST.get(self.precision)
        self.scaler = getattr(b, "scaler", None) or self._new_scaler()  # the backend's, when it has one
        self.portable = getattr(b, "portable", None)  # the backend's PortableRandom (job.portable_random)
        self.ctx64 = self._new_ctx()
        # The float64 reference runs where the side runs: a GPU side's on its GPU (docs/diverge.md, "Cost").
        self.ref_device = b.device
        self.model64 = faithful_copy(b, torch.float64, self.ref_device, self.ctx64)
        self.opt64 = wl.make_optimizer(self.model64)
        self.opt64.load_state_dict(clone_state(opt.state_dict()))
        self.wl64 = copy.copy(wl)
        self.scratch64 = faithful_copy(b, torch.float64, self.ref_device, self._new_ctx())
        self.opt_s = wl.make_optimizer(self.scratch64)
        if b.job.lockstep.free:
            self.ctx_free = self._new_ctx()
            if self.ctx_free is not None:
                self.ctx_free.load_state_dict(self.portable.state_dict())
            self.model_free = faithful_copy(b, None, b.device, self.ctx_free)
            self.opt_free = wl.make_optimizer(self.model_free)
            self.opt_free.load_state_dict(clone_state(opt.state_dict()))
            self.fwd_free = torch.compile(self.model_free) if cfg.get("compile") else self.model_free
            self.wl_free = copy.copy(wl)
            self.scaler_free = self._new_scaler()
        self.u_of = unit_roundoff(b, self.precision)
        self.local = LocalModel(self.model64, self.u_of)
        self.rec = Recorder(model, self.local)
        self.rec64 = Recorder(self.model64)
        self.watching = True  # RandomOpWatch on the first step, and on every step once one drew
        self.info: dict = {}
        self._pre_ctx = None
        self._local_step = 0
        self._carry_names: set[str] = set()

    def _new_scaler(self):
        if self.precision != "fp16-autocast":
            return None
        return torch.amp.GradScaler(self.backend.device.type)

    def _new_ctx(self):
        if not self.backend.job.portable_random or self.portable is None:
            return None
        from devicediff.portable.torch import PortableRandom

        return PortableRandom(seed=int(self.backend.job.dropout_seed))

    def learning_rate(self, step: int) -> float | None:
        return super().learning_rate(step) if self.use_lr else None

    def teacher_sync(self) -> None:
        teacher_sync(self.backend.model, self.backend.optimizer, self.model64, self.opt64)
        self._sync_carry()

    def _sync_carry(self) -> None:
        """The workload's carried tensors too: working := reference rounded; reference := working."""
        wl, wl64 = vars(self.backend.workload), vars(self.wl64)
        for name in self._carry_names:
            w, r = wl.get(name), wl64.get(name)
            lw, lr = tensor_leaves(w), tensor_leaves(r)
            if not lw or len(lw) != len(lr) or any(x.shape != y.shape for x, y in zip(lw, lr)):
                continue
            it = iter(lr)
            wl[name] = _map_tensors(lambda t: next(it).to(t.dtype).to(t.device), w)
            it = iter(tensor_leaves(wl[name]))
            wl64[name] = _map_tensors(lambda t: next(it).to(self.ref_device, t.dtype), r)

    def restore_carried(self, state: dict) -> None:
        super().restore_carried(state)
        if self._pre_ctx is not None:
            self.portable.load_state_dict(self._pre_ctx)

    # -- the config's step -------------------------------------------------------------------
    def step(self, step: int, batch, lr):
        b = self.backend
        first = self._local_step != step  # the driver's repeat calls step() again for the same step
        if first:
            self.info = {}
            if step == 1:
                self._parity(batch, lr)
            self._pre_ctx = self.portable.state_dict() if self.portable is not None else None
            self.local.begin()
        elif self._pre_ctx is not None:
            self.portable.load_state_dict(self._pre_ctx)
        watch = None
        if first and self.watching:
            from devicediff.portable.detect import RandomOpWatch

            watch = RandomOpWatch(b.model)
        from devicediff.portable.detect import drew, rng_snapshot

        torch.manual_seed(self.base_seed + step)  # run_step seeds the same: the snapshot is the step's start
        before = rng_snapshot()
        self.rec.use_local = first
        res = run_step(workload=b.workload, forward_model=b.forward_model, model=b.model, optimizer=b.optimizer,
                       batch=batch, device=b.device, seed=self.base_seed + step, lr=lr, recorder=self.rec,
                       autocast=self.autocast, scaler=self.scaler, local=self.local if first else None, watch=watch)
        gens = drew(before, rng_snapshot())
        if self.portable is not None:
            self.portable.advance()
        out = _flatten(res, None)
        if first:
            self._local_step = step
            self._carry_names |= set(carried_attrs_names(res))
            self._note_random(step, watch, gens)
            out.update(self.local.arrays())
            out.update(self._optimizer_local(res, lr))
        return out

    def _note_random(self, step: int, watch, gens: list[str]) -> None:
        if watch is not None:
            if watch.any:
                self.info["random"] = [d.describe() for d in watch.draws]
                self.info["random_modules"] = [m for m, _ in watch.modules]
                self.info["random_devices"] = watch.devices
            elif step == 1:
                self.watching = False
        if gens:
            self.info["random_generators"] = gens
            self.info.setdefault("random", [f"{g}: a draw (modules named from the next step on)" for g in gens])
            self.info.setdefault("random_devices", gens)
            self.watching = True
        if self.local.random:
            self.info["random_modules"] = sorted(set(self.info.get("random_modules", [])) | self.local.random)

    @torch.no_grad()
    def _optimizer_local(self, res: dict, lr) -> dict[str, np.ndarray]:
        """The optimizer's step replayed in float64 on the working gradients, from the step's
        starting state (the reference still holds it): weights and optimizer state."""
        if self.scaler is not None and any(not torch.isfinite(g).all() for g in res["grad"].values()):
            return {}  # the scaler skips this step
        p64, ps = dict(self.model64.named_parameters()), dict(self.scratch64.named_parameters())
        for n, p in ps.items():
            p.copy_(p64[n])
            g = res["grad"].get(n)
            p.grad = _f64(g) if g is not None else None
        self.opt_s.load_state_dict(clone_state(self.opt64.state_dict()))
        _set_lr(self.opt_s, lr)
        with torch.enable_grad():
            self.opt_s.step()
        u = self.u_of(None)
        out = {}
        for n, p in ps.items():
            pre, new = p64[n].detach(), p.detach()
            out[f"local/weight/{n}"] = _local_entry(res["weight"][n], new, pre.abs() + (new - pre).abs(), ELEMENTWISE_OPS, u)
            p.grad = None
        old = optimizer_state(self.model64, self.opt64)
        for k, new in optimizer_state(self.scratch64, self.opt_s).items():
            w = res["optim"].get(k)
            if w is None or not new.is_floating_point():
                continue
            mag = new.double().abs()
            o = old.get(k)
            if o is not None and o.shape == new.shape:
                mag = mag + o.double().abs()
            g = res["grad"].get(k.rsplit(".", 1)[0])
            if g is not None and g.shape == new.shape:
                mag = mag + _f64(g).abs()
            out[f"local/optim/{k}"] = _local_entry(w, new.double(), mag, ELEMENTWISE_OPS, u)
        return entries_to_host(out)

    def _parity(self, batch, lr) -> None:
        """Step 0: the working model and a faithful copy in the working dtype take the first
        batch from the same state; any difference means the faithful copies (and so the float64
        reference) lack something the working model has. The working model is then put back."""
        b = self.backend
        cfg = b.job.config
        ctx = self._new_ctx()
        pre = self.portable.state_dict() if self.portable is not None else None
        if ctx is not None:
            ctx.load_state_dict(pre)
        ref = faithful_copy(b, None, b.device, ctx)
        opt = b.workload.make_optimizer(ref)
        opt.load_state_dict(clone_state(b.optimizer.state_dict()))
        rec = Recorder(ref)
        kw = dict(batch=batch, device=b.device, seed=self.base_seed, lr=lr, autocast=self.autocast)
        try:
            res_r = run_step(workload=copy.copy(b.workload), forward_model=torch.compile(ref) if cfg.get("compile") else ref,
                             model=ref, optimizer=opt, recorder=rec, scaler=self._new_scaler(), **kw)
            self.rec.use_local = False
            res_w = run_step(workload=copy.copy(b.workload), forward_model=b.forward_model, model=b.model,
                             optimizer=b.optimizer, recorder=self.rec, scaler=self._new_scaler(), **kw)
        finally:
            rec.remove()
            if pre is not None:
                self.portable.load_state_dict(pre)
            teacher_sync(b.model, b.optimizer, self.model64, self.opt64)  # back to the step's start
        hit = parity(res_w, res_r, exact=not self.on_gpu and not cfg.get("compile"))
        self.info["parity"] = None if hit is None else {"tensor": hit[0], "rel": hit[1]}

    def record_ops(self, step: int, batch, lr, out_dir: str) -> None:
        """The config's step from the teacher state with every aten operation recorded
        (``frameworks/torch/ops.py``), eagerly: a compiled or graph-captured forward is recorded as
        the eager model runs it."""
        from devicediff.frameworks.torch.ops import recording, write_record

        b = self.backend
        with recording(b.model, b.optimizer) as rec:
            run_step(workload=b.workload, forward_model=b.model, model=b.model, optimizer=b.optimizer, batch=batch,
                     device=b.device, seed=self.base_seed + step, lr=lr, recorder=None, autocast=self.autocast,
                     scaler=self.scaler)
        cuda = b.device.type == "cuda"
        write_record(out_dir, {"framework": "torch", "torch": torch.__version__, "step": step, "device": str(b.device),
                               "precision": self.precision,
                               "tf32_matmul": cuda and (torch.backends.cuda.matmul.allow_tf32
                                                        or torch.get_float32_matmul_precision() != "highest"),
                               "tf32_conv": cuda and torch.backends.cudnn.enabled and torch.backends.cudnn.allow_tf32},
                     rec)

    def reference_step(self, step: int, batch, lr):
        if self.ctx64 is not None and self._pre_ctx is not None:
            self.ctx64.load_state_dict(self._pre_ctx)  # portable draws: the same counters as the side
        with default_dtype(torch.float64):
            ref = run_step(workload=self.wl64, forward_model=self.model64, model=self.model64, optimizer=self.opt64,
                           batch=batch, device=self.ref_device, seed=self.base_seed + step, lr=lr,
                           recorder=self.rec64, dtype=torch.float64)
        return _flatten(ref, "ref64")

    def free_step(self, step: int, batch, lr):
        res = run_step(workload=self.wl_free, forward_model=self.fwd_free, model=self.model_free,
                       optimizer=self.opt_free, batch=batch, device=self.backend.device, seed=self.base_seed + step,
                       lr=lr, recorder=None, autocast=self.autocast, scaler=self.scaler_free)
        if self.ctx_free is not None:
            self.ctx_free.advance()
        named = [(f"{kind}/{n}", t) for kind in ("weight", "buffer", "optim", "carry") for n, t in res[kind].items()]
        arrays = host_copies([t for _, t in named] + [res["loss"][LOSS_NAME]])
        return arrays[-1], dict(zip((k for k, _ in named), arrays))

    def close(self) -> None:
        self.rec.remove()
        self.rec64.remove()


def carried_attrs_names(res: dict) -> list[str]:
    """Attribute names behind a step's ``carry`` tensors (``_state.3`` -> ``_state``)."""
    return sorted({n.split(".", 1)[0] if n.split(".", 1)[-1].isdigit() else n for n in res.get("carry", {})})
