"""A PyTorch run, driven by ``frameworks._driver`` (runs in the worker).

Order matters: the parent already set OMP/MKL thread counts and ``CUBLAS_WORKSPACE_CONFIG``
in the environment before this process started; here we apply the config's framework
flags, verify what took effect, build the model on CPU from the init seed, hash it, move it
to the device, and train on batches drawn on CPU from the data seed.

The axes a config can turn (docs/axes.md), each recorded in the ``effective`` settings:

* ``precision``: autocast around the forward and the loss (bf16 or fp16); fp16 with a dynamic
  ``torch.amp.GradScaler`` (its state checkpointed, skipped steps as metrics). Evaluation stays fp32.
* ``compile``: ``torch.compile(model, mode=...)`` for the training forward (evaluation eager).
* ``cuda_graphs``: the whole step (forward, backward, gradient noise, optimizer step) captured in
  one CUDA graph after a few eager warm-up steps on a side stream, then replayed.
* ``grad_noise``: seeded Gaussian noise of a given relative size on every gradient element, drawn
  by the portable Philox generator (the same numbers on every device).
* ``portable_random`` (the study's): nn.Dropout swapped for devicediff.portable's.

Every process-global setting (TF32 flags, matmul precision, deterministic mode, compiled code,
RNG seeds) is set here per job, so a worker that runs several jobs one after another starts each
from the same state.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from devicediff.fingerprint import blas_facts, fingerprint
from devicediff.frameworks import _driver
from devicediff.job import Job
from devicediff.portable import philox
from devicediff.protocol import RecordWriter, Skip
from devicediff.spec import Batch, Workload, move_to

#: autocast dtype of each ``precision``
AMP_DTYPES = {"fp32": None, "bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}
#: eager steps run on a side stream before a CUDA graph is captured (PyTorch's CUDA graphs notes ask
#: for warm-up iterations on a side stream so that lazy state and library handles exist at capture)
GRAPH_WARMUP_STEPS = 3


def reset_process_state() -> None:
    """PyTorch's defaults for every global flag ``apply_settings`` sets only when a config asks,
    and no compiled code left from an earlier job of this process."""
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: TF32 on for cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if torch.are_deterministic_algorithms_enabled():  # the call imports torch._inductor (~9 s) even to turn it off
        torch.use_deterministic_algorithms(False)
    if "torch._dynamo" in sys.modules:  # only a process that compiled something has caches to drop
        torch._dynamo.reset()


def apply_settings(cfg: dict) -> dict:
    """Apply a config's arithmetic settings to torch; return what took effect."""
    reset_process_state()
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


def load_workload(job: Job) -> Workload:
    from devicediff.workloads import make_workload

    return make_workload(job.workload, job.params)


def build_initial_model(workload: Workload, init_seed: int) -> torch.nn.Module:
    """The model on CPU from the init seed alone, with torch's global generator left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        return workload.build_model(int(init_seed))


# -- precision ---------------------------------------------------------------------------------------


def check_precision(precision: str, device: torch.device) -> None:
    """Skip what this device cannot do (the study refuses fp16 on the CPU already)."""
    if precision not in AMP_DTYPES:
        raise Skip(f"precision {precision!r} unknown to this devicediff; use one of {list(AMP_DTYPES)}")
    if precision == "fp16-autocast" and device.type == "cpu":
        raise Skip("precision fp16-autocast needs a GPU (PyTorch's CPU autocast is bfloat16)")
    if precision == "bf16-autocast" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip(f"precision bf16-autocast: {torch.cuda.get_device_name(device)} has no bfloat16 support")


def autocast_for(precision: str, device: torch.device, *, cache_enabled: bool = True):
    """A fresh autocast context for ``precision``; a no-op for fp32. As in PyTorch's AMP docs
    (torch.amp, "Automatic Mixed Precision examples"), it wraps the forward pass and the loss
    only; backward runs outside it. Under CUDA graph capture the docs ask for
    ``cache_enabled=False`` (torch.cuda.graphs notes)."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def precision_settings(precision: str, scaler: "torch.amp.GradScaler | None") -> dict:
    """What the run records about its precision."""
    dtype = AMP_DTYPES[precision]
    out: dict[str, Any] = {
        "precision": precision,
        "autocast_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        # Evaluation runs in fp32 on the fp32 master weights: the eval metrics compare what each
        # config *learned*, not how it would round at inference (docs/axes.md).
        "eval_precision": "fp32",
    }
    if scaler is not None:
        out["grad_scaler"] = {"init_scale": scaler.get_scale(), "growth_factor": scaler.get_growth_factor(),
                              "backoff_factor": scaler.get_backoff_factor(),
                              "growth_interval": scaler.get_growth_interval(), "dynamic": True}
    return out


# -- compile -------------------------------------------------------------------------------------------


def compile_mode(cfg: dict) -> str | None:
    """None (eager) or the torch.compile mode (``compile = true`` is "default")."""
    c = cfg.get("compile", False)
    return "default" if c is True else (c or None)


def check_compile(mode: str, device: torch.device) -> None:
    """Skip, with the reason, where inductor cannot build code: it writes C++ on the CPU and
    Triton kernels on a GPU."""
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            raise Skip(f"compile = {mode!r} on the CPU needs a C++ compiler (torch inductor generates C++); "
                       f"none of {names} is on PATH")
    elif importlib.util.find_spec("triton") is None:
        raise Skip(f"compile = {mode!r} on a GPU needs Triton (torch inductor's GPU code generator); "
                   "it is not installed here")


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile(model)``; "default" is passed as no mode, exactly as ``compile = true`` was."""
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


def dynamo_counts() -> dict:
    """Dynamo's process-wide counters of what it compiled: code frames seen and compiled, graphs,
    graph breaks and the frames it gave up on (``torch._dynamo.utils.counters``), by reason."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "compiled": int(counters["frames"]["ok"]),
            "graphs": int(counters["stats"]["unique_graphs"]), "breaks": dict(counters["graph_break"]),
            "given_up": dict(counters["unimplemented"])}


def compile_report(before: dict, now: dict) -> tuple[dict, list[str]]:
    """What compiling did between two ``dynamo_counts``: the ``compile_detail`` record and warnings.
    A graph break splits the model into several graphs with Python between them; a frame Dynamo gave
    up on (e.g. its recompile limit hit) runs uncompiled, so the run is partly eager. Reasons are kept
    short: Dynamo's first line and its "Explanation:" line."""
    def short(reason: str) -> str:
        lines = [x.strip() for x in reason.strip().splitlines()]
        why = next((x.removeprefix("Explanation:").strip() for x in lines[1:] if x.startswith("Explanation:")), "")
        return f"{lines[0]}: {why}"[:240] if why else lines[0][:240]

    def delta(kind):
        out = {}
        for reason, n in now[kind].items():
            d = n - before[kind].get(reason, 0)
            if d > 0:
                out[short(reason)] = out.get(short(reason), 0) + d
        return out

    breaks, given_up = delta("breaks"), delta("given_up")
    uncompiled = (now["frames"] - before["frames"]) - (now["compiled"] - before["compiled"])
    detail = {"graphs": now["graphs"] - before["graphs"], "graph_breaks": sum(breaks.values()),
              "break_reasons": breaks, "frames_not_compiled": uncompiled, "not_compiled_reasons": given_up}
    warnings = []
    if given_up:
        warnings.append(f"compile: Dynamo gave up on {uncompiled} code frame(s) ({'; '.join(given_up)}): "
                        "part of the model ran uncompiled")
    if breaks:
        warnings.append(f"compile: {sum(breaks.values())} graph break(s) ({'; '.join(list(breaks)[:3])}): "
                        "the model was compiled in pieces, with uncompiled Python between them")
    return detail, warnings


# -- gradient noise ------------------------------------------------------------------------------------


class GradNoise:
    """Seeded relative Gaussian noise on every gradient element (``grad_noise = {relative = r}``)::

        g_i  <-  g_i + r * |g_i| * z_i,     z_i ~ N(0, 1)

    i.e. each element gets noise of standard deviation ``r * |g_i|``: the shape of rounding error
    (relative to the value, zero where the gradient is zero), at a size one can dial. ``z`` comes
    from :func:`devicediff.portable.philox.normal` with seed = the job's noise seed, stream =
    ``"grad_noise:<parameter name>"``, counter = the 0-based training step, drawn with numpy on the
    CPU and then moved: the same numbers on every device, thread count and framework, and a resumed
    run draws what an uninterrupted one would have. Applied after backward (after unscaling under
    fp16) and before the optimizer step."""

    def __init__(self, model: torch.nn.Module, relative: float, seed: int):
        self.relative, self.seed = float(relative), int(seed)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def draw(self, name: str, shape, step: int) -> torch.Tensor:
        return torch.from_numpy(philox.normal(tuple(shape), self.seed, f"grad_noise:{name}", int(step)))

    @torch.no_grad()
    def apply(self, step: int) -> None:
        for name, p in self.params:
            if p.grad is not None:
                z = self.draw(name, p.grad.shape, step).to(device=p.grad.device, dtype=p.grad.dtype)
                p.grad.addcmul_(p.grad.abs(), z, value=self.relative)

    # CUDA graphs: z lives in static buffers filled before each replay; the graph applies them.
    def buffers(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) for _, p in self.params]

    @torch.no_grad()
    def fill(self, buffers: list[torch.Tensor], step: int) -> None:
        for (name, p), buf in zip(self.params, buffers):
            buf.copy_(self.draw(name, p.shape, step))

    @torch.no_grad()
    def apply_buffers(self, buffers: list[torch.Tensor]) -> None:
        for (_, p), buf in zip(self.params, buffers):
            if p.grad is not None:
                p.grad.addcmul_(p.grad.abs(), buf, value=self.relative)

    def settings(self) -> dict:
        return {"relative": self.relative, "seed": self.seed, "per": "element",
                "definition": "g += relative * |g| * z, z = portable philox normal(noise seed, "
                              "'grad_noise:<param>', step), drawn on the CPU"}


# -- CUDA graphs ---------------------------------------------------------------------------------------


def _map_tensors(fn: Callable[[torch.Tensor], Any], data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: _map_tensors(fn, v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_map_tensors(fn, v) for v in data)
    return data


def _tensors(data: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(out.append, data)
    return out


def graph_obstacle(backend: "TorchBackend") -> str | None:
    """Why this run's training step cannot be captured in one CUDA graph, or None."""
    b, cfg = backend, backend.job.config
    if compile_mode(cfg):
        return "compile and cuda_graphs together are not supported; compile = \"reduce-overhead\" uses CUDA graphs"
    if b.scaler is not None:
        return "fp16-autocast's GradScaler reads the found-inf flag on the CPU at every step (a sync, not capturable)"
    if b.portable is not None:
        return "portable_random keys each step's dropout masks on the CPU; a captured graph would replay one mask"
    if b.use_lr:
        return f"the workload's learning-rate schedule ({type(b.workload).__name__}.learning_rate) changes lr on the CPU"
    if type(b.workload).reset_state is not Workload.reset_state:
        return f"{type(b.workload).__name__} carries state between batches (reset_state); a graph needs a stateless step"
    opt = b.optimizer
    if "capturable" not in opt.defaults and type(opt) is not torch.optim.SGD:
        return f"optimizer {type(opt).__name__} has no capturable option"
    return None


class GraphedStep:
    """The whole training step in one CUDA graph, as in PyTorch's CUDA graphs notes ("whole-network
    capture", torch.cuda.graphs): the first ``GRAPH_WARMUP_STEPS`` steps run eagerly on a side stream
    (real training steps, so the weights follow the same trajectory), then forward, loss, backward,
    gradient noise and ``optimizer.step()`` are captured with ``torch.cuda.graph`` on static input
    buffers and replayed for every later step; each batch is copied into the static buffers first.
    The optimizer runs with ``capturable=True`` from the first step (its step counter lives on the
    GPU), so warm-up and replays compute the same update."""

    def __init__(self, backend: "TorchBackend"):
        self.b = backend
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Any = None
        self.static_loss: torch.Tensor | None = None
        self.noise_buffers: list[torch.Tensor] = []
        self.warm = 0
        self.captured_at: int | None = None
        self.side = torch.cuda.Stream(backend.device)

    def step(self, step: int, batch: Batch) -> torch.Tensor:
        cur = torch.cuda.current_stream(self.b.device)
        if self.graph is None and self.warm < GRAPH_WARMUP_STEPS:
            self.side.wait_stream(cur)
            with torch.cuda.stream(self.side):
                loss = self.b.eager_step(step, batch)
            cur.wait_stream(self.side)
            self.warm += 1
            return loss
        if self.graph is None:
            self.capture(step, batch)
        self.load(step, batch)
        self.graph.replay()
        return self.static_loss

    def capture(self, step: int, batch: Batch) -> None:
        b = self.b
        self.static = _map_tensors(torch.clone, batch.data)
        if b.noise is not None:
            self.noise_buffers = b.noise.buffers()
        b.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with autocast_for(b.precision, b.device, cache_enabled=False):
                self.static_loss = b.workload.loss(b.forward_model, Batch(self.static, batch.new_sequence))
            self.static_loss.backward()
            if b.noise is not None:
                b.noise.apply_buffers(self.noise_buffers)
            b.optimizer.step()
        self.captured_at = step
        b.settings["cuda_graphs_detail"] = self.settings()
        b.emit_effective()

    def load(self, step: int, batch: Batch) -> None:
        new, old = _tensors(batch.data), _tensors(self.static)
        if [t.shape for t in new] != [t.shape for t in old] or [t.dtype for t in new] != [t.dtype for t in old]:
            raise RuntimeError(f"cuda_graphs: the batch of step {step} has shapes {[tuple(t.shape) for t in new]}, "
                               f"the captured step {[tuple(t.shape) for t in old]}; a CUDA graph replays fixed shapes")
        for dst, src in zip(old, new):
            dst.copy_(src)
        if b_noise := self.b.noise:
            b_noise.fill(self.noise_buffers, step)

    def settings(self) -> dict:
        return {"warmup_steps": GRAPH_WARMUP_STEPS, "captured_at_step": self.captured_at,
                "capturable_optimizer": bool(self.b.optimizer.defaults.get("capturable", False)),
                "scope": "forward, loss, backward, gradient noise, optimizer step"}


# -- random draws during training -------------------------------------------------------------------


def random_draw_notes(drew_on: list[str], modules: list[tuple[str, str]] | None, why_unnamed: str = "") -> tuple[dict, list[str]]:
    """The record of a first step that advanced torch's generators ``drew_on``: info for every
    generator, and a warning for each device (non-CPU) generator. The rule: torch's CPU generator
    is one Mersenne Twister stream, the same on every CPU config (any thread count), so draws on it
    keep CPU configs paired with each other; a CUDA generator is a different stream from the same
    seed, so a config drawing on it is paired with no config on another device."""
    if modules:
        who = ", ".join(f"module {name or '<root>'}: {typ}" for name, typ in modules)
    else:
        who = f"module not identified{': ' + why_unnamed if why_unnamed else ''}"
    info = {"generators": drew_on, "modules": [f"{n or '<root>'}: {t}" for n, t in (modules or [])]}
    warnings = []
    for gen in drew_on:
        if gen == "cpu":
            info["cpu"] = (f"cpu: draws on the CPU generator during training ({who}); the same stream on every "
                           "CPU config, not on a GPU's")
        else:
            warnings.append(f"{gen}: draws random numbers on the device during training ({who}); configs on "
                            "other devices are not paired")
    return info, warnings


def watch_random_modules(b: "TorchBackend", batch: Batch) -> tuple[list[tuple[str, str]], str]:
    """Which modules draw: one more forward and backward on a copy of the model under
    ``RandomOpWatch``, with torch's generators and the workload's carried state put back after, so
    the run itself is untouched. Returns (modules, why none were named)."""
    from devicediff.portable.detect import RandomOpWatch

    carried = dict(vars(b.workload))
    devices = [b.device] if b.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            twin = copy.deepcopy(b.model)
            with RandomOpWatch(twin) as watch:
                with autocast_for(b.precision, b.device):
                    loss = b.workload.loss(twin, batch)
                loss.backward()
        return watch.modules, ("" if watch.modules else "drawn outside any module")
    except Exception as e:  # noqa: BLE001 - detection must never fail the run
        return [], f"watch failed ({type(e).__name__}: {e})"
    finally:
        vars(b.workload).clear()
        vars(b.workload).update(carried)


class TorchBackend(_driver.Backend):
    """One PyTorch run. Attributes the lockstep side uses: ``model`` (the module whose state is
    hashed), ``forward_model`` (what ``loss()`` is called with: the compiled wrapper under
    ``compile``), ``optimizer``, ``workload``, ``device``, ``precision``, ``scaler``, ``noise``
    (a :class:`GradNoise` or None) and ``portable`` (the run's ``PortableRandom`` or None)."""

    def __init__(self, job: Job, writer: RecordWriter):
        self.job, self.writer = job, writer
        cfg = job.config
        self.settings = apply_settings(cfg)
        writer.emit("env", fingerprint=fingerprint())
        self.workload = load_workload(job)
        self.settings["workload"] = dict(self.workload.describe())  # resolved parameters, stored with the run
        self.device = torch.device(job.device)
        self.precision = cfg.get("precision", "fp32")
        check_precision(self.precision, self.device)
        mode = compile_mode(cfg)
        if mode:
            check_compile(mode, self.device)
            if job.portable_random:  # the keys are new Python ints every step: Dynamo keeps recompiling
                raise Skip("compile with portable_random is not supported yet: torch.compile does not get past the "
                           "portable dropout's per-step keys (12 steps of a tiny model did not finish in 8 minutes)")

        model = build_initial_model(self.workload, job.init_seed)
        writer.emit("init", sha256=state_sha256(model), n_params=sum(p.numel() for p in model.parameters()))
        self.portable = self._make_portable(model) if job.portable_random else None
        model = model.to(self.device)
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        torch.manual_seed(int(job.init_seed))  # any in-training randomness: seeded, recorded in describe()
        self.model = model  # the module whose state is hashed (not a compiled wrapper)
        self.optimizer = self.workload.make_optimizer(model)
        self.forward_model = compile_model(model, mode) if mode else model  # what loss() is called with
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16-autocast" else None
        relative = (cfg.get("grad_noise") or {}).get("relative")
        self.noise = GradNoise(model, relative, job.noise_seed) if relative else None
        self.use_lr = type(self.workload).learning_rate is not Workload.learning_rate
        self.steps_per_epoch = self.workload.steps_per_epoch()
        self.total_steps = _driver.total_steps(job.budget, self.steps_per_epoch)
        self.outdir = Path(job.artifact_dir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.graphed = self._make_graphed() if cfg.get("cuda_graphs") else None
        self.skipped_steps = 0  # fp16: optimizer steps GradScaler skipped (inf/NaN gradients)
        self._watched = False  # the first step of this process checks for random draws
        self._draw_warnings: list[str] = []
        self._compile_warnings: list[str] = []
        self._dynamo_before = self._dynamo_seen = dynamo_counts() if mode else None
        self._record_axes(mode)
        self.emit_effective()

    # -- setup ---------------------------------------------------------------------------------------
    def _make_portable(self, model: torch.nn.Module):
        """Swap the model's dropout for portable dropout keyed by the dropout seed (on CPU, before
        the move to the device; the swap adds no parameters, so the init hash is unchanged)."""
        from devicediff.portable.torch import PortableRandom, make_portable

        ctx = PortableRandom(self.job.dropout_seed)
        report = make_portable(model, ctx)
        self.settings["portable_random"] = True
        self.settings["portable_random_detail"] = {
            "seed": ctx.seed, "swapped": [f"{n}: {t}" for n, t in report.swapped],
            "attached": [f"{n}: {t}" for n, t in report.attached],
            "not_swapped": [f"{n}: {t} ({why})" for n, t, why in report.not_swapped]}
        return ctx

    def _make_graphed(self) -> GraphedStep:
        why = graph_obstacle(self)
        if why:
            raise Skip(f"cuda_graphs: {why}")
        if "capturable" in self.optimizer.defaults:
            self.optimizer.defaults["capturable"] = True
            for g in self.optimizer.param_groups:
                g["capturable"] = True
        return GraphedStep(self)

    def _record_axes(self, mode: str | None) -> None:
        self.settings.update(precision_settings(self.precision, self.scaler))
        self.settings["compile"] = mode or False
        self.settings["cuda_graphs"] = self.graphed is not None
        if self.graphed is not None:
            self.settings["cuda_graphs_detail"] = self.graphed.settings()
        self.settings["grad_noise"] = self.noise.relative if self.noise else False
        if self.noise:
            self.settings["grad_noise_detail"] = self.noise.settings()
        self.settings.setdefault("portable_random", False)

    def emit_effective(self) -> None:
        """The ``effective`` record, complete each time (a later one replaces the earlier)."""
        self.writer.emit("effective", settings=self.settings)

    # -- training ------------------------------------------------------------------------------------
    def train_step(self, step: int, batch) -> torch.Tensor:
        if self.use_lr:
            lr = self.workload.learning_rate(step, self.total_steps)
            if lr is not None:
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
        if not isinstance(batch, Batch):  # a workload may yield plain tensors
            batch = Batch(batch)
        batch = Batch(move_to(batch.data, self.device), batch.new_sequence)
        if not self._watched:
            self._watched = True
            loss = self._first_step(step, batch)
        else:
            loss = self.graphed.step(step, batch) if self.graphed else self.eager_step(step, batch)
        if self._dynamo_before is not None:
            self._note_compile()
        return loss

    def _note_compile(self) -> None:
        """Record, whenever Dynamo's counters move (the first steps, a recompile), how much of the model
        it compiled: a ``compile`` config whose model ran partly eager says so in its warnings."""
        now = dynamo_counts()
        if now == self._dynamo_seen:
            return
        self._dynamo_seen = now
        self.settings["compile_detail"], self._compile_warnings = compile_report(self._dynamo_before, now)
        self.settings["warnings"] = self._draw_warnings + self._compile_warnings
        self.emit_effective()

    def eager_step(self, step: int, batch: Batch) -> torch.Tensor:
        """One optimizer update: autocast around forward and loss, backward outside it, gradient
        noise on the (unscaled) gradients, then the optimizer (through GradScaler under fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.precision, self.device):
            loss = self.workload.loss(self.forward_model, batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # noise is relative to the true gradient
        else:
            loss.backward()
        if self.noise is not None:
            self.noise.apply(step)
        if self.scaler is not None:
            self._scaled_optimizer_step(step)
        else:
            self.optimizer.step()
        if self.portable is not None:
            self.portable.advance()
        return loss

    def _scaled_optimizer_step(self, step: int) -> None:
        """``scaler.step`` skips the update when the gradients hold inf/NaN, and ``update`` then
        multiplies the scale by the backoff factor (torch.amp.GradScaler docs): a lower scale after
        ``update`` means a skipped step. Both are recorded as metrics at the step."""
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        after = self.scaler.get_scale()
        if after < before:
            self.skipped_steps += 1
            self.writer.metric(step + 1, "amp_skipped_steps", self.skipped_steps)
        if after != before:
            self.writer.metric(step + 1, "amp_scale", after)

    def _first_step(self, step: int, batch: Batch) -> torch.Tensor:
        """The step, with torch's generator states compared before and after; if any advanced,
        name the modules that drew (one watched forward/backward on a copy) and record it."""
        from devicediff.portable.detect import drew, rng_snapshot

        before = rng_snapshot()
        loss = self.graphed.step(step, batch) if self.graphed else self.eager_step(step, batch)
        drew_on = drew(before, rng_snapshot())
        if drew_on:
            modules, why = watch_random_modules(self, batch)
            info, warnings = random_draw_notes(drew_on, modules, why)
            if self.settings.get("compile"):  # inductor makes its own masks (torch._inductor.config.fallback_random)
                warnings.append("compile: the compiled model draws its random numbers with inductor's own generator; "
                                "not paired with eager configs")
        else:
            info, warnings = {"generators": []}, []
        self.settings["random_draws"] = info
        self._draw_warnings = warnings
        self.settings["warnings"] = warnings + self._compile_warnings
        self.emit_effective()
        return loss

    def loss_value(self, loss: torch.Tensor) -> float:
        return loss.item()

    def sync(self) -> None:
        sync(self.device)

    def evaluate(self) -> dict:
        """fp32 and eager whatever the config's precision and compile mode (docs/axes.md)."""
        self.model.eval()
        with torch.no_grad():
            metrics = self.workload.evaluate(self.model, self.device)
        self.model.train()
        return metrics

    def artifacts(self) -> dict:
        return self.workload.artifacts(self.model, self.device, self.outdir)

    def state_sha256(self) -> str:
        return state_sha256(self.model)

    def flat_weights(self) -> np.ndarray:
        return flat_weights(self.model)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- checkpoints ---------------------------------------------------------------------------------
    def write_checkpoint(self, path: str, step: int) -> None:
        """Only tensors and plain containers, so it loads with ``weights_only=True``."""
        state = {
            "step": int(step),
            "total_steps": int(self.total_steps),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
            state["amp_skipped_steps"] = self.skipped_steps
        if self.portable is not None:
            state["portable_random"] = self.portable.state_dict()
        torch.save(state, path)

    def read_checkpoint(self, path: str):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if {"model", "optimizer"} - set(state):
            raise ValueError("not a devicediff PyTorch checkpoint")
        for key, here in (("grad_scaler", self.scaler), ("portable_random", self.portable)):
            if (key in state) != (here is not None):
                raise ValueError(f"checkpoint {'has' if key in state else 'lacks'} {key} state; this run "
                                 f"{'uses' if here is not None else 'does not use'} it")

        def restore() -> None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "rng_cpu" in state:
                torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            if self.scaler is not None:
                self.scaler.load_state_dict(state["grad_scaler"])
                self.skipped_steps = int(state.get("amp_skipped_steps", 0))
            if self.portable is not None:
                self.portable.load_state_dict(state["portable_random"])

        return int(state["step"]), restore
