"""Per-function localisation for Chainer (issue 14, item 3): which ``FunctionNode`` of one
training step did something its inputs do not explain. Runs inside the Chainer environment.

``OpRecorder`` (a ``chainer.FunctionHook`` plus a ``LinkHook`` for the link path) records every
function application of one step: its order, class, the link that called it, the source line
that issued it (innermost frame outside chainer/ and devicediff/frameworks/), and host copies of
its inputs and outputs at forward time; at backward time the output gradients it received, the
input gradients it returned, and whether an array it had *saved for backward* (retained inputs
and outputs) changed since its forward. ``analyse`` then judges each node on its own:

* **saved arrays changed** (``changed_inputs``): exact comparison of what the backward is about
  to read with the copy taken at the forward. Any change means something wrote into memory the
  function kept (the reused frame buffer of the original PredNet loop, docs/chainer.md).
* **own error vs a float64 replay**: the forward is re-run in float64 on the recorded inputs (a
  fresh instance of the node's class with its constructor arguments), the backward in float64
  from the *forward-time* inputs and the recorded output gradients. The float32 result counts as
  rounding while ``max |got - ref| <= u (n + SLACK) M + tiny``: u the dtype's unit roundoff, n the
  reduction length of that output (conv/linear/matmul from their shapes, otherwise input size /
  output size), M the largest of |ref|, the replay on absolute values (|x|, |W|, |gy|: the
  magnitude of a reduction's terms) and, for a gradient shaped like an output gradient, |gy|.
  Beyond the bound: ``suspect``. A node whose replay fails is "not replayed".

``record`` runs a step under the recorder and writes ``ops.json`` (a list of entries, forward
entries in application order, then backward entries in the order backward ran them) and
``ops.npz`` (the arrays of the first flagged entries); it returns a summary naming the first
node whose saved inputs changed and the first suspect. docs/chainer.md, "Per-function
localisation", has the format and the limits.
"""

from __future__ import annotations

import json
import linecache
import math
import os
import sys
from pathlib import Path

import chainer
import numpy as np
from chainer.backends import cuda

from devicediff.frameworks.chainer.common import torch_name

SLACK = 8  # roundings beyond the reduction (an elementwise chain, the forward's rounding of saved outputs)
NPZ_MAX = 16  # flagged entries whose arrays go to ops.npz
_CHAINER_DIR = os.path.dirname(os.path.abspath(chainer.__file__)) + os.sep
_FRAMEWORKS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SRC_DIR = os.path.dirname(os.path.dirname(_FRAMEWORKS_DIR.rstrip(os.sep))) + os.sep
# what FunctionNode.apply sets on an instance (and our wrappers): not copied into a replay's node
_RUNTIME = {"inputs", "outputs", "rank", "stack", "lazy_grad_sum", "_input_layouts", "_output_layouts",
            "_output_count", "_input_indexes_to_retain", "_output_indexes_to_retain",
            "_retained_output_data", "_local_function_hooks", "forward", "backward"}


def _host(a):
    return None if a is None else np.array(cuda.to_cpu(a), copy=True)


def _caller() -> tuple[str | None, str]:
    """``path:line`` and the text of the innermost frame outside chainer and devicediff/frameworks."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith((_CHAINER_DIR, _FRAMEWORKS_DIR)):
        f = f.f_back
    if f is None:
        return None, ""
    path = f.f_code.co_filename
    shown = path[len(_SRC_DIR):] if path.startswith(_SRC_DIR) else path
    return f"{shown}:{f.f_lineno}", linecache.getline(path, f.f_lineno).strip()


class _Op:
    """One function application: what its forward saw and made, what its backward saw and made."""

    def __init__(self, seq, node, x, source, code, module, params):
        self.seq, self.node, self.x = seq, node, x
        self.source, self.code, self.module, self.params = source, code, module, params
        self.y = None  # outputs (host copies)
        self.gy = self.gx = self.targets = None  # output gradients; {input index: gradient}; indexes
        self.changed, self.now = [], {}  # saved arrays that changed; their backward-time copies


class _LinkStack(chainer.LinkHook):
    name = "devicediff_ops_links"

    def __init__(self, names):
        self.names, self.stack = names, []

    def forward_preprocess(self, args):
        self.stack.append(self.names.get(id(args.link)))

    def forward_postprocess(self, args):
        self.stack.pop()


class OpRecorder(chainer.FunctionHook):
    """Records every function application of the step run inside ``with OpRecorder(model):``.
    Applications made by a backward (``x0 - x1`` inside ``MeanSquaredError.backward``) belong
    to that backward and are not recorded."""

    name = "devicediff_ops"

    def __init__(self, model=None):
        from devicediff.stepfiles import MODEL_NAME

        links, self.param_names = {}, {}
        if model is not None:
            for path, link in model.namedlinks():
                links[id(link)] = MODEL_NAME if path == "/" else path.strip("/").replace("/", ".")
            self.param_names = {id(p.array): torch_name(path) for path, p in model.namedparams()}
        self.links = _LinkStack(links)
        self.ops, self.backward_order, self._by_id, self._in_backward = [], [], {}, False

    def __enter__(self):
        super().__enter__()
        self.links.__enter__()
        return self

    def __exit__(self, *exc):
        self.links.__exit__(*exc)
        super().__exit__(*exc)

    def forward_preprocess(self, function, in_data):
        if self._in_backward:
            return
        source, code = _caller()
        params = [self.param_names.get(id(a)) for a in in_data]
        module = next((m for m in reversed(self.links.stack) if m), None)
        if module is None and any(params):  # called outside any link: the owner of a parameter it uses
            module = next(p for p in params if p).rpartition(".")[0] or None
        op = _Op(len(self.ops), function, [_host(a) for a in in_data], source, code, module, params)
        self.ops.append(op)
        self._by_id[id(function)] = op
        forward = type(function).forward

        def recording_forward(inputs):
            outputs = forward(function, inputs)
            op.y = [_host(y) for y in outputs]
            return outputs

        function.forward = recording_forward

    def forward_postprocess(self, function, in_data):
        function.__dict__.pop("forward", None)

    def backward_preprocess(self, function, in_data, out_grad):
        op = self._by_id.get(id(function))
        self._in_backward = True
        if op is None:
            return
        self.backward_order.append(op)
        op.gy = [_host(g) for g in out_grad]
        _check_saved(function, op)
        backward = type(function).backward

        def recording_backward(indexes, grad_outputs):
            gxs = backward(function, indexes, grad_outputs)
            op.targets, op.gx = tuple(indexes), _by_target(function, indexes, gxs)
            return gxs

        function.backward = recording_backward

    def backward_postprocess(self, function, in_data, out_grad):
        self._in_backward = False
        function.__dict__.pop("backward", None)


def _by_target(node, indexes, gxs) -> dict:
    """``{input index: host gradient}`` from what ``backward`` returned (one per input or per target)."""
    gxs = list(gxs)
    if len(gxs) == len(node.inputs) and len(gxs) != len(indexes):
        gxs = [gxs[i] for i in indexes]
    return {i: _host(g.array if isinstance(g, chainer.Variable) else g) for i, g in zip(indexes, gxs) if g is not None}


def _check_saved(node, op) -> None:
    """Compare the arrays the backward will read (retained inputs and outputs) with their forward copies."""
    saved = [("input", k, node.inputs[k].data, op.x[k]) for k in node._input_indexes_to_retain or ()]
    out_data = node._retained_output_data or ()
    saved += [("output", k, d, op.y[k] if op.y else None)
              for k, d in zip(node._output_indexes_to_retain or (), out_data)]
    for kind, k, now, then in saved:
        if now is None or then is None:
            continue
        now = cuda.to_cpu(now)
        if now.shape == then.shape and np.array_equal(now, then, equal_nan=now.dtype.kind == "f"):
            continue
        d = np.abs(now.astype(np.float64) - then.astype(np.float64)) if now.shape == then.shape else np.inf
        op.changed.append({"kind": kind, "index": int(k), "max_abs_change": float(np.nanmax(d)),
                           "elements_changed": int(np.count_nonzero(d)), "size": int(then.size),
                           "max_abs_at_forward": float(np.abs(then).max()) if then.size else 0.0})
        op.now[(kind, k)] = np.array(now, copy=True)


# ---------------------------------------------------------------------------------------------
# float64 replays
# ---------------------------------------------------------------------------------------------


def _f64(a, absolute=False):
    if a is None or a.dtype.kind != "f":
        return a
    a = a.astype(np.float64)
    return np.abs(a) if absolute else a


def _fresh(node):
    """A new node of the same class with the same constructor state (and nothing ``apply`` set)."""
    f = object.__new__(type(node))
    f.__dict__.update({k: v for k, v in vars(node).items() if k not in _RUNTIME})
    return f


def _forward64(op, absolute=False):
    node = _fresh(op.node)
    xs = [chainer.Variable(a, requires_grad=a.dtype.kind == "f") for a in (_f64(x, absolute) for x in op.x)]
    with chainer.using_config("enable_backprop", True):
        ys = node.apply(xs)
    return node, xs, ys


def _replay(op, phase, absolute=False) -> dict:
    """``{k: float64 array}``: the forward's outputs, or the backward's input gradients, replayed."""
    node, xs, ys = _forward64(op, absolute)
    if phase == "forward":
        return {k: y.array for k, y in enumerate(ys)}
    gys = tuple(None if g is None else chainer.Variable(_f64(g, absolute)) for g in op.gy)
    with chainer.using_config("enable_backprop", False):
        gxs = node.backward(op.targets, gys)
    return _by_target(node, op.targets, gxs)


def _reduction(op, phase, k) -> int:
    """How many terms output ``k`` (forward) or input gradient ``k`` (backward) sums, at most."""
    name, xs = type(op.node).__name__, op.x
    w = xs[1] if len(xs) > 1 else None
    if name in ("Convolution2DFunction", "ConvolutionND"):
        if phase == "forward":
            return int(np.prod(w.shape[1:])) + 1
        return int(w.shape[0] * np.prod(w.shape[2:])) if k == 0 else op.y[0].size // op.y[0].shape[1]
    if name in ("Deconvolution2DFunction", "DeconvolutionND"):
        if phase == "forward":
            return int(w.shape[0] * np.prod(w.shape[2:])) + 1
        return int(np.prod(w.shape[1:])) if k == 0 else max(xs[0].size // xs[0].shape[1], op.y[0].size // op.y[0].shape[1])
    if name == "LinearFunction":
        if phase == "forward":
            return w.shape[1] + 1
        return w.shape[0] if k == 0 else xs[0].size // w.shape[1]
    if name in ("MatMul", "BatchMatMul"):
        return max(max(xs[0].shape[-2:]), max(xs[1].shape[-2:]))
    if phase == "forward":
        big, out = max([x.size for x in xs if x is not None and x.dtype.kind == "f"] or [1]), op.y[k].size
    else:
        big, out = max([g.size for g in op.gy if g is not None] or [1]), op.gx[k].size
    return max(1, -(-big // max(out, 1)))


def _max_abs(a) -> float:
    a = np.abs(np.asarray(a, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _error(got, ref) -> float:
    got, ref = got.astype(np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(got) & np.isfinite(ref)
    odd = ~fin & ~((got == ref) | (np.isnan(got) & np.isnan(ref)))
    if odd.any():
        return math.inf
    return float(np.abs(got[fin] - ref[fin]).max()) if fin.any() else 0.0


_UNJUDGED = {"own_error": None, "bound": None, "ratio": None, "n": None}


def _judge(op, phase, got: dict, ref: dict, absref: dict | None) -> dict:
    """Own error of the worst output (forward) or input gradient (backward) against its bound."""
    worst = None
    gy_shapes = {g.shape for g in op.gy or () if g is not None}
    gy_max = max([_max_abs(g) for g in op.gy or () if g is not None] or [0.0])
    for k, a in got.items():
        r = ref.get(k)
        if a is None or r is None or a.dtype.kind != "f":
            continue
        if a.shape != r.shape or r.dtype != np.float64:
            return {**_UNJUDGED, "note": f"not replayed: the replay gave {r.dtype}{r.shape} for {a.dtype}{a.shape}"}
        fi = np.finfo(a.dtype)
        n = _reduction(op, phase, k)
        mag = max(_max_abs(r), _max_abs(absref[k]) if absref and k in absref else 0.0,
                  gy_max if phase == "backward" and a.shape in gy_shapes else 0.0)
        err, bound = _error(a, r), float(fi.eps) / 2 * (n + SLACK) * mag + float(fi.tiny)
        if worst is None or err / bound > worst["ratio"]:
            worst = {"own_error": err, "bound": bound, "ratio": err / bound, "n": n}
    return worst or {**_UNJUDGED, "note": "no float output"}


def _check(op, phase) -> tuple[dict | None, dict]:
    """(the float64 replay or None, the judgement) of one entry."""
    got = dict(enumerate(op.y or ())) if phase == "forward" else op.gx
    if isinstance(op.node, chainer.function.FunctionAdapter):
        return None, {**_UNJUDGED, "note": "not replayed: an old-style chainer.Function"}
    try:
        ref = _replay(op, phase)
    except Exception as e:  # noqa: BLE001 - a node we cannot replay is said so, not fatal
        return None, {**_UNJUDGED, "note": f"not replayed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"}
    try:
        absref = _replay(op, phase, absolute=True)
    except Exception:  # noqa: BLE001 - then the magnitude is |ref| alone
        absref = None
    return ref, _judge(op, phase, got, ref, absref)


# ---------------------------------------------------------------------------------------------
# entries, files, summary
# ---------------------------------------------------------------------------------------------


def _num(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _shapes_dtypes(op, phase) -> tuple[dict, dict]:
    def sh(a):
        return None if a is None else list(a.shape)

    def dt(a):
        return None if a is None else str(a.dtype)

    if phase == "forward":
        return ({"in": [sh(x) for x in op.x], "out": [sh(y) for y in op.y or ()]},
                {"in": [dt(x) for x in op.x], "out": [dt(y) for y in op.y or ()]})
    return ({"grad_out": [sh(g) for g in op.gy], "grad_in": {str(k): sh(g) for k, g in op.gx.items()}},
            {"grad_out": [dt(g) for g in op.gy], "grad_in": {str(k): dt(g) for k, g in op.gx.items()}})


def _arrays(i, op, phase, ref) -> dict:
    """``ops.npz`` arrays of a flagged entry: what it got, what it made, the replay, changed saved arrays."""
    if phase == "forward":
        out = {f"{i}/x{k}": a for k, a in enumerate(op.x) if a is not None}
        out.update({f"{i}/y{k}": a for k, a in enumerate(op.y or ())})
    else:
        out = {f"{i}/gy{k}": a for k, a in enumerate(op.gy) if a is not None}
        out.update({f"{i}/gx{k}": a for k, a in op.gx.items()})
        for (kind, k), now in op.now.items():
            out[f"{i}/{kind}{k}@forward"] = op.x[k] if kind == "input" else op.y[k]
            out[f"{i}/{kind}{k}@backward"] = now
    out.update({f"{i}/ref{k}": np.asarray(a) for k, a in (ref or {}).items()})
    return out


def analyse(rec: OpRecorder) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The ``ops.json`` entries of a recorded step, and the arrays of its first flagged entries."""
    entries, arrays, flagged = [], {}, 0
    rows = [(op, "forward") for op in rec.ops] + [(op, "backward") for op in rec.backward_order if op.gx is not None]
    for i, (op, phase) in enumerate(rows):
        ref, j = _check(op, phase)
        suspect = j["ratio"] is not None and j["ratio"] > 1
        changed = op.changed if phase == "backward" else []
        notes = [j["note"]] if j.get("note") else []
        if suspect:
            notes.insert(0, f"suspect: own error {j['ratio']:.3g}x its rounding bound")
        if changed:
            c = changed[0]
            notes.insert(0, f"saved {c['kind']} {c['index']} changed between forward and backward "
                            f"(max {c['max_abs_change']:.3g})")
        shapes, dtypes = _shapes_dtypes(op, phase)
        ratio = j["ratio"]
        entries.append({
            "i": i, "phase": phase, "op": _op_name(op.node), "label": str(op.node.label),
            "forward": op.seq, "module": op.module, "params": [p for p in op.params if p],
            "source": op.source, "code": op.code, "shapes": shapes, "dtypes": dtypes,
            "n": j["n"], "own_error": _num(j["own_error"]), "bound": _num(j["bound"]),
            "ratio": "inf" if ratio is not None and not math.isfinite(ratio) else ratio,
            "suspect": suspect, "changed_inputs": changed, "note": "; ".join(notes),
        })
        if (suspect or changed) and flagged < NPZ_MAX:
            flagged += 1
            arrays.update(_arrays(i, op, phase, ref))
    return entries, arrays


def _op_name(node) -> str:
    inner = getattr(node, "_function", None) if isinstance(node, chainer.function.FunctionAdapter) else None
    return type(inner if inner is not None else node).__name__


def _where(e: dict) -> str:
    return f"{e['op']} ({e['module'] or 'no link'}; {e['source']}" + (f" `{e['code']}`)" if e["code"] else ")")


def summarise(entries: list[dict], step: int | None = None) -> dict:
    """Counts, the first node whose saved arrays changed and the first suspect, and one line."""
    changed = [e for e in entries if e["changed_inputs"]]
    suspect = [e for e in entries if e["suspect"]]
    pick = ("i", "phase", "op", "module", "source", "code", "forward", "own_error", "bound", "ratio")
    first_changed = first_suspect = None
    parts = []
    if changed:
        e, c = changed[0], changed[0]["changed_inputs"][0]
        same = sum(1 for x in changed if x["op"] == e["op"])
        first_changed = {**{k: e[k] for k in pick}, "kind": c["kind"], "index": c["index"],
                         "max_abs_change": c["max_abs_change"], "nodes": len(changed),
                         "max_abs_change_any": max(x["max_abs_change"] for e2 in changed for x in e2["changed_inputs"])}
        parts.append(f"saved {c['kind']} {c['index']} of {_where(e)} changed between its forward and backward "
                     f"by up to {c['max_abs_change']:.3g} ({same} {e['op']} node(s), {len(changed)} in all)")
    if suspect:
        e = suspect[0]
        first_suspect = {k: e[k] for k in pick}
        parts.append(f"first suspect: {e['phase']} of {_where(e)}, own error "
                     f"{e['ratio'] if isinstance(e['ratio'], str) else format(e['ratio'], '.3g')}x its rounding bound "
                     f"({len(suspect)} suspect entries)")
    n_fwd = sum(1 for e in entries if e["phase"] == "forward")
    not_replayed = sum(1 for e in entries if "not replayed" in e["note"])
    line = "; ".join(parts) or "no node changed its saved inputs; every replayed node is within its rounding bound"
    if not_replayed:
        line += f" ({not_replayed} entries not replayed)"
    return {"step": step, "forward": n_fwd, "backward": len(entries) - n_fwd, "not_replayed": not_replayed,
            "changed": len(changed), "suspect": len(suspect), "first_changed": first_changed,
            "first_suspect": first_suspect, "line": (f"step {step}: " if step is not None else "") + line}


def write_ops(out_dir, entries: list[dict], arrays: dict[str, np.ndarray]) -> dict:
    """``ops.json`` (the entries) and, when anything was flagged, ``ops.npz``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "ops.json")}
    tmp = out / f"ops.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(entries, indent=0))
    os.replace(tmp, out / "ops.json")
    if arrays:
        with open(out / f"ops.npz.tmp{os.getpid()}", "wb") as f:
            np.savez(f, **arrays)
        os.replace(out / f"ops.npz.tmp{os.getpid()}", out / "ops.npz")
        paths["npz"] = str(out / "ops.npz")
    return paths


def grads_sha256(grads: dict) -> str:
    """SHA-256 of ``{name: gradient}`` (sorted names, name then float32 bytes): a check that a
    recorded step computed the gradients of the step it claims to be."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(grads):
        h.update(name.encode() + b"|" + np.ascontiguousarray(cuda.to_cpu(grads[name])).tobytes())
    return h.hexdigest()


def record(run, model, out_dir, step: int | None = None) -> dict:
    """Run ``run()`` (one forward and backward; it returns the loss Variable) under an
    ``OpRecorder``, write ``ops.json``/``ops.npz`` into ``out_dir`` and return the summary
    (with the step's loss and the paths)."""
    with OpRecorder(model) as rec:
        loss = run()
    entries, arrays = analyse(rec)
    summary = summarise(entries, step)
    summary["loss"] = float(cuda.to_cpu(loss.array))
    summary["grads_sha256"] = grads_sha256({torch_name(k): p.grad for k, p in model.namedparams() if p.grad is not None})
    summary["files"] = write_ops(out_dir, entries, arrays)
    return summary
