"""A Chainer 7.8 run, driven by ``frameworks._driver`` (runs inside the Chainer environment).

It emits the PyTorch backend's records, so the store, the report and ``devicediff diverge``
treat a Chainer run like any other:

* initial weights: the Chainer environment has no torch, so the main environment's interpreter
  (``job.torch_python``) builds the PyTorch model from the init seed and exports its
  ``state_dict`` (``init_export``); the Chainer model loads it by name, and the ``init`` hash is
  computed from the Chainer parameters exactly as PyTorch's ``state_sha256`` (PyTorch names and
  dtype strings), so it equals the PyTorch run's hash for the seed;
* batches: the same arrays in the same order (the workload's twin, ``workloads/<name>/chainer.py``);
* one step = one optimizer update (PredNet: one truncated-BPTT window).

Two parameters only the Chainer backend reads (a config's ``params``; registered in
``devicediff.frameworks``): ``frame_buffers`` ("reused" | "fresh", default "reused", the
original loop) chooses how frames are fed (``common.FrameFeeder``, docs/chainer.md); ``adam``
("chainer" | "pytorch", default "chainer") Chainer's Adam update or PyTorch's formula.

Standard library and numpy at import time; chainer loads when a backend is built.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from devicediff.fingerprint import blas_facts, fingerprint
from devicediff.frameworks import _driver
from devicediff.frameworks.chainer import init_export
from devicediff.job import Job
from devicediff.protocol import RecordWriter, Skip

DEFAULT_FRAME_BUFFERS = "reused"
DEFAULT_ADAM = "chainer"  # chainer.optimizers.Adam, as the original study; "pytorch": torch.optim.Adam's formula


def chainer_device(cfg: dict):
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


def apply_settings(cfg: dict, frame_buffers: str) -> tuple[object, dict]:
    """Apply a config's settings to Chainer; return (device, what took effect). Options Chainer
    has no switch for are refused when the study is read (``devicediff.frameworks``)."""
    import chainer

    from devicediff.frameworks.chainer.common import FrameFeeder

    device = chainer_device(cfg)
    on_gpu = device.xp is not np
    chainer.config.use_cudnn = "always" if cfg.get("cudnn", True) else "never"
    chainer.config.cudnn_deterministic = bool(cfg.get("deterministic", False))
    chainer.config.autotune = bool(cfg.get("cudnn_benchmark", False))
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
        "asarray_aliases_host_buffer": FrameFeeder(frame_buffers, device.xp).aliases(),
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


def state_sha256(model) -> str:
    """PyTorch's ``state_sha256`` of the Chainer model, under PyTorch names."""
    from devicediff.frameworks.chainer.common import named_arrays

    return init_export.state_sha256_arrays(named_arrays(model))


def load_twin(job: Job, outdir: Path):
    """The workload's Chainer twin and a model holding PyTorch's initial weights (on the CPU)."""
    from devicediff.frameworks.chainer.common import load_arrays
    from devicediff.workloads import make_twin

    meta, arrays = init_export.request(job, outdir)
    workload = make_twin(job.workload, "chainer", job.params, meta.get("describe") or {}, meta.get("mnist_path"))
    model = workload.build_model()
    load_arrays(model, arrays)
    sha = state_sha256(model)
    if sha != meta["sha256"]:
        raise RuntimeError(f"Chainer model hashes to {sha[:12]} after loading PyTorch's initial weights {meta['sha256'][:12]}")
    return workload, model, meta


class ChainerBackend(_driver.Backend):
    def __init__(self, job: Job, writer: RecordWriter):
        from devicediff.frameworks.chainer.common import FrameFeeder, make_adam

        self.job, self.writer = job, writer
        params = job.params
        frame_buffers = str(params.get("frame_buffers", DEFAULT_FRAME_BUFFERS))
        self.adam = str(params.get("adam", DEFAULT_ADAM))
        self.device, settings = apply_settings(job.config, frame_buffers)
        settings["adam"] = self.adam
        writer.emit("env", fingerprint=_fingerprint(self.device))
        writer.emit("effective", settings=settings)
        self.outdir = Path(job.artifact_dir)
        self.outdir.mkdir(parents=True, exist_ok=True)

        self.workload, self.model, _ = load_twin(job, self.outdir)
        writer.emit("init", sha256=state_sha256(self.model), n_params=self.n_params())
        self.model.to_device(self.device)
        self.device.use()
        self.optimizer = make_adam(self.adam, self.workload.lr)
        self.optimizer.setup(self.model)
        self.feed = FrameFeeder(frame_buffers, self.device.xp)
        self.steps_per_epoch = self.workload.steps_per_epoch()
        self.total_steps = _driver.total_steps(job.budget, self.steps_per_epoch)

    @property
    def xp(self):
        return self.device.xp

    def train_step(self, step: int, batch):
        """Forward the batch (PredNet: a whole window, losses summed), one backward, one update."""
        lr = self.workload.learning_rate(step, self.total_steps)
        if lr is not None:
            self.optimizer.alpha = lr
        loss = self.workload.loss(self.model, batch, self.feed)
        self.model.cleargrads()
        loss.backward()
        loss.unchain_backward()
        self.optimizer.update()
        return loss

    def loss_value(self, loss) -> float:
        return float(loss.array)

    def sync(self) -> None:
        if self.xp is not np:  # pragma: no cover - GPU
            self.device.device.synchronize()

    def evaluate(self) -> dict:
        import chainer

        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return self.workload.evaluate(self.model, self.xp)

    def artifacts(self) -> dict:
        import chainer

        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return self.workload.artifacts(self.model, self.xp, self.outdir)

    def state_sha256(self) -> str:
        return state_sha256(self.model)

    def flat_weights(self) -> np.ndarray:
        from devicediff.frameworks.chainer.common import named_arrays

        return init_export.flat_weights_arrays(named_arrays(self.model))

    def n_params(self) -> int:
        return int(sum(p.size for p in self.model.params()))

    def write_checkpoint(self, path: str, step: int) -> None:
        """Model and Adam state after ``step`` steps, as an npz."""
        import chainer

        s = chainer.serializers.DictionarySerializer()
        s["model"].save(self.model)
        s["optimizer"].save(self.optimizer)
        s("step", np.asarray(step))
        s("total_steps", np.asarray(self.total_steps))
        s("framework", np.asarray("chainer"))
        with open(path, "wb") as f:
            np.savez(f, **s.target)

    def read_checkpoint(self, path: str):
        import chainer

        with np.load(path, allow_pickle=False) as z:
            if str(z["framework"]) != "chainer":
                raise ValueError("not a Chainer checkpoint")
            step = int(z["step"])
            # Into copies, so a file that fails half-way leaves the run's state untouched.
            model = copy.deepcopy(self.model)
            optimizer = copy.copy(self.optimizer).setup(model)  # same kind and hyper-parameters, fresh state
            d = chainer.serializers.NpzDeserializer(z)
            d["model"].load(model)
            d["optimizer"].load(optimizer)

        def restore() -> None:
            self.model, self.optimizer = model, optimizer

        return step, restore
