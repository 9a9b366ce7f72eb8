"""Environment fingerprint: the facts about a machine that can change numbers.

CPU model and ISA flags, core count, GPU name and driver, CUDA/cuDNN versions,
BLAS, Python and library versions, the project's git revision. Never the
host name or the user name. Standard library at import; frameworks are asked
only if already imported (the worker calls ``framework_facts`` after loading).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

# ISA flags that matter for float kernels (vector width, FMA, bf16/fp16 units).
_ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def cpu_facts() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith(("model name", "Model")) and ":" in line:
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")) and ":" in line and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in _ISA if f in have]
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_isa": flags,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
    }


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    m = sys.modules.get(mod)
    return getattr(m, "__version__", None) if m else None


def blas_facts() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "num_threads", "version", "threading_layer", "architecture")
    return [{k: p.get(k) for k in keep if k in p} for p in threadpool_info()]


def gpu_facts_torch() -> dict:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    out = {
        "gpus": [p.name for p in props],
        "gpu_memory_gib": [round(p.total_memory / 2**30, 1) for p in props],
        "gpu_capability": [f"{p.major}.{p.minor}" for p in props],
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if smi.returncode == 0:
            out["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fingerprint() -> dict:
    """Call after the framework is imported, so its versions are included."""
    fp = {
        **cpu_facts(),
        "python": platform.python_version(),
        "libraries": {m: _version(m) for m in ("numpy", "torch", "chainer", "cupy", "scipy") if _version(m)},
        "blas": blas_facts(),
        "devicediff_git": git_revision(),
        **gpu_facts_torch(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        fp["torch_config"] = {"mkldnn": torch.backends.mkldnn.is_available(), "openmp": torch.backends.openmp.is_available()}
    return fp


def machine_id(fp: dict) -> str:
    """A short id of the hardware+software that can change numbers (no host name):
    same id means runs on these machines are expected to match bit for bit."""
    keys = ("cpu_model", "cpu_isa", "machine", "gpus", "driver", "cuda_runtime", "cudnn", "libraries")
    blob = json.dumps({k: fp.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def host_facts() -> dict:
    """What the parent can learn without importing a framework: CPU, GPUs from
    nvidia-smi, Python and installed package versions."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for pkg in ("numpy", "torch", "chainer", "cupy"):
        try:
            libs[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    fp = {**cpu_facts(), "python": platform.python_version(), "libraries": libs}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        rows = [line.split(", ") for line in out.stdout.strip().splitlines() if line.strip()]
        if out.returncode == 0 and rows:
            fp["gpus"] = [r[0] for r in rows]
            fp["driver"] = rows[0][-1]
    except (OSError, subprocess.SubprocessError):
        pass
    return fp
