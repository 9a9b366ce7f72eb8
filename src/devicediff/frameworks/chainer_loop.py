"""The Chainer 7.8 training loop (runs in the worker, inside the Chainer environment).

It mirrors ``torch_loop`` record for record (``env``, ``effective``, ``init``,
``metrics``, ``weights``, ``progress``, ``artifact``, ``done``), so the store,
the report and ``devicediff diverge`` treat a Chainer run like any other:

* initial weights: the Chainer environment has no torch, so the main
  environment's interpreter (``job["torch_python"]``) builds the PyTorch
  model from the init seed and exports its ``state_dict`` to
  ``init_weights.npz`` in the run's folder (``frameworks.init_export``); the
  Chainer model loads it by name, and the ``init`` hash is computed from the
  Chainer parameters exactly as ``torch_loop.state_sha256`` computes it (PyTorch
  names and dtype strings), so it equals the PyTorch run's hash for the seed;
* weight hashes and snapshots: the same functions, over the Chainer
  parameters under their PyTorch names;
* batches: the same arrays in the same order (``chainer_models``);
* one step = one optimizer update (PredNet: one truncated-BPTT window).

Two workload parameters only the Chainer loop reads (a config's ``params``
override them; the PyTorch workload never sees them):

* ``frame_buffers`` ("reused" | "fresh") chooses how frames are fed: see
  ``chainer_models.FrameFeeder`` and docs/chainer.md. Default "reused", the
  original loop's behaviour;
* ``adam`` ("chainer" | "pytorch"): Chainer's Adam update (default, as the
  original) or PyTorch's formula (``chainer_models.TorchFormulaAdamRule``).

Standard library and numpy at import time; chainer loads in ``run``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devicediff.fingerprint import blas_facts, fingerprint
from devicediff.frameworks import init_export, schedule
from devicediff.frameworks.threads import ThreadSampler
from devicediff.protocol import FINISHED, RecordWriter, Skip

DEFAULT_FRAME_BUFFERS = "reused"
DEFAULT_ADAM = "chainer"  # chainer.optimizers.Adam, as the original study; "pytorch": torch.optim.Adam's formula


def _device(cfg: dict):
    import chainer

    dev = cfg.get("device", "cpu")
    if dev == "cpu":
        return chainer.get_device("@numpy")
    from chainer.backends import cuda

    if not cuda.available:
        raise Skip(f"config asks for {dev} but Chainer {chainer.__version__} finds no usable CuPy/GPU "
                   "(Chainer 7.8 expects CuPy 7.x; see docs/chainer.md)")
    # The executor exposes the run's GPU as the only visible one when it assigns one.
    idx = int(dev.split(":")[1]) if ":" in dev and not os.environ.get("CUDA_VISIBLE_DEVICES") else 0
    return chainer.get_device(f"@cupy:{idx}")


def apply_settings(cfg: dict, frame_buffers: str) -> tuple[Any, dict]:
    """Apply a config's settings to Chainer; return (device, what took effect)."""
    import chainer

    for key, what in (("compile", "compile"), ("channels_last", "channels_last"), ("matmul_precision", "matmul_precision")):
        if cfg.get(key):
            raise Skip(f"the Chainer loop has no {what} option; remove it from this config")
    if cfg.get("tf32"):
        raise Skip("the Chainer loop has no TF32 switch; set tf32 = false (or leave it out) for Chainer configs")
    device = _device(cfg)
    on_gpu = device.xp is not np
    chainer.config.use_cudnn = "always" if cfg.get("cudnn", True) else "never"
    chainer.config.cudnn_deterministic = bool(cfg.get("deterministic", False))
    chainer.config.autotune = bool(cfg.get("cudnn_benchmark", False))
    from devicediff.frameworks.chainer_models import FrameFeeder

    feeder_probe = FrameFeeder(frame_buffers, device.xp)
    settings = {
        "framework": "chainer",
        "chainer": chainer.__version__,
        "device": cfg.get("device", "cpu"),
        "chainer_device": str(device),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas_pools": blas_facts(),
        "cudnn_enabled": bool(on_gpu and chainer.should_use_cudnn(">=auto")),
        "cudnn_benchmark": bool(chainer.config.autotune),
        "cudnn_deterministic": bool(chainer.config.cudnn_deterministic),
        "deterministic_algorithms": bool(cfg.get("deterministic", False)),
        "tf32_conv": False,
        "tf32_matmul": False,
        "use_ideep": chainer.config.use_ideep,
        "type_check": bool(chainer.config.type_check),
        "dtype": str(np.dtype(chainer.config.dtype)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "compile": False,
        "channels_last": False,
        # The fact behind the original study's CPU/GPU gap (docs/chainer.md):
        "frame_buffers": frame_buffers,
        "asarray_aliases_host_buffer": feeder_probe.aliases(),
    }
    return device, settings


def _fingerprint(device) -> dict:
    fp = fingerprint()
    if device.xp is not np:  # pragma: no cover - GPU Chainer is untested (docs/chainer.md)
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
            fp.update(gpus=[props["name"].decode()], cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                      cudnn=getattr(cupy.cuda, "cudnn", None) and cupy.cuda.cudnn.getVersion())
        except Exception as e:  # noqa: BLE001 - a fact we could not read is recorded as such
            fp["gpu_error"] = str(e)
    return fp


# -- weights -----------------------------------------------------------------------------------


def state_sha256(model) -> str:
    """``torch_loop.state_sha256`` of the Chainer model, under PyTorch names."""
    from devicediff.frameworks.chainer_models import named_arrays

    return init_export.state_sha256_arrays(named_arrays(model))


def flat_weights(model) -> np.ndarray:
    from devicediff.frameworks.chainer_models import named_arrays

    return init_export.flat_weights_arrays(named_arrays(model))


@dataclass
class Ctx:
    job: dict
    writer: RecordWriter
    workload: Any
    model: Any
    optimizer: Any
    device: Any
    feed: Any
    total_steps: int
    steps_per_epoch: int
    outdir: Path
    extra: dict = field(default_factory=dict)

    @property
    def xp(self):
        return self.device.xp


def job_params(job: dict) -> dict:
    return {**job.get("workload_params", {}), **job["config"].get("params", {})}


def prepare(job: dict, writer: RecordWriter) -> Ctx:
    import chainer

    from devicediff.frameworks.chainer_models import (
        ADAM_FORMULAS,
        ChainerWorkloadError,
        FrameFeeder,
        load_arrays,
        make_adam,
        make_chainer_workload,
    )

    cfg = job["config"]
    params = job_params(job)
    frame_buffers = str(params.get("frame_buffers", DEFAULT_FRAME_BUFFERS))
    adam = str(params.get("adam", DEFAULT_ADAM))
    if adam not in ADAM_FORMULAS:
        raise ChainerWorkloadError(f"adam {adam!r} unknown; use one of {list(ADAM_FORMULAS)}")
    device, settings = apply_settings(cfg, frame_buffers)
    settings["adam"] = adam
    writer.emit("env", fingerprint=_fingerprint(device))
    writer.emit("effective", settings=settings)
    outdir = Path(job.get("artifact_dir") or ".")
    outdir.mkdir(parents=True, exist_ok=True)

    # Initial weights: built by PyTorch on CPU from the init seed, loaded here by name.
    meta, arrays = init_export.request(job, outdir, params=params)
    workload = make_chainer_workload(job["workload"], params, meta)
    model = workload.build_model()
    load_arrays(model, arrays)
    sha = state_sha256(model)
    if sha != meta["sha256"]:
        raise RuntimeError(f"Chainer model hashes to {sha[:12]} after loading PyTorch's initial weights {meta['sha256'][:12]}")
    writer.emit("init", sha256=sha, n_params=int(sum(p.size for p in model.params())))
    model.to_device(device)
    device.use()
    optimizer = make_adam(adam, workload.lr)
    optimizer.setup(model)

    spe = workload.steps_per_epoch()
    budget = job["budget"]
    total = schedule.total_steps(budget, spe)
    return Ctx(job, writer, workload, model, optimizer, device, FrameFeeder(frame_buffers, device.xp), total, spe, outdir)




def train_step(ctx: Ctx, batch, step: int):
    """Forward the batch (PredNet: a whole window, losses summed), one backward, one update."""
    lr = ctx.workload.learning_rate(step, ctx.total_steps)
    if lr is not None:
        ctx.optimizer.alpha = lr
    loss = ctx.workload.loss(ctx.model, batch, ctx.feed)
    ctx.model.cleargrads()
    loss.backward()
    loss.unchain_backward()
    ctx.optimizer.update()
    return loss


# -- checkpoints ------------------------------------------------------------------------------------




def save_checkpoint(ctx: Ctx, step: int) -> None:
    """Model and Adam state after ``step`` steps (an npz under the job's checkpoint path),
    written atomically through a temporary file private to this process."""
    import chainer

    path = ctx.job.get("checkpoint_path")
    if not path:
        return
    if schedule.orphaned():
        raise SystemExit("devicediff worker: the runner is gone; exiting without writing a checkpoint")
    s = chainer.serializers.DictionarySerializer()
    s["model"].save(ctx.model)
    s["optimizer"].save(ctx.optimizer)
    s("step", np.asarray(step))
    s("total_steps", np.asarray(ctx.total_steps))
    s("framework", np.asarray("chainer"))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **s.target)
        os.replace(tmp, path)  # a kill leaves the old checkpoint or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(ctx: Ctx) -> int:
    """Restore this run's last checkpoint, if any; return the step to go on from. One that
    cannot be read (another framework's, a torn file) is set aside and the run starts over."""
    import chainer

    path = ctx.job.get("checkpoint_path")
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
        with np.load(path, allow_pickle=False) as z:
            if str(z["framework"]) != "chainer":
                raise ValueError("not a Chainer checkpoint")
            step = int(z["step"])
            if not 0 < step < ctx.total_steps:
                raise ValueError(f"step {step} of {ctx.total_steps}")
            # Into copies, so a file that fails half-way leaves the initial state untouched.
            model = copy.deepcopy(ctx.model)
            optimizer = copy.copy(ctx.optimizer).setup(model)  # same kind and hyper-parameters, fresh state
            d = chainer.serializers.NpzDeserializer(z)
            d["model"].load(model)
            d["optimizer"].load(optimizer)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start over
        os.replace(path, path + ".unreadable")
        print(f"devicediff: checkpoint {path} unreadable ({type(e).__name__}: {e}); starting from step 0",
              file=sys.stderr, flush=True)
        return 0
    ctx.model, ctx.optimizer = model, optimizer
    ctx.workload.reset_state()
    return step




# -- evaluation ---------------------------------------------------------------------------------------


def evaluate(ctx: Ctx, step: int) -> None:
    import chainer

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        metrics = ctx.workload.evaluate(ctx.model, ctx.xp)
    for name, value in metrics.items():
        ctx.writer.metric(step, name, float(value))
    snap = None
    n_params = sum(p.size for p in ctx.model.params())
    if ctx.job.get("snapshots", True) and n_params <= 5_000_000:
        snap = ctx.outdir / f"weights_step{step:07d}.npy"
        np.save(snap, flat_weights(ctx.model))
    ctx.writer.emit("weights", step=step, sha256=state_sha256(ctx.model), path=str(snap) if snap else None)




def _sync(ctx: Ctx) -> None:
    if ctx.xp is not np:  # pragma: no cover - GPU
        ctx.device.device.synchronize()


# -- the loop -------------------------------------------------------------------------------------------


def run(job: dict, writer: RecordWriter) -> None:
    t_start = time.perf_counter()
    ctx = prepare(job, writer)
    if job.get("lockstep"):
        run_lockstep(ctx)
        return

    every = max(1, int(job["budget"].get("metric_every", 10)))
    start = load_checkpoint(ctx)
    if start == 0:
        evaluate(ctx, 0)
    writer.emit("progress", step=start, total=ctx.total_steps)

    sampler = ThreadSampler()
    _sync(ctx)
    t_train = time.perf_counter()
    side = 0.0  # seconds spent in evaluation and checkpoints, not training steps
    for step, batch in schedule.batches_from(ctx, start):
        loss = train_step(ctx, batch, step)
        done = step + 1
        if done % every == 0 or done == ctx.total_steps:
            value = float(loss.array)
            writer.metric(done, "train_loss", value)
            writer.emit("progress", step=done, total=ctx.total_steps)
            if not math.isfinite(value):
                raise FloatingPointError(f"diverged: train_loss is {value} at step {done}")
        if schedule.eval_due(ctx, done) or schedule.checkpoint_due(ctx, done):
            _sync(ctx)
            t_side = time.perf_counter()
            if schedule.eval_due(ctx, done):
                evaluate(ctx, done)
            if schedule.checkpoint_due(ctx, done):
                save_checkpoint(ctx, done)
            _sync(ctx)
            side += time.perf_counter() - t_side
    _sync(ctx)
    train_time = time.perf_counter() - t_train - side

    import chainer

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        arts = ctx.workload.artifacts(ctx.model, ctx.xp, ctx.outdir)
    schedule.finish(ctx, writer, arts, final_sha256=state_sha256(ctx.model), t_start=t_start, train_time=train_time,
                    start=start, threads_used=sampler.report())


# -- lockstep (devicediff diverge) ----------------------------------------------------------------------
#
# The Chainer side of ``devicediff.diverge.probe``: the same protocol, steps and step-file keys
# (``devicediff.diverge.format``), so a Chainer config can be diverged against a PyTorch one.
# Each step s = 1..N: teacher-force the working model and Adam state to the float64 reference
# (rounded to float32), run the config's step with forward and gradient recorders, repeat it
# ("auto": at step 1, later on a GPU or once a repeat varied), run the float64 reference step on
# the CPU (Chainer in float64, the same frame-buffer mode), and a free-running copy. Keys use the
# PyTorch names: ``fwd/layers.0.lstm`` (leaf links; first call, and ``@K`` for the last of K
# calls; ``fwd/<model>`` when the model itself is called and returns one array), ``grad/NAME``
# in the order backward finished each parameter, ``weight/NAME``, ``loss/loss``.


def _link_name(path: str) -> str:
    return path.strip("/").replace("/", ".")


def _make_recorders(model):
    import chainer

    from devicediff.diverge.format import MODEL_NAME

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
            from devicediff.diverge.format import name_outputs

            return name_outputs(self.first, self.last, self.calls)

    class GradOrder(chainer.FunctionHook):
        """Order in which backward finished each parameter: the last backward step that
        fed it (PyTorch's post-accumulate-grad hook fires at that point)."""

        name = "devicediff_lockstep_grad_order"

        def __init__(self):
            from devicediff.frameworks.chainer_models import torch_name

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

    from devicediff.frameworks.chainer_models import torch_name

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
    }


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
    from devicediff.diverge.format import KINDS, key

    return {key(kind, name, prefix): np.asarray(a) for kind in KINDS for name, a in result.get(kind, {}).items()}


def run_lockstep(ctx: Ctx) -> None:
    import chainer

    from devicediff.diverge.format import LOSS_NAME, assemble_step, write_step
    from devicediff.frameworks.chainer_models import FrameFeeder, TorchFormulaAdam, make_adam

    ls = ctx.job["lockstep"]
    n_steps, outdir = int(ls["steps"]), ls["dir"]
    repeat, free = str(ls.get("repeat", "auto")), bool(ls.get("free", True))
    if repeat not in ("auto", "always", "never"):
        raise ValueError(f"lockstep.repeat {repeat!r}: use auto, always or never")
    t_start = time.perf_counter()
    wl, model, opt = ctx.workload, ctx.model, ctx.optimizer
    mode = ctx.feed.mode
    on_gpu = ctx.xp is not np

    adam = "pytorch" if isinstance(opt, TorchFormulaAdam) else "chainer"

    def new_opt(m):
        o = make_adam(adam, wl.lr)
        o.setup(m)
        return o

    with chainer.using_config("dtype", np.float64):
        model64 = wl.build_model()  # on the CPU, float64 parameters
    opt64 = new_opt(model64)
    _copy_state(model, opt, model64, opt64)  # exact: float32 -> float64
    wl64, feed64 = copy.copy(wl), FrameFeeder(mode, np, np.float64)
    if free:
        model_free = copy.deepcopy(model)
        opt_free = new_opt(model_free)
        _copy_state(model, opt, model_free, opt_free)
        wl_free, feed_free = copy.copy(wl), FrameFeeder(mode, ctx.xp)
    rec, rec64 = _make_recorders(model), _make_recorders(model64)
    varied = False

    def batches():
        epoch = 0
        while True:
            n = 0
            for b in wl.train_batches(int(ctx.job["data_seed"]), epoch):
                n += 1
                yield b
            if n == 0:
                raise RuntimeError("the workload yielded no batches")
            epoch += 1

    it = batches()
    for step in range(1, n_steps + 1):
        batch = next(it)
        lr = wl.learning_rate(step - 1, ctx.total_steps)
        timing: dict[str, float] = {}
        _sync(ctx)
        t0 = time.perf_counter()
        _copy_state(model64, opt64, model, opt)  # teacher state, rounded to float32
        _copy_state(model, opt, model64, opt64)  # and back, exactly
        wl_state = dict(vars(wl))
        res = _lockstep_step(wl, model, opt, batch, ctx.feed, lr, rec)
        _sync(ctx)
        t1 = time.perf_counter()
        timing["config"] = t1 - t0
        res2 = None
        if repeat == "always" or (repeat == "auto" and (step == 1 or varied or on_gpu)):
            _copy_state(model64, opt64, model, opt)  # model64 still holds the exact pre-step state
            vars(wl).clear()
            vars(wl).update(wl_state)
            res2 = _lockstep_step(wl, model, opt, batch, ctx.feed, lr, rec)
            _sync(ctx)
        t2 = time.perf_counter()
        timing["repeat"] = t2 - t1
        ref = _lockstep_step(wl64, model64, opt64, batch, feed64, lr, rec64)
        t3 = time.perf_counter()
        timing["ref64"] = t3 - t2
        free_res = _lockstep_step(wl_free, model_free, opt_free, batch, feed_free, lr) if free else None
        _sync(ctx)
        t4 = time.perf_counter()
        timing["free"] = t4 - t3

        arrays, step_varied = assemble_step(
            step, _flatten(res, None), _flatten(ref, "ref64"), _flatten(res2, None) if res2 is not None else None,
            free_loss=free_res["loss"][LOSS_NAME] if free_res is not None else None,
            free_weights=free_res["weight"] if free_res is not None else None)
        varied = varied or step_varied
        t5 = time.perf_counter()
        timing["gather"] = t5 - t4
        path = write_step(outdir, step, arrays)
        timing["write"] = time.perf_counter() - t5
        timing["total"] = time.perf_counter() - t0
        ctx.writer.emit("lockstep", step=step, path=str(path), total=n_steps,
                        timing={k: round(v, 6) for k, v in timing.items()})
    ctx.writer.emit("done", state=FINISHED, final_sha256=state_sha256(model),
                    wall_time=time.perf_counter() - t_start, steps_run=n_steps)


# -- measuring the frame-buffer effect ----------------------------------------------------------------


def frame_buffer_gradients(job: dict) -> dict:
    """The first training window of ``job`` (its init and data seeds), forward
    and backward once with ``fresh`` and once with ``reused`` frame buffers,
    from the same initial weights. Returns both losses and the relative L2
    error of the reused gradient, ||g_reused - g_fresh|| / ||g_fresh||, over all
    parameters and per parameter."""
    import tempfile

    import chainer

    from devicediff.frameworks.chainer_models import FrameFeeder, load_arrays, make_chainer_workload, torch_name

    params = job_params(job)
    device = _device(job["config"])
    out = Path(job.get("artifact_dir") or tempfile.mkdtemp(prefix="devicediff_gradients_"))
    meta, arrays = init_export.request(job, out, params=params)
    wl = make_chainer_workload(job["workload"], params, meta)
    batch = next(iter(wl.train_batches(int(job["data_seed"]), 0)))
    losses, grads = {}, {}
    for mode in ("fresh", "reused"):
        model = wl.build_model()
        load_arrays(model, arrays)
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
        "device": job["config"].get("device", "cpu"),
        "frames_in_window": int(batch.data.shape[1] - 1),
        "loss_fresh": losses["fresh"],
        "loss_reused": losses["reused"],
        "loss_identical": losses["fresh"] == losses["reused"],
        "grad_rel_l2": math.sqrt(num / den) if den else float("nan"),
        "grad_rel_l2_per_param": per,
        "init_sha256": meta["sha256"],
    }


def _study_job(study_spec: str, config: str | None, seed: int | None, overrides: dict) -> dict:
    """A job for one Chainer config of a study (first one unless named), without a store."""
    from devicediff.study import load_study
    from devicediff.workloads import resolve_workload_name

    study = load_study(study_spec, overrides=overrides or None)
    cfgs = [c for c in study.configs if c.framework == "chainer" and (config is None or c.name == config)]
    if not cfgs:
        raise SystemExit(f"study {study.name!r} has no Chainer config{' named ' + repr(config) if config else ''}")
    cell = next(c for c in study.cells() if c.config == cfgs[0] and (seed is None or c.seed == seed))
    return {
        "workload": resolve_workload_name(study.workload, study.directory),
        "workload_params": study.workload_params,
        "config": cell.config.to_dict(),
        "init_seed": cell.init_seed,
        "data_seed": cell.data_seed,
        "budget": {k: v for k, v in vars(study.budget).items()},
        "torch_python": sys.executable,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m devicediff.frameworks.chainer_loop gradients STUDY [--seed N]``:
    print ``frame_buffer_gradients`` for the study's first Chainer config as JSON.
    Run it with the main interpreter; it hands the work to the Chainer environment."""
    import argparse
    import json
    import subprocess

    ap = argparse.ArgumentParser(prog="python -m devicediff.frameworks.chainer_loop")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gradients", help="relative gradient error of reused vs fresh frame buffers, first window")
    g.add_argument("study", help="a .toml study file or a preset name with a Chainer config")
    g.add_argument("--config", default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])
    args = ap.parse_args(argv)
    from devicediff.study import parse_overrides

    job = _study_job(args.study, args.config, args.seed, parse_overrides(args.set))
    from devicediff.executors.base import SRC_DIR
    from devicediff.frameworks.chainer_env import chainer_python

    py = job["config"].get("python") or chainer_python()
    env = {**os.environ, "PYTHONPATH": SRC_DIR + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    if not str(job["config"].get("device", "cpu")).startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import sys, json; sys.path.pop(0); from devicediff.frameworks.chainer_loop import frame_buffer_gradients; "
            "print(json.dumps(frame_buffer_gradients(json.loads(sys.stdin.read())), indent=1))")
    return subprocess.run([py, "-c", code], input=json.dumps(job), text=True, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
