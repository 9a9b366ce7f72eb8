"""Worker side of ``devicediff diverge``: step one config in lockstep (PyTorch).

``torch_loop.run`` calls :func:`run_lockstep` when the job carries
``job["lockstep"] = {"steps": N, "dir": DIR, "repeat": "auto", "free": True}``.
The config's settings (threads, device, cuDNN, TF32) were applied by
``torch_loop.prepare`` exactly as in a normal run; this module only changes
what is done with the model.

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

The step file is written with :func:`devicediff.diverge.format.write_step`
and announced with a ``lockstep`` record.

Workloads that carry state between batches (PredNet's truncated BPTT) are
shallow-copied (``copy.copy``) for the reference and the free-running copy,
so each keeps its own carried state; such a workload must *reassign* its
state attributes (``self.state = ...``), not mutate them in place. The carried
state itself is not teacher-forced.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from devicediff.diverge.format import KINDS, LOSS_NAME, MODEL_NAME, assemble_step, key, write_step
from devicediff.frameworks.torch_loop import Ctx, state_sha256, sync
from devicediff.protocol import FINISHED
from devicediff.spec import Batch, Workload, iter_batches, move_to

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
        from devicediff.diverge.format import name_outputs

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


def _batches(ctx: Ctx):
    """The run's batches in order (the same ones a normal run sees), across epochs, endless."""
    epoch = 0
    while True:
        n = 0
        for b in iter_batches(ctx.workload.train_batches(int(ctx.job["data_seed"]), epoch)):
            n += 1
            yield b
        if n == 0:
            raise RuntimeError("the workload yielded no batches")
        epoch += 1


# -- the lockstep loop ------------------------------------------------------------------------


def _timed_write(outdir, step: int, arrays: dict) -> tuple[Any, float]:
    t = time.perf_counter()
    path = write_step(outdir, step, arrays)
    return path, time.perf_counter() - t


def run_lockstep(ctx: Ctx) -> None:
    ls = ctx.job["lockstep"]
    n_steps = int(ls["steps"])
    outdir = ls["dir"]
    repeat = str(ls.get("repeat", "auto"))
    free = bool(ls.get("free", True))
    if repeat not in ("auto", "always", "never"):
        raise ValueError(f"lockstep.repeat {repeat!r}: use auto, always or never")
    t_start = time.perf_counter()
    wl, model, opt, dev = ctx.workload, ctx.model, ctx.optimizer, ctx.device
    use_lr = type(wl).learning_rate is not Workload.learning_rate
    base_seed = int(ctx.job["init_seed"]) * 1_000_003

    # Copies first, hooks after: a deep copy would carry the hooks along.
    model64 = copy.deepcopy(model).to("cpu", torch.float64)
    opt64 = wl.make_optimizer(model64)
    wl64 = copy.copy(wl)
    if free:
        model_free = copy.deepcopy(model)
        opt_free = wl.make_optimizer(model_free)
        opt_free.load_state_dict(clone_state(opt.state_dict()))
        fwd_free = torch.compile(model_free) if ctx.job["config"].get("compile") else model_free
        wl_free = copy.copy(wl)
    rec = Recorder(model)
    rec64 = Recorder(model64)
    opt64.load_state_dict(clone_state(opt.state_dict()))
    cpu = torch.device("cpu")
    varied = False  # has any repeat come out with other bits?

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lockstep-write")
    pending = None

    def announce(p) -> None:
        fut, s, tm = p
        path, dt = fut.result()
        tm["write"] = dt
        ctx.writer.emit("lockstep", step=s, path=str(path), total=n_steps, timing={k: round(v, 6) for k, v in tm.items()})

    batches = _batches(ctx)
    for step in range(1, n_steps + 1):
        batch = next(batches)
        lr = wl.learning_rate(step - 1, ctx.total_steps) if use_lr else None
        seed = base_seed + step
        timing: dict[str, float] = {}

        sync(dev)
        t0 = time.perf_counter()
        teacher_sync(model, opt, model64, opt64)
        sync(dev)
        timing["sync"] = time.perf_counter() - t0
        wl_state = dict(vars(wl))  # carried state before the step (for the repeat)
        res = run_step(workload=wl, forward_model=ctx.forward_model, model=model, optimizer=opt, batch=batch,
                       device=dev, seed=seed, lr=lr, recorder=rec)
        sync(dev)
        t1 = time.perf_counter()
        timing["config"] = t1 - t0 - timing["sync"]

        do_repeat = repeat == "always" or (repeat == "auto" and (step == 1 or varied or dev.type == "cuda"))
        res2 = None
        if do_repeat:
            # model64/opt64 still hold the exact pre-step state: reload it and run the step again.
            teacher_sync(model, opt, model64, opt64)
            vars(wl).clear()
            vars(wl).update(wl_state)
            res2 = run_step(workload=wl, forward_model=ctx.forward_model, model=model, optimizer=opt, batch=batch,
                            device=dev, seed=seed, lr=lr, recorder=rec)
            sync(dev)
        t2 = time.perf_counter()
        timing["repeat"] = t2 - t1

        with default_dtype(torch.float64):
            ref = run_step(workload=wl64, forward_model=model64, model=model64, optimizer=opt64, batch=batch,
                           device=cpu, seed=seed, lr=lr, recorder=rec64, dtype=torch.float64)
        t3 = time.perf_counter()
        timing["ref64"] = t3 - t2

        free_res = None
        if free:
            free_res = run_step(workload=wl_free, forward_model=fwd_free, model=model_free, optimizer=opt_free,
                                batch=batch, device=dev, seed=seed, lr=lr, recorder=None)
            sync(dev)
        t4 = time.perf_counter()
        timing["free"] = t4 - t3

        arrays, step_varied = assemble_step(
            step, _flatten(res, None), _flatten(ref, "ref64"), _flatten(res2, None) if res2 is not None else None,
            free_loss=to_numpy(free_res["loss"][LOSS_NAME]) if free_res is not None else None,
            free_weights={n: to_numpy(t) for n, t in free_res["weight"].items()} if free_res is not None else None)
        varied = varied or step_varied
        t5 = time.perf_counter()
        timing["gather"] = t5 - t4
        # The file is written by a helper thread while the next step computes (numpy releases
        # the GIL while writing); the record goes out once the file is complete.
        if pending is not None:
            announce(pending)
        timing["wait"] = time.perf_counter() - t5
        timing["total"] = time.perf_counter() - t0
        pending = (pool.submit(_timed_write, outdir, step, arrays), step, timing)
    if pending is not None:
        announce(pending)
    pool.shutdown()
    rec.remove()
    rec64.remove()
    ctx.writer.emit("done", state=FINISHED, final_sha256=state_sha256(model),
                    wall_time=time.perf_counter() - t_start, steps_run=n_steps)
