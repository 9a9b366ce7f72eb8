"""The lockstep step file: one ``.npz`` per side and step (numpy + stdlib only).

Any worker that takes part in ``devicediff diverge`` (the PyTorch loop, the
Chainer loop, a user's own) writes, for each step ``s = 1..N``, the file
``DIR/step{s:05d}.npz`` with :func:`write_step` and then emits the protocol
record ``{"kind": "lockstep", "step": s, "path": ...}``. This module imports
nothing but the standard library and numpy, so an old framework environment
(Chainer 7.8 with numpy<2) can load it on its own; the full format is written
up in ``docs/diverge.md``.

Keys are ``"{kind}/{name}"``:

``fwd/NAME``      output of module NAME (a path from PyTorch's ``named_modules()``:
                  every leaf module that the forward pass calls, plus the model
                  itself as ``<model>`` when it returns one tensor). A module called
                  several times in one step: ``fwd/NAME`` is the first call and
                  ``fwd/NAME@K`` the last one (the K-th, 1-based). A module returning
                  several tensors: ``fwd/NAME:I`` for the I-th (depth first).
``loss/loss``     the scalar loss of the step (shape ``()``)
``grad/NAME``     gradient of parameter NAME (``named_parameters()``); absent when
                  the parameter got no gradient
``weight/NAME``   parameter NAME after the optimizer step
``buffer/NAME``   buffer NAME after the step (``named_buffers()``: BatchNorm running
                  statistics, ``num_batches_tracked``), everything a module carries
                  to the next step that is not a parameter
``optim/NAME.KEY`` optimizer state KEY of parameter NAME after the step (Adam's
                  ``exp_avg``, ``exp_avg_sq``, ``step``)
``scaler/KEY``    gradient-scaler state after the step (fp16: ``scale``, ``growth_tracker``)
``carry/ATTR[.I]`` recurrent state the workload carries to the next batch (tensors in
                  its attributes, e.g. PredNet's ``_state``; ``.I`` the I-th tensor,
                  depth first)

each of them also as ``ref64/{kind}/{name}``: the same step computed in float64
on the CPU from the same state and batch (the rounding reference). Optional:

``local/{kind}/{name}`` the side's own rounding model for that tensor: float64
                        ``[error, bound, scale]``, ``error`` = ‖X − replay‖ (the op
                        that produced X replayed in float64 on the side's own inputs),
                        ``bound`` = the error its precision explains (componentwise
                        |A|·|B| × unit roundoff × reduction length, in L2), ``scale`` =
                        ‖|A|·|B|‖; absent for tensors the model does not cover

``rep/{kind}/{name}``   a second run of the same step from the same state, written
                        only for tensors that came out with other bits than the first
                        run; ``meta/repeat`` = 1 says the repeat was done
``free/loss/loss``, ``free/{kind}/NAME``   a free-running copy of the model, trained
                        normally (never re-synchronised), after this step (loss and
                        the carried kinds)
``meta/...``            small integers/floats (step, timings)

Within each kind, keys are written in the order the computation produced them
(forward-call order, backward order for gradients); readers keep that order.
"""

from __future__ import annotations

import ast
import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

KINDS = ("fwd", "loss", "grad", "weight", "buffer", "optim", "scaler", "carry")
#: kinds that carry over to the next step: ``identical`` needs every one of them bitwise equal
CARRIED = ("weight", "buffer", "optim", "scaler", "carry")
PREFIXES = ("ref64", "rep", "free", "meta", "local")
MODEL_NAME = "<model>"  # fwd key of the model's own output
LOSS_NAME = "loss"


def key(kind: str, name: str, prefix: str | None = None) -> str:
    """``key("grad", "layers.0.weight", "ref64") == "ref64/grad/layers.0.weight"``."""
    return f"{prefix}/{kind}/{name}" if prefix else f"{kind}/{name}"


def split_key(k: str) -> tuple[str | None, str, str]:
    """Inverse of :func:`key`: ``(prefix or None, kind, name)``. Names may hold dots,
    ``@``, ``:`` and ``<>`` but never start with a prefix word."""
    head, _, rest = k.partition("/")
    if head in PREFIXES and head != "meta":
        kind, _, name = rest.partition("/")
        return head, kind, name
    if head == "meta":
        return "meta", rest, ""
    return None, head, rest


def step_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step{int(step):05d}.npz"


def _as_array(v) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"lockstep arrays must be numeric or bool, got dtype {a.dtype}")
    return a


def assemble_step(step: int, own: Mapping[str, np.ndarray], ref64: Mapping[str, np.ndarray],
                  repeat: Mapping[str, np.ndarray] | None = None, free_loss=None,
                  free_weights: Mapping[str, np.ndarray] | None = None,
                  local: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """One step file's arrays, as every framework's lockstep side writes them, and whether
    the repeat came out with other bits.

    ``own``: the config's ``kind/name`` arrays in computation order; ``ref64``: the float64
    reference's, keyed ``ref64/kind/name``, put in ``own``'s order (its own hooks may order
    equal-time gradients otherwise), the rest after; ``repeat``: the second run of the step,
    of which only the arrays whose bits differ are kept (``rep/...``); the free-running copy's
    loss and carried tensors (``free_weights``: ``{name: array}`` for weights, or full
    ``kind/name`` keys for other kinds); ``local``: the rounding model, keyed
    ``local/kind/name``; ``meta/step`` and ``meta/repeat``.
    """
    arrays = dict(own)
    arrays.update({k: ref64[k] for k in (f"ref64/{a}" for a in own) if k in ref64})
    arrays.update({k: v for k, v in ref64.items() if k not in arrays})
    varied = False
    for k, v in (repeat or {}).items():
        mine = own.get(k)
        if mine is None or mine.shape != v.shape or mine.tobytes() != v.tobytes():
            arrays[f"rep/{k}"] = v
            varied = True
    if free_loss is not None:
        arrays[key("loss", LOSS_NAME, "free")] = free_loss
    for name, a in (free_weights or {}).items():
        arrays["free/" + name if name.split("/", 1)[0] in KINDS and "/" in name else key("weight", name, "free")] = a
    arrays.update(local or {})
    arrays["meta/step"] = np.int64(step)
    arrays["meta/repeat"] = np.int64(1 if repeat is not None else 0)
    return arrays, varied


def write_step(directory: str | os.PathLike, step: int, arrays: Mapping[str, object]) -> Path:
    """Write one step's arrays (insertion order kept) atomically; return the path.

    Uncompressed (``np.load`` reads it like any ``np.savez`` file): the parent
    reads every file once and deletes it, so speed matters more than size. The file appears under its final name only when
    complete (written to ``*.tmp.npz`` first, then renamed), so a reader that
    sees it can load it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = step_path(directory, step)
    tmp = directory / f".step{int(step):05d}.tmp.npz"
    clean = {}
    for k, v in arrays.items():
        if not isinstance(k, str) or "/" not in k:
            raise ValueError(f"lockstep key {k!r} is not 'kind/name'")
        clean[k] = _as_array(v)
    # What np.savez writes (a stored zip of .npy members, readable by np.load), but each array
    # goes out as one buffer: no copy, and zlib's CRC and the write syscall release the GIL, so
    # the lockstep loop, which writes from a helper thread, is not held up while it computes.
    with open(tmp, "wb") as f, zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, a in clean.items():
            a = a if a.flags.c_contiguous else a.copy(order="C")
            with zf.open(f"{k}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(a))
                member.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    os.replace(tmp, final)
    return final


def read_step(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a step file into a dict in the order it was written.

    The arrays are read-only views of the file mapped into memory (no copy, no
    CRC pass: three to five times faster than ``np.load`` for the parent, which
    reads two files per step). Files with compressed members go through
    ``np.load``.
    """
    try:
        return _read_mapped(path)
    except _NotPlain:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


class _NotPlain(Exception):
    pass


def _read_mapped(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path}: empty step file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after close / unlink
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:  # the central directory only
        infos = zf.infolist()
    for info in infos:
        if not info.filename.endswith(".npy"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise _NotPlain(info.filename)
        # The member's data follows its local header: 30 bytes, then the name and the extra field
        # (PKWARE APPNOTE 4.3.7); the data itself is an .npy file (numpy NEP 1).
        off = info.header_offset
        name_len, extra_len = struct.unpack("<HH", buf[off + 26 : off + 30])
        start = off + 30 + name_len + extra_len
        if buf[start : start + 6] != b"\x93NUMPY":
            raise _NotPlain(info.filename)
        major = buf[start + 6]
        if major == 1:
            (hlen,) = struct.unpack("<H", buf[start + 8 : start + 10])
            hstart = start + 10
        else:
            (hlen,) = struct.unpack("<I", buf[start + 8 : start + 12])
            hstart = start + 12
        header = ast.literal_eval(buf[hstart : hstart + hlen].decode("latin1"))
        dtype = np.lib.format.descr_to_dtype(header["descr"])
        if dtype.hasobject:
            raise _NotPlain(info.filename)
        shape = tuple(header["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=hstart + hlen)
        out[info.filename[:-4]] = arr.reshape(shape, order="F" if header["fortran_order"] else "C")
    return out


def step_keys(path: str | os.PathLike) -> list[str]:
    """Keys of a step file, in order, without loading the arrays."""
    with zipfile.ZipFile(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def iter_kind(arrays: Mapping[str, np.ndarray], prefix: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield ``(kind, name, array)`` for the keys with this prefix (None: the config's own)."""
    for k, v in arrays.items():
        p, kind, name = split_key(k)
        if p == prefix and kind in KINDS:
            yield kind, name, v


def name_outputs(first: Mapping[str, list], last: Mapping[str, list], calls: Mapping[str, int]) -> dict:
    """Name a step's recorded forward outputs, the same way in every framework.

    A module called once gives ``name``; one called K times (a recurrent layer
    over a window) gives its first call as ``name`` and its last as ``name@K``;
    a module with several outputs gives ``name:I`` for each. ``first``/``last``
    map a module name to the list of its output arrays at its first/last call.
    """
    out: dict = {}
    for name, snap in first.items():
        k = calls[name]
        for which, arrays in ((name, snap), (f"{name}@{k}", last.get(name))):
            if arrays is None:
                continue
            if len(arrays) == 1:
                out[which] = arrays[0]
            else:
                for i, a in enumerate(arrays):
                    out[f"{which}:{i}"] = a
    return out
