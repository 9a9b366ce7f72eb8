"""The on-disk cache of decoded MNIST arrays (devicediff.data.npcache): the same arrays as decoding,
never stale, never half-written, never trusted when damaged, safe when processes race to make it.

A tiny ``mnist.pkl.gz`` of the classic layout stands in for the real one (milliseconds a test)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from devicediff.data import mnist, npcache


def write_pickle(path: Path, seed: int = 0, n: int = 40) -> dict:
    """A tiny classic-layout mnist.pkl.gz; returns the arrays ``load_mnist`` should give."""
    rng = np.random.default_rng(seed)
    parts = []
    for size in (n, n // 2, n // 2):
        x = (rng.integers(0, 256, size=(size, 784)) / 256).astype(np.float32)
        parts.append((x, rng.integers(0, 10, size=size)))
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=0, mtime=0) as f:
        pickle.dump(tuple(parts), f)  # stored, not compressed: the size depends on the shapes only
    return {s: (x.reshape(-1, 28, 28), y.astype(np.int64)) for s, (x, y) in zip(mnist.SPLITS, parts)}


def load(path: Path) -> dict:
    mnist._load_all.cache_clear()  # a fresh process, as far as this module's memory goes
    return {s: mnist.load_mnist(s, str(path)) for s in mnist.SPLITS}


def same(got: dict, want: dict) -> bool:
    return all(got[s][0].dtype == want[s][0].dtype and np.array_equal(got[s][0], want[s][0]) and
               np.array_equal(got[s][1], want[s][1]) for s in mnist.SPLITS)


def cache_dirs(src: Path) -> list[Path]:
    root = src.parent / npcache.DIR_NAME
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture
def src(tmp_path, monkeypatch):
    monkeypatch.delenv(npcache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    p = tmp_path / "data" / "mnist.pkl.gz"
    p.parent.mkdir()
    return p


def test_the_cache_gives_the_decoded_arrays_and_is_used(src, monkeypatch):
    want = write_pickle(src)
    assert same(load(src), want)  # decodes, writes the cache
    (folder,) = cache_dirs(src)
    assert (folder / npcache.MANIFEST).is_file()
    monkeypatch.setattr(mnist, "_decode_pickle", lambda p: pytest.fail("decoded although the cache is good"))
    got = load(src)
    assert same(got, want)
    assert got["train"][0].flags.writeable  # like decoded arrays; copy-on-write, the file is not touched
    got["train"][0][0, 0, 0] = 7.0
    assert same(load(src), want)


def test_the_real_mnist_loads_the_same_through_the_cache(tmp_path, monkeypatch):
    pkl = mnist.mnist_pickle_path()
    if pkl is None:
        pytest.skip("MNIST not installed")
    monkeypatch.setenv(npcache.CACHE_ENV, str(tmp_path / "cache"))
    decoded = mnist._decode_pickle(pkl)
    for _ in range(2):  # built, then read back
        got = load(pkl)
        for s in mnist.SPLITS:
            assert got[s][0].dtype == np.float32 and got[s][1].dtype == np.int64
            assert got[s][0].tobytes() == decoded[s][0].tobytes() and np.array_equal(got[s][1], decoded[s][1])
    mnist._load_all.cache_clear()


def test_a_changed_source_is_never_served_stale(src):
    first = write_pickle(src, seed=1)
    assert same(load(src), first)
    old = cache_dirs(src)
    st = os.stat(src)
    second = write_pickle(src, seed=2)  # same size (same shapes and dtypes)...
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the old mtime put back: ctime still moves
    assert os.stat(src).st_size == st.st_size and os.stat(src).st_mtime_ns == st.st_mtime_ns
    assert same(load(src), second)
    new = cache_dirs(src)
    assert len(new) == 1 and new != old  # the stale copy is gone


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage manifest", "no manifest", "missing array",
                                    "manifest of another source", "foreign file"])
def test_a_damaged_cache_is_rebuilt_not_trusted(src, damage):
    want = write_pickle(src)
    load(src)
    (folder,) = cache_dirs(src)
    manifest = json.loads((folder / npcache.MANIFEST).read_text())
    arr = folder / manifest["arrays"]["train_x"]["file"]
    if damage == "flip a byte":
        b = bytearray(arr.read_bytes())
        b[-5] ^= 0x40
        arr.write_bytes(bytes(b))
    elif damage == "truncate":
        arr.write_bytes(arr.read_bytes()[:-100])
    elif damage == "garbage manifest":
        (folder / npcache.MANIFEST).write_text("{not json")
    elif damage == "no manifest":
        (folder / npcache.MANIFEST).unlink()
    elif damage == "missing array":
        arr.unlink()
    elif damage == "manifest of another source":
        manifest["sources"][0]["size"] += 1
        (folder / npcache.MANIFEST).write_text(json.dumps(manifest))
    else:
        arr.write_bytes(b"PK\x03\x04" + os.urandom(len(arr.read_bytes()) - 4))
    assert same(load(src), want)
    (again,) = cache_dirs(src)  # rebuilt in place: one good folder, no leftovers
    assert npcache.read_cache(again, npcache.source_identity([src]))
    assert same(load(src), want)


def _race(src: str, cache: str, barrier, out) -> None:
    os.environ[npcache.CACHE_ENV] = cache

    def slow_build():
        time.sleep(0.3)  # every process decodes at once, then they all try to install
        with gzip.open(src, "rb") as f:
            parts = pickle.load(f)
        return {f"{s}_{k}": np.asarray(a) for s, xy in zip(mnist.SPLITS, parts) for k, a in zip("xy", xy)}

    barrier.wait()
    arrays = npcache.cached_arrays("race", [Path(src)], slow_build)
    out.put({k: a.tobytes() for k, a in arrays.items()})


def test_processes_creating_the_cache_at_once_all_get_the_same_arrays(src, tmp_path):
    write_pickle(src)
    cache = tmp_path / "shared-cache"
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(src), str(cache), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("race-"), entries  # one folder, no temporary leftovers
    got = npcache.read_cache(cache / entries[0], npcache.source_identity([src]))
    assert {k: a.tobytes() for k, a in got.items()} == results[0]


def test_losing_the_install_race_keeps_the_winner(src, tmp_path):
    write_pickle(src)
    ident = npcache.source_identity([src])
    folder = tmp_path / "c" / "x-1"
    a = {"v": np.arange(5, dtype=np.float32)}
    npcache.write_cache(folder, ident, a)
    npcache.write_cache(folder, ident, {"v": np.arange(5, dtype=np.float32)})  # a second writer, same content
    assert np.array_equal(npcache.read_cache(folder, ident)["v"], a["v"])
    (folder / "a0.npy").write_bytes(b"junk")  # a bad one in place: the next writer replaces it
    npcache.write_cache(folder, ident, a)
    assert np.array_equal(npcache.read_cache(folder, ident)["v"], a["v"])
    assert sorted(p.name for p in folder.parent.iterdir()) == ["x-1"]


def test_unwritable_cache_or_cache_off_still_loads(src, tmp_path, monkeypatch):
    want = write_pickle(src)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(npcache.CACHE_ENV, str(blocker / "cache"))
    assert same(load(src), want)
    monkeypatch.setenv(npcache.CACHE_ENV, "off")
    assert same(load(src), want)
    assert cache_dirs(src) == []


def test_the_idx_folder_is_cached_too(tmp_path, monkeypatch):
    monkeypatch.setenv(npcache.CACHE_ENV, str(tmp_path / "cache"))
    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(3)
    images = {"train": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)}
    labels = {k: rng.integers(0, 10, len(v), dtype=np.uint8) for k, v in images.items()}
    for k in images:
        with gzip.open(root / f"{k}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.array(images[k].shape, dtype=">u4").tobytes() + images[k].tobytes())
        with gzip.open(root / f"{k}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + np.array([len(labels[k])], dtype=">u4").tobytes() + labels[k].tobytes())
    for _ in range(2):
        mnist._load_all.cache_clear()
        x, y = mnist.load_mnist("train", str(root))
        xt, yt = mnist.load_mnist("test", str(root))
        assert np.array_equal(x, images["train"].astype(np.float32) / 256.0) and np.array_equal(y, labels["train"])
        assert np.array_equal(xt, images["t10k"].astype(np.float32) / 256.0) and np.array_equal(yt, labels["t10k"])
        assert mnist.load_mnist("valid", str(root))[0].shape == (0, 28, 28)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    mnist._load_all.cache_clear()
