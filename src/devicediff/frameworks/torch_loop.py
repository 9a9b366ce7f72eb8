"""The one PyTorch training loop, shared by every workload (runs in the worker).

Order matters: the parent already set OMP/MKL thread counts and
``CUBLAS_WORKSPACE_CONFIG`` in the environment before this process started;
here we apply the config's framework flags, verify what took effect, build the
model on CPU from the init seed, hash it, move it to the device, and train on
batches drawn on CPU from the data seed. Clocks are read after device
synchronisation.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devicediff.fingerprint import blas_facts, fingerprint
from devicediff.frameworks import schedule
from devicediff.frameworks.threads import ThreadSampler
from devicediff.protocol import RecordWriter, Skip
from devicediff.spec import Batch, Workload, move_to


def apply_settings(cfg: dict) -> dict:
    """Apply a config's arithmetic settings to torch; return what took effect."""
    device = cfg.get("device", "cpu")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Skip(f"config asks for {device} but torch {torch.__version__} sees no CUDA GPU here")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise Skip(f"config asks for {device} but only {torch.cuda.device_count()} GPU(s) are visible")
    torch.backends.cudnn.enabled = bool(cfg.get("cudnn", True))
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", False))
    if cfg.get("tf32") is not None:
        torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg["matmul_precision"])
    if cfg.get("deterministic"):
        try:
            torch.use_deterministic_algorithms(True)
        except Exception as e:  # pragma: no cover - depends on the build
            raise Skip(f"deterministic mode refused: {e}") from None
    on_gpu = device.startswith("cuda")
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas_pools": blas_facts(),
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # What convolutions and matmuls really used; PyTorch's own default is TF32 on for cuDNN conv.
        "tf32_conv": bool(torch.backends.cudnn.allow_tf32) if on_gpu else False,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if on_gpu else False,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "compile": bool(cfg.get("compile")),
        "channels_last": bool(cfg.get("channels_last")),
    }


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), on CPU."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def flat_weights(model: torch.nn.Module) -> np.ndarray:
    """All parameters, sorted by name, flattened; float32 weights stay float32 (exact)."""
    return torch.cat([p.detach().reshape(-1).to("cpu") for _, p in sorted(model.named_parameters())]).numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Ctx:
    """Everything a loop (training or lockstep) needs, prepared once."""

    job: dict
    writer: RecordWriter
    workload: Workload
    model: torch.nn.Module  # the module whose state is hashed (not a compiled wrapper)
    forward_model: Any  # what loss() is called with (compiled or not)
    optimizer: torch.optim.Optimizer
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    outdir: Path
    extra: dict = field(default_factory=dict)


def load_workload(job: dict) -> Workload:
    from devicediff.workloads import make_workload

    params = {**job.get("workload_params", {}), **job["config"].get("params", {})}
    return make_workload(job["workload"], params)


def prepare(job: dict, writer: RecordWriter) -> Ctx:
    cfg = job["config"]
    settings = apply_settings(cfg)
    writer.emit("env", fingerprint=fingerprint())
    workload = load_workload(job)
    settings["workload"] = dict(workload.describe())  # resolved parameters, stored with the run
    writer.emit("effective", settings=settings)
    device = torch.device(cfg.get("device", "cpu"))

    # Initial weights: built on CPU from the init seed alone, hashed, then moved.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(job["init_seed"]))
        model = workload.build_model(int(job["init_seed"]))
    writer.emit("init", sha256=state_sha256(model), n_params=sum(p.numel() for p in model.parameters()))
    model = model.to(device)
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(int(job["init_seed"]))  # any in-training randomness: seeded, recorded in describe()
    optimizer = workload.make_optimizer(model)
    forward_model = torch.compile(model) if cfg.get("compile") else model

    spe = workload.steps_per_epoch()
    budget = job["budget"]
    total = schedule.total_steps(budget, spe)
    outdir = Path(job.get("artifact_dir") or ".")
    outdir.mkdir(parents=True, exist_ok=True)
    return Ctx(job, writer, workload, model, forward_model, optimizer, device, total, spe, outdir)




def train_step(ctx: Ctx, batch: Batch, step: int, use_lr: bool) -> torch.Tensor:
    if use_lr:
        lr = ctx.workload.learning_rate(step, ctx.total_steps)
        if lr is not None:
            for g in ctx.optimizer.param_groups:
                g["lr"] = lr
    if not isinstance(batch, Batch):  # a workload may yield plain tensors
        batch = Batch(batch)
    batch = Batch(move_to(batch.data, ctx.device), batch.new_sequence)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = ctx.workload.loss(ctx.forward_model, batch)
    loss.backward()
    ctx.optimizer.step()
    return loss


# -- checkpoints ---------------------------------------------------------------------------




def save_checkpoint(ctx: Ctx, step: int) -> None:
    """Model, optimizer and RNG states after ``step`` steps, written atomically.

    Only tensors and plain containers, so ``load_checkpoint`` can read it with
    ``weights_only=True``. The temporary file is private to this process, so
    two writers can never interleave; a kill leaves the old checkpoint or the
    new one, never half of one.
    """
    path = ctx.job.get("checkpoint_path")
    if not path:
        return
    if schedule.orphaned():
        raise SystemExit("devicediff worker: the runner is gone; exiting without writing a checkpoint")
    state = {
        "step": int(step),
        "total_steps": int(ctx.total_steps),
        "model": ctx.model.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if ctx.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(ctx.device)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(ctx: Ctx) -> int:
    """Restore the last checkpoint of this run, if any; return the step to go on from.

    A checkpoint that cannot be read (e.g. written by another torch) is set
    aside and the run starts from step 0, from the same initial weights.
    """
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
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = int(state["step"])
        if not 0 < step < ctx.total_steps or {"model", "optimizer"} - set(state):
            raise ValueError(f"step {step} of {ctx.total_steps}")
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start over
        os.replace(path, path + ".unreadable")
        print(f"devicediff: checkpoint {path} unreadable ({type(e).__name__}: {e}); starting from step 0",
              file=sys.stderr, flush=True)
        return 0
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], ctx.device)
    ctx.workload.reset_state()
    return step




# -- evaluation ----------------------------------------------------------------------------


def evaluate(ctx: Ctx, step: int) -> None:
    ctx.model.eval()
    with torch.no_grad():
        metrics = ctx.workload.evaluate(ctx.model, ctx.device)
    ctx.model.train()
    for name, value in metrics.items():
        ctx.writer.metric(step, name, float(value))
    snap = None
    if ctx.job.get("snapshots", True) and sum(p.numel() for p in ctx.model.parameters()) <= 5_000_000:
        snap = ctx.outdir / f"weights_step{step:07d}.npy"
        np.save(snap, flat_weights(ctx.model))
    ctx.writer.emit("weights", step=step, sha256=state_sha256(ctx.model), path=str(snap) if snap else None)




# -- the loop --------------------------------------------------------------------------------


def run(job: dict, writer: RecordWriter) -> None:
    t_start = time.perf_counter()
    ctx = prepare(job, writer)
    if job.get("lockstep"):
        from devicediff.diverge.probe import run_lockstep

        run_lockstep(ctx)
        return

    every = max(1, int(job["budget"].get("metric_every", 10)))
    use_lr = type(ctx.workload).learning_rate is not Workload.learning_rate
    start = load_checkpoint(ctx)
    if start == 0:
        evaluate(ctx, 0)
    writer.emit("progress", step=start, total=ctx.total_steps)

    sampler = ThreadSampler()
    sync(ctx.device)
    t_train = time.perf_counter()
    side = 0.0  # seconds spent in evaluation and checkpoints, not training steps
    for step, batch in schedule.batches_from(ctx, start):
        loss = train_step(ctx, batch, step, use_lr)
        done = step + 1
        if done % every == 0 or done == ctx.total_steps:
            value = loss.item()  # synchronises, only at the metric cadence
            writer.metric(done, "train_loss", value)
            writer.emit("progress", step=done, total=ctx.total_steps)
            if not math.isfinite(value):
                raise FloatingPointError(f"diverged: train_loss is {value} at step {done}")
        if schedule.eval_due(ctx, done) or schedule.checkpoint_due(ctx, done):
            sync(ctx.device)
            t_side = time.perf_counter()
            if schedule.eval_due(ctx, done):
                evaluate(ctx, done)
            if schedule.checkpoint_due(ctx, done):
                save_checkpoint(ctx, done)
            sync(ctx.device)
            side += time.perf_counter() - t_side
    sync(ctx.device)
    train_time = time.perf_counter() - t_train - side

    arts = ctx.workload.artifacts(ctx.model, ctx.device, ctx.outdir)
    schedule.finish(ctx, writer, arts, final_sha256=state_sha256(ctx.model), t_start=t_start, train_time=train_time,
                    start=start, threads_used=sampler.report())
