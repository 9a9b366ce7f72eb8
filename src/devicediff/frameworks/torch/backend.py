"""A PyTorch run, driven by ``frameworks._driver`` (runs in the worker).

Order matters: the parent already set OMP/MKL thread counts and ``CUBLAS_WORKSPACE_CONFIG``
in the environment before this process started; here we apply the config's framework
flags, verify what took effect, build the model on CPU from the init seed, hash it, move it
to the device, and train on batches drawn on CPU from the data seed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from devicediff.fingerprint import blas_facts, fingerprint
from devicediff.frameworks import _driver
from devicediff.job import Job
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


def load_workload(job: Job) -> Workload:
    from devicediff.workloads import make_workload

    return make_workload(job.workload, job.params)


def build_initial_model(workload: Workload, init_seed: int) -> torch.nn.Module:
    """The model on CPU from the init seed alone, with torch's global generator left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        return workload.build_model(int(init_seed))


class TorchBackend(_driver.Backend):
    def __init__(self, job: Job, writer: RecordWriter):
        self.job, self.writer = job, writer
        cfg = job.config
        settings = apply_settings(cfg)
        writer.emit("env", fingerprint=fingerprint())
        self.workload = load_workload(job)
        settings["workload"] = dict(self.workload.describe())  # resolved parameters, stored with the run
        writer.emit("effective", settings=settings)
        self.device = torch.device(job.device)

        model = build_initial_model(self.workload, job.init_seed)
        writer.emit("init", sha256=state_sha256(model), n_params=sum(p.numel() for p in model.parameters()))
        model = model.to(self.device)
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        torch.manual_seed(int(job.init_seed))  # any in-training randomness: seeded, recorded in describe()
        self.model = model  # the module whose state is hashed (not a compiled wrapper)
        self.optimizer = self.workload.make_optimizer(model)
        self.forward_model = torch.compile(model) if cfg.get("compile") else model  # what loss() is called with
        self.use_lr = type(self.workload).learning_rate is not Workload.learning_rate
        self.steps_per_epoch = self.workload.steps_per_epoch()
        self.total_steps = _driver.total_steps(job.budget, self.steps_per_epoch)
        self.outdir = Path(job.artifact_dir)
        self.outdir.mkdir(parents=True, exist_ok=True)

    def train_step(self, step: int, batch) -> torch.Tensor:
        if self.use_lr:
            lr = self.workload.learning_rate(step, self.total_steps)
            if lr is not None:
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
        if not isinstance(batch, Batch):  # a workload may yield plain tensors
            batch = Batch(batch)
        batch = Batch(move_to(batch.data, self.device), batch.new_sequence)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.forward_model, batch)
        loss.backward()
        self.optimizer.step()
        return loss

    def loss_value(self, loss: torch.Tensor) -> float:
        return loss.item()

    def sync(self) -> None:
        sync(self.device)

    def evaluate(self) -> dict:
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
        torch.save(state, path)

    def read_checkpoint(self, path: str):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if {"model", "optimizer"} - set(state):
            raise ValueError("not a devicediff PyTorch checkpoint")

        def restore() -> None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "rng_cpu" in state:
                torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)

        return int(state["step"]), restore
