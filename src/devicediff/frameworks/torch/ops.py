"""Operation-level localisation for ``devicediff diverge`` (PyTorch; docs/diverge.md).

**Recording** (a side's worker, at the one step the module level found first beyond rounding or
suspect): :func:`recording` runs the step under :class:`OpRecorder`, a ``TorchDispatchMode`` that
sees every aten operation of forward, backward and optimizer. Per operation it keeps the phase, the
op (``aten.mul.Tensor``), the module it ran in (a stack kept by forward hooks on every module),
the Python line that issued it (the innermost frame outside torch and devicediff's own code; for a
backward operation, the line of a hook or custom ``backward`` running it, else the forward line
that created its autograd node, labelled at creation by :class:`_NodeLabels`), its non-tensor
arguments, and CPU copies of its tensor inputs (before it ran) and results (its outputs that are
not views, and every input it changed in place, e.g. BatchNorm's running statistics).

**The record**, in the side's folder: ``ops.json`` (``{"header": {...}, "ops": [entry, ...]}``, an
entry ``{i, phase, op, module, source, random, moves, args, kwargs, in, res, written, hin, hout,
hw}``: ``args`` and ``kwargs`` with each tensor as ``{"t": j}``, ``in``/``res`` as ``[shape,
dtype]``, ``written`` the inputs changed in place, ``h*`` content hashes of inputs, outputs and
written inputs) and ``ops.npz`` (``"{i}.i{j}"`` input ``j`` of op ``i``, ``"{i}.r{k}"`` its
result ``k``; bfloat16 stored as float32, exactly). Views and pure data movement (``moves``) keep
hashes only.

**Localisation** (:func:`localise`, ``python -m devicediff.frameworks.torch.ops localise DIR_A
DIR_B OUT.json``): the two sides' computing operations (views and data movement left out) are
aligned per phase, by op and issuing line, then by op alone (``difflib.SequenceMatcher``).
Walking them in order, the first of these is named: an operation one side issues and the other
does not; an aligned pair whose inputs have other shapes; an aligned pair that computes other
mathematics: **B's operation run on A's recorded inputs in float64 on the CPU differs from A's
operation on the same inputs** by more than ``MATH_TOL`` (relative L2 over its results); or an
aligned pair that **reads other data**: an input whose origin (traced by content through views and
copies to the operation that produced it) is not the same in B as in A, with values more than
``DATA_TOL`` apart (an aliasing bug). Teacher forcing per operation: what an operation inherits
from earlier ones is gone, only its own mathematics is compared. Separately, each side's **own
error** per operation (its recorded result against the float64 replay of its own operation on its
own inputs) is set against a rounding bound (:func:`own_error`); the first operation above it is
that side's ``suspect``. Random operations are aligned but never replayed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import linecache
import math
import os
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from devicediff.frameworks.torch.lockstep import tensor_leaves as _leaves
from devicediff.stepfiles import MODEL_NAME

RECORD, ARRAYS = "ops.json", "ops.npz"
PHASES = ("forward", "backward", "optimizer")
#: operations that move or re-label data without computing (besides views): never named, not aligned
MOVES = frozenset({
    "detach", "alias", "lift_fresh", "lift_fresh_copy", "clone", "_to_copy", "copy_", "contiguous", "_unsafe_view",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "resize_",
    "set_", "_reshape_alias", "view_copy", "detach_copy", "alias_copy", "t_copy", "expand_copy", "permute_copy",
    "transpose_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "as_strided_copy",
})
#: operations whose results are sums of products over one dimension: reduction length = that dimension
CONTRACT = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation"})
CONV = frozenset({"convolution", "convolution_backward"})
#: float64 replays of one operation on one input agree to ~1e-16; above this (relative L2) the
#: two sides' operations compute different mathematics
MATH_TOL = 1e-10
#: an input that comes from another place in B than in A (an aliasing bug) is named when its values
#: are also this far apart (relative L2): far above what either side's rounding moves a tensor
DATA_TOL = 1e-3
#: operations whose result is a copy of their (first) input: transparent when tracing where data comes from
COPIES = frozenset({"clone", "contiguous", "detach", "alias", "lift_fresh", "lift_fresh_copy", "_to_copy",
                    "detach_copy", "alias_copy"})
ELEMENTWISE_OPS = 8  # roundings per element allowed for any operation, on top of its reduction length
U = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
U_TF32 = 2.0**-11
LABEL = "devicediff_op"  # key of an autograd node's metadata: (module, source) of the forward call that made it

_TORCH = os.path.dirname(torch.__file__) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_PKG = str(Path(__file__).parents[2]) + os.sep
_WORKLOADS = _PKG + "workloads" + os.sep
_DRIVER = _PKG + "frameworks" + os.sep  # the lockstep step: nothing further out issued an operation
_WRAPPERS = (_TORCH + "_dynamo" + os.sep, _TORCH + "_compile.py", _TORCH + "utils" + os.sep + "_contextlib.py")


# -- recording ----------------------------------------------------------------------------------


def _library(filename: str) -> bool:
    """torch, the standard library, devicediff's own code (its built-in workloads are the user's)."""
    return filename.startswith(("<", _TORCH, _STDLIB)) or (filename.startswith(_PKG)
                                                             and not filename.startswith(_WORKLOADS))


def _frame(f) -> dict:
    """A source line: torch's and devicediff's files relative to their package's folder, others by
    name only (a stored payload names no user's folders)."""
    path, line = f.f_code.co_filename, f.f_lineno
    roots = [os.path.dirname(p.rstrip(os.sep)) + os.sep for p in (_TORCH, _PKG)]
    root = next((r for r in roots if path.startswith(r)), None)
    return {"file": path[len(root):] if root else os.path.basename(path), "line": line,
            "function": f.f_code.co_name, "code": linecache.getline(path, line).strip()}


def _source(backward: bool = False) -> dict | None:
    """The innermost frame of user code issuing this operation, below the lockstep step; else (not
    in backward) the innermost library frame (torch's optimizer, say). In backward only frames
    inside the autograd engine count (a hook, a custom ``backward``)."""
    f, fallback = sys._getframe(1), None
    while f is not None:
        name = f.f_code.co_filename
        if name == __file__ or name.startswith(_WRAPPERS):  # the recorder, and torch's own call wrappers
            f = f.f_back
            continue
        if (backward and f.f_code.co_name == "_engine_run_backward") or name.startswith(_DRIVER):
            break
        if not _library(name):
            return _frame(f)
        fallback = fallback or f
        f = f.f_back
    return None if backward or fallback is None else _frame(fallback)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _encode(obj: Any, tensors: list) -> Any:
    """A non-tensor argument as JSON; a tensor as ``{"t": j}`` (its place in ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"t": len(tensors) - 1}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    if isinstance(obj, (torch.layout, torch.memory_format)):
        return {"torch": str(obj).removeprefix("torch.")}
    return {"repr": repr(obj)}


class OpRecorder(TorchDispatchMode):
    """Every aten operation while active (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.entries: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.modules: list[str] = []  # the modules running now, innermost last
        self.owner = {id(p): n.rpartition(".")[0] or MODEL_NAME for n, p in model.named_parameters()}
        self.backward_seen = False
        self.optimizing = False

    def module(self) -> str | None:
        return self.modules[-1] if self.modules else None

    def _where(self) -> tuple[str, str | None, dict | None]:
        node = torch._C._current_autograd_node()
        if node is not None:
            self.backward_seen = True
            module, source = node.metadata.get(LABEL, (None, None))
            return "backward", module, _source(backward=True) or source
        phase = "optimizer" if self.optimizing else "backward" if self.backward_seen else "forward"
        return phase, self.module() if phase == "forward" else None, _source()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":  # profiler marks and the like
            return func(*args, **kwargs)
        phase, module, source = self._where()
        ins: list[torch.Tensor] = []
        enc_args, enc_kwargs = _encode(list(args), ins), {k: _encode(v, ins) for k, v in kwargs.items()}
        moves = func.is_view or func.overloadpacket.__name__ in MOVES
        i = len(self.entries)
        with torch._C.DisableTorchFunction():
            pre = [_cpu(t) for t in ins]
            out = func(*args, **kwargs)
            rets = func._schema.returns
            vals = out if len(rets) > 1 else (out,) if rets else ()
            outs = [(r.alias_info is None, _cpu(t)) for r, v in zip(rets, vals) for t in _leaves(v)]
            post = [] if moves else [_cpu(t) for t in ins]
        written = [j for j, (p, q) in enumerate(zip(pre, post)) if not _same_bits(p, q)]
        res = [t for own, t in outs if own] + [post[j] for j in written]
        if not moves:
            for j, t in enumerate(pre):
                self.arrays[f"{i}.i{j}"] = _numpy(t)
            for k, t in enumerate(res):
                self.arrays[f"{i}.r{k}"] = _numpy(t)
        self.entries.append({
            "i": i, "phase": phase, "op": str(func), "module": module, "source": source, "moves": moves,
            "random": torch.Tag.nondeterministic_seeded in func.tags, "args": enc_args, "kwargs": enc_kwargs,
            "in": [[list(t.shape), _dtype(t)] for t in ins], "res": [[list(t.shape), _dtype(t)] for t in res],
            "written": written, "hin": [_hash(t) for t in pre], "hout": [_hash(t) for _, t in outs],
            "hw": [_hash(post[j]) for j in written]})
        return out


def _hash(t: torch.Tensor) -> str:
    """A tensor's identity by content: its bits, dtype and shape."""
    digest = hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy(), digest_size=12).hexdigest()
    return f"{digest}:{_dtype(t)}:{list(t.shape)}"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class _NodeLabels(TorchFunctionMode):
    """Labels each autograd node, as the forward call that creates it returns, with the module and
    the source line of that call, so a backward operation can name both. A parameter's
    ``AccumulateGrad`` node gets the parameter's module."""

    def __init__(self, rec: OpRecorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        todo = [t.grad_fn for t in _leaves(out) if t.grad_fn is not None]
        label = (self.rec.module(), _source()) if todo else None
        while todo:
            node = todo.pop()
            if node is None or LABEL in node.metadata:
                continue
            var = getattr(node, "variable", None)
            node.metadata[LABEL] = (self.rec.owner.get(id(var)), None) if var is not None else label
            todo += [n for n, _ in node.next_functions]
        return out


@contextmanager
def recording(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Record every operation of the step run inside: ``with recording(model, opt) as rec: ...``."""
    rec = OpRecorder(model)

    def enter(name):
        return lambda _m, _args: rec.modules.append(name or MODEL_NAME)

    def leave(_m, _args, _out):
        rec.modules.pop()

    handles = []
    for name, m in model.named_modules():  # first before the module's own pre-hooks, last after its hooks
        handles += [m.register_forward_pre_hook(enter(name), prepend=True),
                    m.register_forward_hook(leave, always_call=True)]
    handles.append(optimizer.register_step_pre_hook(lambda *_: setattr(rec, "optimizing", True)))
    try:
        with _NodeLabels(rec), rec:
            yield rec
    finally:
        for h in handles:
            h.remove()


def write_record(out_dir: str | os.PathLike, header: dict, rec: OpRecorder) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / ARRAYS, **rec.arrays)
    path = out / RECORD
    path.write_text(json.dumps({"header": header, "ops": rec.entries}))
    return path


def read_record(folder: str | os.PathLike) -> tuple[dict, list[dict], Any]:
    """``(header, entries, arrays)`` of a side's record."""
    folder = Path(folder)
    if not (folder / RECORD).exists():
        raise FileNotFoundError(f"{folder}: no operation record ({RECORD})")
    d = json.loads((folder / RECORD).read_text())
    return d["header"], d["ops"], np.load(folder / ARRAYS)


# -- replay -------------------------------------------------------------------------------------


class NotReplayable(Exception):
    pass


def _func(name: str):
    ns, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError) as e:
        raise NotReplayable(f"{name} is not in torch {torch.__version__}") from e


def _decode(obj: Any, tensors: list, absolute: bool) -> Any:
    """An argument for the float64 replay on the CPU (floating dtypes become float64)."""
    if isinstance(obj, list):
        return [_decode(v, tensors, absolute) for v in obj]
    if isinstance(obj, dict):
        if "t" in obj:
            return tensors[obj["t"]]
        if "dtype" in obj:
            d = getattr(torch, obj["dtype"])
            return torch.float64 if d.is_floating_point else d
        if "device" in obj:
            return torch.device("cpu")
        if "torch" in obj:
            return getattr(torch, obj["torch"])
        raise NotReplayable(f"argument {obj.get('repr', obj)}")
    if absolute and isinstance(obj, float):
        return abs(obj)
    return obj


def _inputs(arrays, e: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(arrays[f"{e['i']}.i{j}"]) for j in range(len(e["in"]))]


def _results(arrays, e: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(arrays[f"{e['i']}.r{k}"]) for k in range(len(e["res"]))]


def replay(e: dict, inputs: list[torch.Tensor], *, absolute: bool = False,
           written: list[int] | None = None) -> list[torch.Tensor]:
    """Operation ``e`` on ``inputs`` in float64 on the CPU (on absolute values, float arguments
    too, with ``absolute``): its results as recorded (outputs that are not views, then the inputs
    ``written`` in place)."""
    func = _func(e["op"])
    ts = [(t.to(torch.float64, copy=True).abs() if absolute else t.to(torch.float64, copy=True))
          if t.is_floating_point() else t.clone() for t in inputs]
    try:
        out = func(*_decode(e["args"], ts, absolute), **{k: _decode(v, ts, absolute) for k, v in e["kwargs"].items()})
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise NotReplayable(f"{e['op']}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    rets = func._schema.returns
    vals = out if len(rets) > 1 else (out,) if rets else ()
    res = [t for r, v in zip(rets, vals) if r.alias_info is None for t in _leaves(v)]
    return res + [ts[j] for j in (e["written"] if written is None else written)]


def _l2(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in ts)) if ts else 0.0


def differ(ra: list[torch.Tensor], rb: list[torch.Tensor]) -> float | None:
    """None when two float64 replays agree (to ``MATH_TOL``, integers exactly); else by how much
    they differ, relative to the first (inf where shapes, kinds or non-finite places differ)."""
    if len(ra) != len(rb) or any(a.shape != b.shape or a.is_floating_point() != b.is_floating_point()
                                 for a, b in zip(ra, rb)):
        return math.inf
    fa = [a for a in ra if a.is_floating_point()]
    fb = [b for b in rb if b.is_floating_point()]
    if any(not torch.equal(a, b) for a, b in zip(ra, rb) if not a.is_floating_point()):
        return math.inf
    if any(not torch.equal(a.isnan(), b.isnan()) or not torch.equal(a.isinf(), b.isinf())
           or not torch.equal(a[a.isinf()], b[b.isinf()]) for a, b in zip(fa, fb)):
        return math.inf
    fa = [a[a.isfinite()] for a in fa]
    fb = [b[b.isfinite()] for b in fb]
    d = _l2([a.double() - b.double() for a, b in zip(fa, fb)])
    na, nb = _l2(fa), _l2(fb)
    if d <= MATH_TOL * (na + nb):
        return None
    return d / na if na > 0 else math.inf


def _reduction_length(e: dict) -> int:
    """Products or terms summed per result element: the contracted dimension of a matrix product,
    the fan-in of a convolution (and its gradient's batch × positions), else the largest input over
    the smallest result (a reduction), 1 for elementwise and ``_foreach``/``_fused`` operations."""
    name = e["op"].split(".")[1]
    shapes = [s for s, d in e["in"] if d in U]
    if name.startswith(("_foreach", "_fused")) or not shapes:
        return 1
    if name in CONTRACT:
        return max((s[-1] for s in shapes if s), default=1)
    if name == "convolution":  # (input, weight, ...): fan-in, also of a transposed layout
        w = shapes[1]
        return max(math.prod(w[1:]), w[0] * math.prod(w[2:]))
    if name == "convolution_backward":  # (grad_output, input, weight, ...): the weight's gradient sums over
        w, g = shapes[2], shapes[0]  # batch x positions
        return max(math.prod(w[1:]), w[0] * math.prod(w[2:]), math.prod(g) // g[1])
    res = [math.prod(s) for s, d in e["res"] if d in U] or [1]
    return max(1, math.ceil(max(math.prod(s) for s in shapes) / max(1, min(res))))


def _broadcasts(shape, to) -> bool:
    return len(shape) <= len(to) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def own_error(e: dict, arrays, header: dict) -> dict | None:
    """A side's own error on operation ``e`` (its recorded results against the float64 replay ``R``
    of its own operation on its own inputs) and the bound its arithmetic explains,
    ``k·u·‖M‖ + u·‖R‖`` (first order, componentwise: Higham, *Accuracy and Stability of Numerical
    Algorithms*, ch. 3), ``M`` the magnitude (``|R|``, the operation on absolute values, and every
    input that broadcasts to the result), ``k`` the reduction length + ``ELEMENTWISE_OPS``, ``u``
    the unit roundoff of the result's dtype (TF32 for matrix products and convolutions where the
    side allowed it); both relative to ``‖R‖``. None where it cannot be judged (random, data
    movement, non-float or non-finite results, not replayable)."""
    kinds = [d for _, d in e["res"]]
    if e["moves"] or e["random"] or not kinds or any(d not in U for d in kinds):
        return None
    ins, got = _inputs(arrays, e), _results(arrays, e)
    try:
        r64 = replay(e, ins)
    except NotReplayable:
        return None
    if [t.shape for t in r64] != [t.shape for t in got] or any(not torch.isfinite(t).all() for t in got + r64):
        return None
    try:
        rabs = replay(e, ins, absolute=True)
    except NotReplayable:
        rabs = []
    mags = []
    for k, r in enumerate(r64):
        m = r.abs()
        if k < len(rabs) and rabs[k].shape == r.shape and torch.isfinite(rabs[k]).all():
            m = m + rabs[k].abs()
        for t in ins:
            if t.is_floating_point() and _broadcasts(t.shape, r.shape):
                m = m + t.double().abs().expand(r.shape)
        mags.append(m)
    name = e["op"].split(".")[1]
    u = max(U[d] for d in kinds)
    if header.get("device", "cpu").startswith("cuda") and (
            (name in CONTRACT and header.get("tf32_matmul")) or (name in CONV and header.get("tf32_conv"))):
        u = max(u, U_TF32)
    k = _reduction_length(e) + ELEMENTWISE_OPS
    err = _l2([g.double() - r for g, r in zip(got, r64)])
    bound = k * u * _l2(mags) + u * _l2(r64)
    scale = _l2(r64) or _l2(mags) or 1.0
    return {"err": err / scale, "bound": bound / scale, "k": k, "u": u}


# -- localisation ---------------------------------------------------------------------------------


def where(e: dict) -> str:
    """``in module act (faults.py:42 in forward)``, or ``outside any module (adam.py:428 in ...)``."""
    m = f"in module {e['module']}" if e.get("module") else "outside any module"
    s = e.get("source")
    return f"{m} ({os.path.basename(s['file'])}:{s['line']} in {s['function']})" if s else m


def _shapes(inputs: list) -> str:
    """``[64, 32], [32] float32``: the inputs' shapes, their dtype once when they share one."""
    dtypes = {d for _, d in inputs}
    if len(dtypes) == 1:
        return ", ".join(f"[{', '.join(map(str, s))}]" for s, _ in inputs) + f" {dtypes.pop()}"
    return ", ".join(f"[{', '.join(map(str, s))}] {d}" for s, d in inputs)


def _describe(e: dict, side: str) -> dict:
    return {"side": side, "i": e["i"], "op": e["op"], "phase": e["phase"], "module": e.get("module"),
            "source": e.get("source"), "inputs": e["in"], "results": e["res"], "where": where(e)}


def _arg_diff(ea: dict, eb: dict) -> str:
    """Non-tensor arguments that differ, named from the schema, defaults filled in:
    ``momentum 0.1 (A) vs 0.12 (B)``."""
    try:
        schema = _func(eb["op"])._schema.arguments
    except NotReplayable:
        schema = []

    def named(e):
        out = {a.name: _encode(a.default_value, []) for a in schema if a.has_default_value()}
        out.update({schema[i].name if i < len(schema) else str(i): v for i, v in enumerate(e["args"])})
        return {**out, **e["kwargs"]}

    def tensor(v):
        return isinstance(v, dict) and "t" in v or isinstance(v, list) and any(map(tensor, v))

    def show(v):
        return f"{v:.6g}" if isinstance(v, float) else repr(v)

    a, b = named(ea), named(eb)
    return "; ".join(f"{k} {show(a.get(k))} (A) vs {show(b.get(k))} (B)" for k in dict.fromkeys(list(a) + list(b))
                     if a.get(k) != b.get(k) and not tensor(a.get(k)) and not tensor(b.get(k)))


def _math_ops(entries: list[dict], phase: str) -> list[dict]:
    return [e for e in entries if e["phase"] == phase and not e["moves"]]


def _key(e: dict) -> tuple:
    s = e.get("source") or {}
    return e["op"], os.path.basename(s.get("file", "")), s.get("line")


def _alignment(la: list[dict], lb: list[dict]):
    """``(tag, A's ops, B's ops)`` blocks in order (``difflib`` tags): aligned by op and issuing line,
    then what differs there by op alone (the same operation issued from another line still pairs)."""
    def blocks(ka, kb):
        return difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes()

    for tag, i1, i2, j1, j2 in blocks([_key(e) for e in la], [_key(e) for e in lb]):
        if tag != "replace":
            yield tag, la[i1:i2], lb[j1:j2]
            continue
        for t, a1, a2, b1, b2 in blocks([e["op"] for e in la[i1:i2]], [e["op"] for e in lb[j1:j2]]):
            yield t, la[i1 + a1:i1 + a2], lb[j1 + b1:j1 + b2]


def _compare(ea: dict, eb: dict, arrays_a) -> dict | None:
    """The named difference of an aligned pair, or None when B's operation on A's inputs agrees
    with A's in float64 (or cannot be replayed and has the same arguments)."""
    if ea["random"] or eb["random"]:
        return None
    if [s for s, _ in ea["in"]] != [s for s, _ in eb["in"]]:
        return {"kind": "shapes", **_describe(eb, "B"), "inputs_a": ea["in"]}
    written = sorted(set(ea["written"]) | set(eb["written"]))
    ins = _inputs(arrays_a, ea)
    args = _arg_diff(ea, eb)
    try:
        rel = differ(replay(ea, ins, written=written), replay(eb, ins, written=written))
    except NotReplayable as err:
        return {"kind": "args", **_describe(eb, "B"), "args": args, "note": str(err)} if args else None
    if rel is None:
        return None
    return {"kind": "math", **_describe(eb, "B"), "rel": rel, "args": args}


def _same_maths(ea: dict, eb: dict, arrays_a) -> bool:
    """Two differently named operations compute the same thing: both replay, in float64 on A's
    inputs, to the same results (an in-place variant, another overload). Anything that cannot be
    shown so (a random op, other shapes, an op that cannot be replayed on the CPU) is not."""
    if ea["random"] or eb["random"] or [s for s, _ in ea["in"]] != [s for s, _ in eb["in"]]:
        return False
    ins = _inputs(arrays_a, ea)
    try:  # what each produces: its results, and the inputs it writes (relu_'s result is its input)
        return differ(replay(ea, ins), replay(eb, ins)) is None
    except NotReplayable:
        return False


def _plain(args: list) -> str:
    return ", ".join(json.dumps(a) for a in args if not (isinstance(a, dict) and "t" in a))


def origins(entries: list[dict]) -> list[list[tuple]]:
    """Where each input of each operation comes from, found by content (bits, dtype, shape): a
    result of an earlier operation ``("op", i, k)``, a view of something ``("view", op, args,
    origin)``, fresh memory ``("fresh",)``, or the ``n``-th tensor from before the step the side
    reads ``("outside", n)`` (their values may differ between sides: teacher-forced state rounds
    alike only to the last bit); copies are transparent."""
    made: dict[str, tuple] = {}
    out, outside = [], 0
    for e in entries:
        din = []
        for h in e["hin"]:
            if h not in made:
                made[h], outside = ("outside", outside), outside + 1
            din.append(made[h])
        out.append(din)
        name, n = e["op"].split(".")[1], len(e["hout"])
        if name.startswith(("empty", "new_empty")):
            descs = [("fresh",)] * n
        elif not e["moves"] or not din:
            descs = [("op", e["i"], k) for k in range(n)]
        elif name == "copy_":
            descs = [din[1]] * n
        elif name in COPIES:
            descs = [din[0]] * n
        else:
            descs = [("view", e["op"], _plain(e["args"] + list(e["kwargs"].values())), din[0])] * n
        made.update(zip(e["hout"], descs))
        made.update((h, ("op", e["i"], "w", j)) for h, j in zip(e["hw"], e["written"]))
    return out


def _mapped(d: tuple, amap: dict) -> tuple:
    """B's origin in A's numbering (an operation A does not have stays B's)."""
    if d[0] == "op":
        return ("op", amap.get(d[1], ("B", d[1])), *d[2:])
    if d[0] == "view":
        return (*d[:3], _mapped(d[3], amap))
    return d


def _origin_text(d: tuple, entries: list[dict]) -> str:
    if d[0] == "op":
        e = entries[d[1]]
        return f"{e['op']} {where(e)}"
    if d[0] == "view":
        args = d[2].replace(str(2**63 - 1), "end")  # a slice to the end
        return f"{d[1].split('.')[1]}({args}) of {_origin_text(d[3], entries)}"
    return "fresh memory" if d[0] == "fresh" else f"tensor {d[1]} from before the step"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape or not a.is_floating_point():
        return 0.0 if a.shape == b.shape and torch.equal(a, b) else math.inf
    na = _l2([a])
    return _l2([a.double() - b.double()]) / na if na > 0 else (0.0 if _l2([b]) == 0 else math.inf)


class _Side:
    def __init__(self, record):
        self.header, self.entries, self.arrays = record
        self.origins = origins(self.entries)


def _data(ea: dict, eb: dict, a: _Side, b: _Side, amap: dict) -> dict | None:
    """An aligned pair that reads, in B, an input from another place than in A (by content; copies
    are transparent), with values more than ``DATA_TOL`` apart: an aliasing bug. Random operations
    are left to the module level's ``random`` verdict."""
    if ea["random"] or eb["random"]:
        return None
    for j, (da, db) in enumerate(zip(a.origins[ea["i"]], b.origins[eb["i"]])):
        if da == _mapped(db, amap):
            continue
        rel = _rel(_inputs(a.arrays, ea)[j], _inputs(b.arrays, eb)[j])
        if rel > DATA_TOL:
            return {"kind": "data", **_describe(eb, "B"), "input": j, "rel": rel,
                    "from_a": _origin_text(da, a.entries), "from_b": _origin_text(db, b.entries)}
    return None


def _multi_tensor(ops: list[dict]) -> bool:
    return any(e["op"].split(".")[1].startswith(("_foreach", "_fused")) for e in ops)


def first_difference(a: _Side, b: _Side) -> tuple[dict | None, int, int, str | None]:
    """``(named, aligned, agreeing, not_compared)``: the first difference between two sides'
    operations (module docstring), how many aligned pairs were compared and agreed before it, and
    a phase that was not compared operation by operation (why, in words) or None.

    A phase one side issues as multi-tensor kernels (``_foreach_*``/``_fused_*``: PyTorch's optimizers
    on a GPU) and the other as per-tensor operations (on the CPU) computes the same update through
    other operations in another order; it is left to the module level rather than named."""
    amap: dict[int, int] = {}  # B's operation -> A's, for the pairs aligned so far
    aligned = 0
    for phase in PHASES:
        oa, ob = _math_ops(a.entries, phase), _math_ops(b.entries, phase)
        multi_a = _multi_tensor(oa)
        if multi_a != _multi_tensor(ob):
            multi, single = ("A", "B") if multi_a else ("B", "A")
            return None, aligned, aligned, (f"the {phase} phase was not compared operation by operation: {multi} "
                                            f"issues multi-tensor kernels (_foreach_/_fused_), {single} per-tensor "
                                            f"operations (the module level judges its results)")
        for tag, la, lb in _alignment(oa, ob):
            if tag == "insert":
                return {"kind": "extra", **_describe(lb[0], "B")}, aligned, aligned, None
            if tag == "delete":
                return {"kind": "missing", **_describe(la[0], "A")}, aligned, aligned, None
            if tag == "replace":
                if len(la) != len(lb) or not all(_same_maths(ea, eb, a.arrays) for ea, eb in zip(la, lb)):
                    return ({"kind": "replaced", **_describe(lb[0], "B"), "op_a": la[0]["op"], "index_a": la[0]["i"]},
                            aligned, aligned, None)
                # other operations for the same mathematics (relu_ for relu): aligned after all
                for ea, eb in zip(la, lb):
                    aligned += 1
                    amap[eb["i"]] = ea["i"]
                continue
            for ea, eb in zip(la, lb):
                aligned += 1
                named = _compare(ea, eb, a.arrays) or _data(ea, eb, a, b, amap)
                if named:
                    return {**named, "index_a": ea["i"]}, aligned, aligned - 1, None
                amap[eb["i"]] = ea["i"]
    return None, aligned, aligned, None


def localise(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict:
    """Name the first operation whose mathematics differ between two sides' records (module
    docstring); each side's first operation off its own rounding bound too. The result's
    ``line`` says it in one sentence."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small replays: threads only add overhead (and run to run the same results)
    try:
        return _localise(dir_a, dir_b, t0)
    finally:
        torch.set_num_threads(threads)


def _localise(dir_a, dir_b, t0: float) -> dict:
    sides = {"A": _Side(read_record(dir_a)), "B": _Side(read_record(dir_b))}
    named, aligned, agree, not_compared = first_difference(sides["A"], sides["B"])
    suspect, largest = {}, {}
    for side, sd in sides.items():
        for e in sd.entries:
            own = own_error(e, sd.arrays, sd.header)
            if own is None:
                continue
            ratio = own["err"] / own["bound"] if own["bound"] > 0 else (math.inf if own["err"] > 0 else 0.0)
            if ratio > largest.get(side, {}).get("ratio", -1.0):
                largest[side] = {**_describe(e, side), **own, "ratio": ratio}
            if ratio > 1 and side not in suspect:
                suspect[side] = {**_describe(e, side), **own, "ratio": ratio}
    out = {"step": sides["A"].header.get("step"), "ops": {k: len(v.entries) for k, v in sides.items()},
           "aligned": aligned, "agree": agree, "not_compared": not_compared,
           "named": named, "suspect": suspect, "largest_own": largest, "time": round(time.perf_counter() - t0, 3)}
    out["line"] = ops_line(out)
    return out


def ops_line(r: dict) -> str:
    """The result of :func:`localise` in one sentence (docs/diverge.md)."""
    n = r.get("named")
    if n is None:
        which = "no compared operation" if r.get("not_compared") else "no operation"
        line = (f"{which} of step {r['step']} computes different mathematics: {r['agree']} aligned operations "
                f"agree on A's inputs in float64")
        if r.get("not_compared"):
            line += f"; {r['not_compared']}"
    else:
        what = f"{n['op']} ({n['phase']}) {n['where']}, inputs {_shapes(n['inputs'])}"
        tail = "; every operation before it agrees"
        if n["kind"] == "math":
            args = f" ({n['args']})" if n.get("args") else ""
            body = f"{what}{args}: B on A's inputs differs from A by {n['rel']:.1e} relative"
        elif n["kind"] == "args":
            body = f"{what}: its arguments differ ({n['args']}); not replayed: {n['note']}"
        elif n["kind"] == "shapes":
            body = f"{what}: its inputs have other shapes in A ({_shapes(n['inputs_a'])})"
        elif n["kind"] == "extra":
            body = f"B issues {what}, which A does not"
        elif n["kind"] == "missing":
            body = f"A issues {what}, which B does not"
        elif n["kind"] == "replaced":
            body = f"B issues {what} where A issues {n['op_a']}"
        else:
            body = (f"{what}: its input {n['input']} is {n['rel']:.1e} relative off A's; B's comes from "
                    f"{n['from_b']}, A's from {n['from_a']}")
        head = "reading other data" if n["kind"] == "data" else "whose mathematics differ"
        line = f"first operation {head}: {body}{tail}"
    for side, s in sorted(r.get("suspect", {}).items()):
        line += (f"; {side}'s {s['op']} ({s['phase']}) {s['where']} is {s['err']:.1e} from its own float64 "
                 f"replay, its arithmetic explains <= {s['bound']:.0e} (relative)")
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] != "localise":
        print("usage: python -m devicediff.frameworks.torch.ops localise DIR_A DIR_B OUT.json", file=sys.stderr)
        return 2
    Path(argv[3]).write_text(json.dumps(localise(argv[1], argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
