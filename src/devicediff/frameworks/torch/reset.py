"""Put torch's process-wide state back as a fresh worker had it, between two runs of a warm worker.

A warm worker (``devicediff.worker``, docs/parallel.md) runs one config's cells one after another in
one process. Its environment (thread variables, ``CUBLAS_WORKSPACE_CONFIG``, the config's ``env``)
is the config's and was set before torch loaded, so it is right for every run. What a run can change
in the process after that is listed here, taken once by :func:`snapshot` right after ``import torch``
(before any run) and put back by :func:`restore` after every run:

==========================  =====================================================================
state                       how it is put back
==========================  =====================================================================
global RNGs                 CPU generator: its saved state (bytes); CUDA generators: the default seed
                            with offset 0, as a fresh process draws them; numpy's and ``random``'s
                            global generators: fresh entropy, as in a fresh process
backend flags               every ``torch.backends`` flag a config or a workload may set (cuDNN
                            enabled/benchmark/deterministic/TF32, cuBLAS reduced-precision
                            reductions, oneDNN, the ``fp32_precision`` tree of torch >= 2.9)
float32 matmul precision    ``torch.set_float32_matmul_precision``
deterministic algorithms    mode and ``warn_only``
default dtype / device      ``torch.set_default_dtype`` / ``torch.set_default_device``
threads                     ``torch.set_num_threads`` (the backend sets the config's again)
grad mode, anomaly mode     on / off as at start
autocast                    off on every device type, default dtypes, its cast cache cleared
compiled code               ``torch.compiler.reset()`` (dynamo's caches, compiled frames); inductor's
                            kernel cache is on disk and shared with fresh processes anyway
CUDA                        synchronise, current device, free the caching allocator's blocks,
                            cuBLAS workspaces, memory statistics
workload modules            the active portable-dropout context (``devicediff.portable.torch``);
                            data caches (MNIST arrays) and hardware facts (PredNet's compute
                            capability) are kept: they are read-only and equal in every process;
                            ``file.py:func`` workloads are re-imported for every run (a fresh module)
==========================  =====================================================================

Not resettable, so such configs run one process per run (``devicediff.executors.warm``):
cuDNN's autotuner cache (``cudnn_benchmark`` on a GPU: the algorithms picked by timing in one run
would be reused by the next, where a fresh process times them again), CUDA graphs and the compile
modes built on them or on timing (``reduce-overhead``, ``max-autotune``), and every framework but
PyTorch (Chainer keeps its own global configuration and CuPy memory pools).

Works with the torch of any environment a config names (``python``/``packages``): each piece
is skipped where that torch lacks it.
"""

from __future__ import annotations

import gc
import random
import sys
from typing import Any

import torch

# torch.backends attributes (dotted, below torch.backends) a run may change. Legacy flags first:
# in torch >= 2.9 they are views on the fp32_precision tree, which is restored last.
FLAGS = (
    "cudnn.enabled", "cudnn.benchmark", "cudnn.benchmark_limit", "cudnn.deterministic", "cudnn.allow_tf32",
    "cuda.matmul.allow_tf32", "cuda.matmul.allow_fp16_reduced_precision_reduction",
    "cuda.matmul.allow_bf16_reduced_precision_reduction", "cuda.matmul.allow_fp16_accumulation",
    "mkldnn.enabled", "mkldnn.deterministic", "opt_einsum.enabled",
)
PRECISION_TREE = (
    "fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision", "cudnn.conv.fp32_precision",
    "cudnn.rnn.fp32_precision", "mkldnn.fp32_precision", "mkldnn.matmul.fp32_precision",
    "mkldnn.conv.fp32_precision", "mkldnn.rnn.fp32_precision",
)
AUTOCAST_DEVICES = ("cpu", "cuda")
_MISSING = object()


def _get(path: str) -> Any:
    obj: Any = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _put(path: str, value: Any) -> None:
    *parents, name = path.split(".")
    obj: Any = torch.backends
    for part in parents:
        obj = getattr(obj, part)
    if getattr(obj, name) != value:
        setattr(obj, name, value)


def snapshot() -> dict[str, Any]:
    """The process's torch state now; take it before the first run touches anything."""
    flags = {p: v for p in FLAGS + PRECISION_TREE if (v := _get(p)) is not _MISSING}
    snap: dict[str, Any] = {
        "flags": flags,
        "matmul_precision": getattr(torch, "get_float32_matmul_precision", lambda: None)(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": getattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: False)(),
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device() if hasattr(torch, "get_default_device") else None,
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "rng_cpu": torch.get_rng_state(),
        "seed": torch.initial_seed(),  # a fresh process's seed of every generator (CUDA's too)
        "autocast_dtype": {},
    }
    if hasattr(torch, "get_autocast_dtype"):
        for dev in AUTOCAST_DEVICES:
            try:
                snap["autocast_dtype"][dev] = torch.get_autocast_dtype(dev)
            except (RuntimeError, TypeError):
                pass
    return snap


def _restore_autocast(snap: dict[str, Any]) -> None:
    for dev in AUTOCAST_DEVICES:
        try:
            torch.set_autocast_enabled(dev, False)  # torch >= 2.4
        except TypeError:  # older: one switch per device kind
            torch.set_autocast_enabled(False) if dev == "cuda" else torch.set_autocast_cpu_enabled(False)
        except RuntimeError:
            pass
    for dev, dtype in snap["autocast_dtype"].items():
        torch.set_autocast_dtype(dev, dtype)
    torch.clear_autocast_cache()


def _restore_cuda(default_seed: int) -> None:
    """Only where a run initialised CUDA; a fresh process starts with nothing allocated."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    torch.cuda.synchronize()
    torch.cuda.set_device(0)  # the worker sees only its own GPU(s); a fresh process starts on the first
    torch.cuda.manual_seed_all(default_seed)  # seed and offset 0, as at lazy initialisation
    torch.cuda.empty_cache()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.reset_peak_memory_stats()


def _restore_workload_modules() -> None:
    portable = sys.modules.get("devicediff.portable.torch")
    current = getattr(portable, "_current", None)
    if current is not None:
        current.set(None)


def restore(snap: dict[str, Any]) -> None:
    """Put back everything :func:`snapshot` took, and drop what the last run left behind."""
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "reset"):
        if "torch._dynamo" in sys.modules:  # never imported: nothing was compiled
            torch.compiler.reset()
    gc.collect()  # the last run's model, optimizer and tensors, before the allocator is emptied
    _restore_cuda(snap["seed"])
    _restore_autocast(snap)
    for path, value in snap["flags"].items():
        if path in FLAGS:
            _put(path, value)
    if snap["matmul_precision"] is not None:
        torch.set_float32_matmul_precision(snap["matmul_precision"])
    for path, value in snap["flags"].items():
        if path in PRECISION_TREE:
            _put(path, value)
    torch.use_deterministic_algorithms(snap["deterministic"], warn_only=snap["deterministic_warn_only"])
    torch.set_default_dtype(snap["default_dtype"])
    if snap["default_device"] is not None:
        torch.set_default_device(None if str(snap["default_device"]) == "cpu" else snap["default_device"])
    torch.set_num_threads(snap["num_threads"])
    torch.set_grad_enabled(snap["grad_enabled"])
    torch.autograd.set_detect_anomaly(snap["anomaly"])
    torch.set_rng_state(snap["rng_cpu"])
    _reseed_python_and_numpy()
    _restore_workload_modules()


def _reseed_python_and_numpy() -> None:
    random.seed()  # fresh entropy, as a new interpreter has
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def differences(snap: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs now from ``snap`` (``{name: (now, then)}``), for tests and the worker's check."""
    now = snapshot()
    out = {}
    for key, then in snap.items():
        value = now[key]
        if key == "rng_cpu":
            same = torch.equal(value, then)
        else:
            same = value == then
        if not same:
            out[key] = (value, then)
    return out
