"""A one-time cache of decoded arrays (MNIST from ``mnist.pkl.gz`` or IDX files), as ``.npy`` files
that later processes open memory-mapped instead of decoding the source again.

Decoding ``mnist.pkl.gz`` (gzip + pickle, 17 MB) takes about 1 s, and every worker process of a
study paid it; opening the cache takes a few milliseconds, plus a CRC-32 of what is opened
(about 60 ms for MNIST's 220 MB of float32).

Where: ``.devicediff-cache/<name>-<key>/`` beside the source files, else (that folder not
writable) ``$XDG_CACHE_HOME/devicediff`` (``~/.cache/devicediff``); ``DEVICEDIFF_DATA_CACHE``
names another folder, or ``off`` to decode every time. One folder per source state:

- **Never stale.** ``key`` hashes each source file's real path, size, mtime and ctime (in ns;
  ctime changes with any write, ``touch -d`` or ``cp -p`` included), so a changed source gets a
  new folder and the old one is removed.
- **Never half-written.** A folder is written under a private temporary name (arrays, then the
  manifest, each fsynced) and renamed into place in one step; a process that loses the race to
  another writing the same folder drops its own copy and uses the winner's.
- **Never trusted blindly.** Each open checks the manifest (format, sources), each array's dtype,
  shape, exact file size and CRC-32; anything wrong (a truncated, edited or foreign file) and the
  folder is set aside and rebuilt from the source.

The arrays come back as copy-on-write maps (``mmap_mode="c"``): writable like the decoded arrays
they stand for, and a write never reaches the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT = 1
CACHE_ENV = "DEVICEDIFF_DATA_CACHE"
DIR_NAME = ".devicediff-cache"
MANIFEST = "manifest.json"
STALE_TMP_S = 3600.0  # a temporary folder this old was left by a killed writer


def source_identity(paths: list[Path]) -> list[dict]:
    """What makes a source the same source: real path, size, mtime and ctime (ns) of each file."""
    out = []
    for p in paths:
        real = os.path.realpath(p)
        st = os.stat(real)
        out.append({"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns})
    return out


def cache_roots(source_dir: Path) -> list[Path]:
    """Folders a cache may live in, in order of preference ([] when caching is off)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return [] if env.strip().lower() in ("", "0", "off", "no", "false") else [Path(env)]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devicediff"
    return [Path(os.path.realpath(source_dir)) / DIR_NAME, user]


def _crc(a: np.ndarray) -> int:
    a = np.ascontiguousarray(a)
    return zlib.crc32(memoryview(a.reshape(-1)).cast("B")) if a.size else 0


def _open_array(path: Path, meta: dict) -> np.ndarray:
    """The array at ``path``, memory-mapped copy-on-write; ValueError unless it is what ``meta`` says."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: .npy format {version} is not one this cache writes")
        offset = f.tell()
    if fortran or dtype.hasobject or list(shape) != meta["shape"] or dtype.str != meta["dtype"]:
        raise ValueError(f"{path}: header says {dtype.str} {shape}, manifest {meta['dtype']} {meta['shape']}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) != offset + nbytes:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, expected {offset + nbytes}")
    a = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=tuple(shape)) if nbytes else np.zeros(shape, dtype)
    if _crc(a) != meta["crc32"]:
        raise ValueError(f"{path}: CRC-32 differs from the manifest's")
    return np.asarray(a)  # a plain ndarray over the map (the map stays open through .base)


def read_cache(folder: Path, ident: list[dict]) -> dict[str, np.ndarray]:
    """The cached arrays in ``folder``; FileNotFoundError if there is no such folder, ValueError
    if it is not a whole cache of this source state (folders are only ever installed whole, so
    anything missing or different in one is damage)."""
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    try:
        m = json.loads((folder / MANIFEST).read_text())
        if m.get("format") != FORMAT or m.get("sources") != ident:
            raise ValueError("the manifest is for another format or source state")
        return {name: _open_array(folder / meta["file"], meta) for name, meta in m["arrays"].items()}
    except Exception as e:  # noqa: BLE001 - whatever is wrong, the folder is not to be trusted
        raise ValueError(f"{folder}: {type(e).__name__}: {e}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_folder(tmp: Path, ident: list[dict], arrays: dict[str, np.ndarray]) -> None:
    meta = {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a)
        file = f"a{i}.npy"
        with open(tmp / file, "wb") as f:
            np.lib.format.write_array(f, a, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        meta[name] = {"file": file, "dtype": a.dtype.str, "shape": list(a.shape), "crc32": _crc(a)}
    with open(tmp / MANIFEST, "w") as f:  # last: a folder with a manifest is complete
        json.dump({"format": FORMAT, "sources": ident, "arrays": meta, "written": time.time()}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _set_aside(folder: Path) -> None:
    """Move a bad (or stale) cache folder out of the way in one step, then delete it."""
    trash = folder.with_name(f".{folder.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except OSError:
        return  # another process set it aside first, or the folder is not ours to move
    shutil.rmtree(trash, ignore_errors=True)


def write_cache(folder: Path, ident: list[dict], arrays: dict[str, np.ndarray]) -> None:
    """Install ``arrays`` as ``folder`` atomically. If another process installed a good one
    first, keep that one. Raises OSError when ``folder``'s parent is not writable."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # the umask's permissions, like the folder's other files
    try:
        _write_folder(tmp, ident, arrays)
        for _ in range(3):
            try:
                os.rename(tmp, folder)  # fails if ``folder`` exists (and is not empty)
                _fsync_dir(folder.parent)
                return
            except OSError:
                if not folder.exists():
                    raise
            try:
                read_cache(folder, ident)
                return  # another process won the race with a good copy
            except FileNotFoundError:
                continue  # it was being set aside just now: try again
            except ValueError:
                _set_aside(folder)  # a bad one: replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean(root: Path, name: str, keep: Path, ident: list[dict]) -> None:
    """Remove this source's stale caches (other states of the same files) and old temporary folders."""
    paths = [s["path"] for s in ident]
    now = time.time()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        p = Path(e.path)
        if p == keep or not e.is_dir(follow_symlinks=False):
            continue
        if e.name.startswith(f".{name}-") and (".tmp-" in e.name or ".bad-" in e.name):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
        elif e.name.startswith(f"{name}-"):
            try:
                m = json.loads((p / MANIFEST).read_text())
                if [s["path"] for s in m["sources"]] == paths:
                    _set_aside(p)
            except Exception:  # noqa: BLE001 - not ours to judge; leave it
                pass


def cached_arrays(name: str, sources: list[Path], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache of ``sources`` if it holds a good copy, else built
    and cached (where a cache folder is writable) for the next process."""
    if not sources:
        return build()
    try:
        ident = source_identity(sources)
    except OSError:
        return build()  # let the decoder say what is wrong with the source
    key = hashlib.sha256(json.dumps([name, FORMAT, ident], sort_keys=True).encode()).hexdigest()[:16]
    roots = cache_roots(Path(sources[0]).parent)
    for root in roots:
        folder = root / f"{name}-{key}"
        try:
            return read_cache(folder, ident)
        except FileNotFoundError:
            pass
        except ValueError:
            _set_aside(folder)  # rebuilt below rather than trusted
    arrays = build()
    for root in roots:
        folder = root / f"{name}-{key}"
        try:
            write_cache(folder, ident, arrays)
        except OSError:
            continue  # not writable: the next place
        _clean(root, name, folder, ident)
        break
    return arrays
