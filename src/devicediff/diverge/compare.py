"""Parent side of ``devicediff diverge``: compare two sides' step files.

Pure functions of numpy arrays (no torch), so they are tested on synthetic
arrays and run in the parent whatever framework the sides used.

The rule (docs/diverge.md has the measurements behind it)
----------------------------------------------------------

For a tensor X at one step, side A's value ``A``, side B's value ``B`` and each
side's float64 reference ``R_A``, ``R_B`` (the same step computed in float64
from the same starting state and batch), with ``‖·‖`` the L2 norm over all
elements::

    d     = ‖A − B‖                      difference between the configs
    e_A   = ‖A − R_A‖, e_B = ‖B − R_B‖   each config's own rounding error
    n_A   = ‖A − A'‖,  n_B = ‖B − B'‖    run-to-run variation (A' the repeat), 0 if none
    floor = u·max(‖R_A‖, ‖R_B‖, ‖A‖, ‖B‖) + 2^-37·√n·rms_kind
    ratio = d / (e_A + e_B + n_A + n_B + floor)

``beyond rounding`` when ``ratio > threshold`` (default 100), ``identical``
when A and B have the same bits, ``rounding`` otherwise.

Why this works: by the triangle inequality
``‖A − B‖ ≤ ‖A − R_A‖ + ‖R_A − R_B‖ + ‖R_B − B‖``. When both sides compute the
same function, their float64 references agree to float64 rounding
(``‖R_A − R_B‖`` is ~2^29 times smaller than a float32 error), so the ratio
cannot exceed about 1, *whatever* the arithmetic did: reduction order, FMA,
TF32, a ReLU mask or a max-pool choice that flipped. It can exceed 1 only
when the references disagree, that is when the two sides compute different
mathematics: a bug, a semantic difference between frameworks, a planted fault.
The L2 norm (not the element-wise maximum) is used because a flipped ReLU mask
moves one element by O(1) in both ``d`` and ``e``.

The floor only matters when both configs land exactly on their references
(``e = 0``: zero gradients, masks, integers). Its first term is one float32
rounding of every element (u = 2^-24, the unit roundoff of IEEE 754 binary32
with round to nearest; Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §2.1: fl(x) = x(1 + δ), |δ| ≤ u); its second allows the
float64 references themselves a relative error 2^-37 = 2^16 · 2^-53 (float64
unit roundoff times a condition allowance of 65536) of the kind's typical
magnitude ``rms_kind`` (the root mean square of every reference element of
that kind at that step), so that a float64 gradient of exactly 0 on one side
and 1e-17 on the other (an exact cancellation done in another order) is not
called a bug.

Each side's own rounding model (``local/`` arrays, written by the side) adds two things:

* ``own_X = err_X / bound_X``: the side's own error for that tensor, from replaying the
  operation that produced it in float64 on the side's own inputs, over the bound its
  precision explains (componentwise ``|A|·|B|`` × unit roundoff × reduction length). A side
  with ``own_X > SUSPECT_FACTOR`` makes the tensor ``suspect``: its arithmetic is off by
  itself, whatever the other side does.
* ``scale``: ``‖|A|·|B|‖`` of the operation, so a tensor whose reference is ~0 (a bias gradient
  ahead of BatchNorm) is measured against the size of the numbers that cancelled, never by a
  relative error over a zero norm.

Tensors whose difference comes from random draws that the two sides did not share (a device
generator on one side, other draws on each) are ``random``, never ``rounding``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np

from devicediff.stepfiles import CARRIED, KINDS, split_key

U32 = 2.0**-24  # float32 unit roundoff (IEEE 754 binary32, round to nearest)
U64 = 2.0**-53  # float64 unit roundoff
REF_ALLOWANCE = 2.0**-37  # U64 * 2^16: how far two float64 references of the same math may disagree
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: keeps 0/0 away

IDENTICAL, ROUNDING, BEYOND = "identical", "rounding", "beyond rounding"
SUSPECT, RANDOM = "suspect", "random"
CLASSES = (IDENTICAL, ROUNDING, RANDOM, SUSPECT, BEYOND)
KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
#: own error over the rounding model's bound above which a side is ``suspect``; calibrated in
#: docs/diverge.md (benchmarks/diverge_calibrate.py): the bound is first-order rigorous, so a
#: correct side stays below 1; the largest ratio measured without a fault was far below it
SUSPECT_FACTOR = 1.0


@dataclass
class Row:
    step: int
    kind: str  # fwd, loss, grad, weight
    name: str  # module path (fwd), parameter name (grad, weight), "loss"
    module: str  # the module the tensor belongs to
    n: int  # elements
    max_abs: float  # max |A - B|
    l2: float  # ‖A - B‖
    rel_l2: float  # ‖A - B‖ / magnitude
    err_a: float  # ‖A - R_A‖ / magnitude (relative rounding error of A)
    err_b: float
    nd_a: float  # ‖A - A'‖ / magnitude (run-to-run), 0 if not measured or equal
    nd_b: float
    magnitude: float  # max(‖R_A‖, ‖R_B‖, ‖A‖, ‖B‖)
    ratio: float
    cls: str
    note: str = ""
    mode: str = "teacher"  # "teacher" (re-synchronised step) or "free" (free running)
    own_a: float = math.nan  # A's own error over its rounding bound (local replay); nan: not modelled
    own_b: float = math.nan
    bound_a: float = math.nan  # A's rounding bound, relative to magnitude
    bound_b: float = math.nan
    sensitivity: float = math.nan  # smallest relative change of this tensor the threshold calls beyond

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None if math.isnan(v) else (1e308 if v > 0 else -1e308)
        return d


def module_of(kind: str, name: str) -> str:
    """``layers.0.weight`` → ``layers.0``; ``layers.0@20:1`` → ``layers.0``; loss → ``loss``;
    ``optim/layers.0.weight.exp_avg`` → ``layers.0``; scaler → ``scaler``; carry → ``carry``."""
    if kind in ("grad", "weight", "buffer"):
        return name.rsplit(".", 1)[0] if "." in name else name
    if kind == "optim":
        parts = name.rsplit(".", 2)
        return parts[0] if len(parts) == 3 else name
    if kind in ("scaler", "carry"):
        return kind
    if kind == "fwd":
        return name.split("@", 1)[0].split(":", 1)[0]
    return name


def _sumsq(v: np.ndarray) -> float:
    v = v.ravel()
    # einsum's own loop in float64, not np.linalg.norm / dot: those call BLAS, whose thread pool
    # spins badly when the workers beside the parent keep every core busy (measured 30x slower).
    return float(np.einsum("i,i->", v, v, dtype=np.float64)) if v.size else 0.0


def _norm(x: np.ndarray) -> float:
    return math.sqrt(_sumsq(x))


def _diff(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x - y`` in float64 (float32 inputs are converted exactly on the fly)."""
    return np.subtract(x, y, dtype=np.float64)


def _dist(x: np.ndarray, y: np.ndarray) -> float:
    return _norm(_diff(x, y))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8) and a.size:
        u = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(np.ascontiguousarray(a).view(u), np.ascontiguousarray(b).view(u)))
    return a.tobytes() == b.tobytes()


def ordered_names(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], prefix: str | None = None):
    """``(kind, name)`` in side A's order (kinds fwd, loss, grad, weight), then B-only ones."""
    seen, out = set(), []
    for side in (a, b):
        for k in side:
            p, kind, name = split_key(k)
            if p == prefix and kind in KIND_ORDER and (kind, name) not in seen:
                seen.add((kind, name))
                out.append((kind, name))
    return sorted(out, key=lambda kn: KIND_ORDER[kn[0]])  # stable: keeps file order within a kind


class _Norms:
    """‖x‖ of the arrays of one step file, each computed once."""

    def __init__(self):
        self._cache: dict[int, tuple[np.ndarray, float]] = {}

    def __call__(self, x: np.ndarray | None) -> float:
        if x is None:
            return 0.0
        hit = self._cache.get(id(x))
        if hit is None or hit[0] is not x:
            hit = (x, _norm(x))
            self._cache[id(x)] = hit
        return hit[1]


def rms_group(kind: str, name: str) -> str:
    """The tensors whose typical magnitude sets the float64 allowance of the floor: one kind, and
    for optimizer, buffer and scaler state one state key (Adam's step counts, first and second
    moments live on scales 1e8 apart)."""
    if kind in ("optim", "buffer", "scaler"):
        return f"{kind}:{name.rsplit('.', 1)[-1]}"
    return kind


def _kind_rms(a, b, names, ref_prefix: str, norms: _Norms) -> dict[str, float]:
    """Root mean square of the reference elements of each :func:`rms_group`."""
    sq: dict[str, float] = {}
    cnt: dict[str, int] = {}
    for kind, name in names:
        group = rms_group(kind, name)
        r = a.get(f"{ref_prefix}/{kind}/{name}")
        if r is None:
            r = b.get(f"{ref_prefix}/{kind}/{name}")
        if r is None:
            continue
        nr = norms(r)
        if not math.isfinite(nr):
            continue
        sq[group] = sq.get(group, 0.0) + nr * nr
        cnt[group] = cnt.get(group, 0) + r.size
    return {k: math.sqrt(sq[k] / cnt[k]) if cnt[k] else 0.0 for k in sq}


def _own(local, mag: float) -> tuple[float, float, float]:
    """``(own error / bound, bound / magnitude, scale)`` from a side's ``local`` entry
    ``[err, bound, scale]``; nan where the side has none."""
    if local is None or len(local) != 3 or not np.all(np.isfinite(local)):
        return math.nan, math.nan, math.nan
    err, bound, scale = (float(x) for x in local)
    own = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
    return own, (bound / mag if mag > 0 else math.nan), scale


def compare_tensor(
    *, step: int, kind: str, name: str, A, B, RA, RB, A2=None, B2=None, rms_kind: float = 0.0,
    threshold: float = 100.0, mode: str = "teacher", norms: _Norms | None = None, LA=None, LB=None,
) -> Row:
    """Compare one tensor; ``A2``/``B2`` are the repeats (None: equal to A/B or not run);
    ``LA``/``LB`` each side's rounding model for it (``[err, bound, scale]``, or None)."""
    notes = []
    if A is None and B is None:
        raise ValueError(f"{kind}/{name}: absent on both sides")
    # An absent tensor (a parameter that got no gradient) counts as zeros, as in PyTorch.
    absent = {"fwd": "not called in {}", "grad": "no gradient in {}"}.get(kind, "absent in {}")
    if A is None:
        A, notes = np.zeros_like(B), notes + [absent.format("A")]
        RA = np.zeros_like(B) if RA is None else RA
    if B is None:
        B, notes = np.zeros_like(A), notes + [absent.format("B")]
        RB = np.zeros_like(A) if RB is None else RB
    # A side without its own reference borrows the other side's; with none at all, e = 0.
    ra_given, rb_given = RA, RB
    if ra_given is None:
        RA = rb_given if rb_given is not None and rb_given.shape == A.shape else A
        notes.append("no float64 reference from A")
    if rb_given is None:
        RB = ra_given if ra_given is not None and ra_given.shape == B.shape else B
        notes.append("no float64 reference from B")
    module = module_of(kind, name)
    if A.shape != B.shape:
        return Row(step, kind, name, module, int(A.size), math.inf, math.inf, math.inf, math.nan, math.nan, 0.0,
                   0.0, math.nan, math.inf, BEYOND, f"shape A {A.shape} vs B {B.shape}", mode)
    n = int(A.size)
    norm = norms or _Norms()
    diff = _diff(A, B)
    l2 = _norm(diff)
    if not math.isfinite(l2):  # NaN or inf somewhere in A or B
        same = _same_bits(A, B) or np.array_equal(A, B, equal_nan=True)
        cls = IDENTICAL if same else BEYOND
        return Row(step, kind, name, module, n, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, 0.0,
                   math.nan, 0.0 if same else math.inf, cls, "; ".join(notes + ["non-finite values"]), mode)
    identical = l2 == 0.0 and _same_bits(A, B)  # -0.0 and +0.0: no difference, other bits
    max_abs = float(max(diff.max(), -diff.min())) if n else 0.0
    ea = _dist(A, RA) if RA.shape == A.shape else math.nan
    eb = _dist(B, RB) if RB.shape == B.shape else math.nan
    nda = _dist(A, A2) if A2 is not None and A2.shape == A.shape else 0.0
    ndb = _dist(B, B2) if B2 is not None and B2.shape == B.shape else 0.0
    # The operation's own scale (‖|A|·|B|‖ from each side's rounding model) keeps a tensor whose
    # reference is ~0 from being judged by a relative error over a zero norm.
    scale = max(_own(LA, 1.0)[2], _own(LB, 1.0)[2], 0.0) if (LA is not None or LB is not None) else 0.0
    mag = max(norm(RA), norm(RB), 0.0 if math.isnan(scale) else scale)
    if not (mag > 0.0) or notes:
        mag = max(mag, norm(A), norm(B))  # references zero, missing or absent: the configs' own size
    floor = U32 * mag + REF_ALLOWANCE * math.sqrt(n) * rms_kind + TINY * math.sqrt(max(n, 1))
    denom = (0.0 if math.isnan(ea) else ea) + (0.0 if math.isnan(eb) else eb) + nda + ndb + floor
    ratio = l2 / denom
    own_a, bound_a, _ = _own(LA, mag)
    own_b, bound_b, _ = _own(LB, mag)
    cls = _classify(identical, ratio, threshold, own_a, own_b, notes)
    if nda > 0:
        notes.append("A varies run to run")
    if ndb > 0:
        notes.append("B varies run to run")
    rel = (lambda x: x / mag if mag > 0 else 0.0)
    return Row(step, kind, name, module, n, max_abs, l2, rel(l2), rel(ea), rel(eb), rel(nda), rel(ndb), mag,
               ratio, cls, "; ".join(notes), mode, own_a, own_b, bound_a, bound_b, threshold * denom / mag if mag > 0 else math.inf)


def _classify(identical: bool, ratio: float, threshold: float, own_a: float, own_b: float, notes: list) -> str:
    """identical (same bits) > beyond rounding (ratio over threshold) > suspect (a side's own error
    beyond its bound) > rounding. A suspect side is named in the notes either way."""
    bad = [s for s, o in (("A", own_a), ("B", own_b)) if o > SUSPECT_FACTOR]
    for s in bad:
        notes.append(f"{s} suspect: own error {own_a if s == 'A' else own_b:.3g}x its rounding bound")
    if identical:
        return IDENTICAL
    if ratio > threshold:
        return BEYOND
    return SUSPECT if bad else ROUNDING


#: kinds a side may not record at all (a Chainer side writes no carried state; an fp32 side has
#: no gradient scaler): when one side has no key of such a kind, its rows are not compared
OPTIONAL_KINDS = ("carry", "scaler")


def unrecorded(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> set[str]:
    """The :data:`OPTIONAL_KINDS` that one of the two step files does not record at all."""
    have = [{split_key(k)[1] for k in side if split_key(k)[0] is None} for side in (a, b)]
    return {k for k in OPTIONAL_KINDS if (k in have[0]) != (k in have[1])}


def random_pairing(info_a: Mapping | None, info_b: Mapping | None) -> str | None:
    """None when the two sides' random draws are shared (none, or the same draws on the CPU
    generator, seeded alike every step), else why they are not."""
    ra, rb = (info_a or {}).get("random") or [], (info_b or {}).get("random") or []
    if not ra and not rb:
        return None
    da = set((info_a or {}).get("random_devices") or []) | set((info_a or {}).get("random_generators") or [])
    db = set((info_b or {}).get("random_devices") or []) | set((info_b or {}).get("random_generators") or [])
    if sorted(ra) == sorted(rb) and da <= {"cpu"} and db <= {"cpu"}:
        return None
    who = "; ".join(f"{s}: {', '.join(r)}" for s, r in (("A", ra), ("B", rb)) if r)
    return f"random draws not shared ({who})"


def _mark_random(rows: list[Row], why: str, modules: list[str]) -> None:
    """Rows from the first drawing module on (forward order), and every later kind, that are not
    identical become ``random``: their difference comes through draws the sides did not share."""
    started = not modules
    for r in rows:
        if not started and r.kind == "fwd" and r.module in modules:
            started = True
        if (started or r.kind != "fwd") and r.cls != IDENTICAL:
            r.note = "; ".join(x for x in (r.note, why) if x)
            r.cls = RANDOM


def compare_step(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], step: int,
                 threshold: float = 100.0, info_a: Mapping | None = None, info_b: Mapping | None = None,
                 carried: str | None = None) -> list[Row]:
    """Teacher-forced rows of one step, in computation order (side A's); ``info_*``: what each
    side's ``lockstep`` record said about random draws (``random``, ``random_modules``, ...).
    ``carried``: why an earlier step's draws were not shared; each side's float64 reference drew
    its own (on its own device), so the teacher states of this step already carry them and every
    row that is not identical is ``random``."""
    skip = unrecorded(a, b)
    names = [kn for kn in ordered_names(a, b) if kn[0] not in skip]
    norms = _Norms()
    rms = _kind_rms(a, b, names, "ref64", norms)
    rows = []
    for kind, name in names:
        k = f"{kind}/{name}"
        rows.append(compare_tensor(
            step=step, kind=kind, name=name, A=a.get(k), B=b.get(k), RA=a.get(f"ref64/{k}"),
            RB=b.get(f"ref64/{k}"), A2=a.get(f"rep/{k}"), B2=b.get(f"rep/{k}"), rms_kind=rms.get(rms_group(kind, name), 0.0),
            threshold=threshold, norms=norms, LA=a.get(f"local/{k}"), LB=b.get(f"local/{k}"),
        ))
    if carried:
        _mark_random(rows, carried, [])
        return rows
    why = random_pairing(info_a, info_b)
    if why:
        mods = list(dict.fromkeys(list((info_a or {}).get("random_modules") or [])
                                  + list((info_b or {}).get("random_modules") or [])))
        _mark_random(rows, why, mods)
    return rows


def compare_free(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], step: int,
                 threshold: float = 100.0, norms: _Norms | None = None) -> list[Row]:
    """Free-running rows (loss and what carries over): each side's free copy against the other's,
    with each side's drift from its own teacher trajectory (the float64 reference
    after this step) as the rounding scale."""
    names = [kn for kn in ordered_names(a, b, "free") if kn[0] == "loss" or kn[0] in CARRIED]
    norms = norms or _Norms()
    rms = _kind_rms(a, b, names, "ref64", norms)
    rows = []
    for kind, name in names:
        k = f"{kind}/{name}"
        if f"free/{k}" not in a and f"free/{k}" not in b:
            continue
        rows.append(compare_tensor(
            step=step, kind=kind, name=name, A=a.get(f"free/{k}"), B=b.get(f"free/{k}"), RA=a.get(f"ref64/{k}"),
            RB=b.get(f"ref64/{k}"), rms_kind=rms.get(rms_group(kind, name), 0.0), threshold=threshold, mode="free",
            norms=norms,
        ))
    return rows


def start_gap(prev_a: Mapping[str, np.ndarray] | None, prev_b: Mapping[str, np.ndarray] | None) -> float | None:
    """Relative distance between the two sides' teacher states for the next step:
    the previous step's float64 weights rounded to each side's weight dtype."""
    if prev_a is None or prev_b is None:
        return None
    num = den = 0.0
    for k, ra in prev_a.items():
        p, kind, name = split_key(k)
        if p != "ref64" or kind != "weight":
            continue
        rb = prev_b.get(k)
        if rb is None or rb.shape != ra.shape:
            return math.inf
        da = prev_a.get(f"weight/{name}")
        db = prev_b.get(f"weight/{name}")
        ta = ra.astype(da.dtype if da is not None else np.float32)
        tb = rb.astype(db.dtype if db is not None else np.float32)
        den += _sumsq(ta)
        if not _same_bits(ta, tb):
            num += _sumsq(_diff(ta, tb))
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def first(rows: Iterable[Row], classes: tuple[str, ...]) -> Row | None:
    for r in rows:
        if r.cls in classes:
            return r
    return None
