"""The classification rule (devicediff.diverge.compare) on synthetic arrays.

Each case builds a float64 "truth" R and float32 results that differ from it
the way rounding, or a bug, would make them differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from devicediff.diverge.compare import (
    BEYOND, IDENTICAL, ROUNDING, U32, compare_step, compare_tensor, module_of, ordered_names, start_gap,
)
from devicediff.diverge.lockstep import summarize, summary_line


def rng(seed=0):
    return np.random.default_rng(seed)


def f32_with_error(r: np.ndarray, g: np.random.Generator, scale: float = 8.0) -> np.ndarray:
    """float32 result of a computation of ``r`` with a relative error of ~scale·u per element."""
    return (r * (1 + scale * U32 * g.standard_normal(r.shape))).astype(np.float32)


def cmp(A, B, RA, RB=None, **kw):
    return compare_tensor(step=1, kind=kw.pop("kind", "grad"), name=kw.pop("name", "layers.0.weight"),
                          A=A, B=B, RA=RA, RB=RA if RB is None else RB, **kw)


def test_same_bits_are_identical():
    r = rng().standard_normal((10, 10))
    a = r.astype(np.float32)
    row = cmp(a, a.copy(), r)
    assert row.cls == IDENTICAL and row.ratio == 0 and row.max_abs == 0


def test_two_roundings_of_the_same_math_are_rounding_with_ratio_at_most_one():
    g = rng(1)
    worst = 0.0
    for _ in range(50):
        r = g.standard_normal(int(g.integers(1, 2000))) * 10 ** g.uniform(-6, 3)
        row = cmp(f32_with_error(r, g), f32_with_error(r, g, scale=100.0), r)
        assert row.cls in (ROUNDING, IDENTICAL)
        worst = max(worst, row.ratio)
    # the triangle inequality: |A-B| <= |A-R| + |R-B|
    assert worst <= 1.0 + 1e-9


def test_a_bug_far_beyond_rounding_is_found():
    g = rng(2)
    r = g.standard_normal(1000)
    rb = r * (1 + 1e-3)  # B computes other mathematics: its own reference differs
    row = cmp(f32_with_error(r, g), f32_with_error(rb, g), r, rb)
    assert row.cls == BEYOND and row.ratio > 100


def test_threshold_is_honoured():
    g = rng(3)
    r = g.standard_normal(1000)
    rb = r * (1 + 1e-5)  # about 10x the rounding errors
    row_default = cmp(f32_with_error(r, g), f32_with_error(rb, g), r, rb)
    assert row_default.cls == ROUNDING and 3 < row_default.ratio < 100
    row_strict = cmp(f32_with_error(r, g), f32_with_error(rb, g), r, rb, threshold=2.0)
    assert row_strict.cls == BEYOND


def test_exact_zeros_and_masks_do_not_make_false_alarms():
    # A ReLU mask and an all-zero gradient: float64 error exactly 0 on both sides.
    mask = (rng(4).standard_normal(100) > 0).astype(np.float64)
    assert cmp(mask.astype(np.float32), mask.astype(np.float32), mask).cls == IDENTICAL
    z = np.zeros(50)
    assert cmp(z.astype(np.float32), z.astype(np.float32), z).cls == IDENTICAL


def test_flipped_relu_mask_is_rounding():
    # One pre-activation near 0: A's float32 rounding flips its sign, B's does not. The
    # gradient element moves by O(1) in A - B, and by as much in A - R_A.
    g = rng(5)
    r = g.standard_normal(500)
    a, b = r.astype(np.float32), r.astype(np.float32)
    a[7] = 0.0  # A's mask dropped this element; the reference kept it
    row = cmp(a, b, r)
    assert row.cls == ROUNDING and row.ratio <= 1.0


def test_float64_noise_around_an_exact_zero_is_not_a_bug():
    # Side A's float64 reference cancels to exactly 0, side B's to 1e-17 (another
    # summation order); both float32 results land exactly on their references.
    g = rng(6)
    big = g.standard_normal(1000) * 1e-2
    a = {"grad/w": big.astype(np.float32), "ref64/grad/w": big.astype(np.float32).astype(np.float64),
         "grad/b": np.zeros(1, np.float32), "ref64/grad/b": np.zeros(1)}
    b = dict(a)
    b["ref64/grad/b"] = np.array([1e-17])
    b["grad/b"] = np.array([1e-17], np.float32)
    rows = {r.name: r for r in compare_step(a, b, 1)}
    assert rows["w"].cls == IDENTICAL
    assert rows["b"].cls == ROUNDING, rows["b"]


def test_absent_gradient_counts_as_zeros_and_is_named():
    g = rng(7)
    r = g.standard_normal(20)
    row = compare_tensor(step=1, kind="grad", name="layers.1.bias", A=r.astype(np.float32), B=None,
                         RA=r, RB=None)
    assert row.cls == BEYOND and "no gradient in B" in row.note
    row = compare_tensor(step=1, kind="grad", name="x", A=np.zeros(3, np.float32), B=None, RA=np.zeros(3), RB=None)
    assert row.cls == IDENTICAL  # None and zeros are the same gradient


def test_run_to_run_variation_is_measured_and_counted():
    # B varies by d between two runs of the same step (GPU atomics). With float64 references
    # the triangle inequality already covers any single run; the repeat is reported.
    g = rng(8)
    r = g.standard_normal(300)
    a = r.astype(np.float32)
    d = np.zeros(300, np.float32)
    d[::10] = 1e-3
    b = a + d
    row = cmp(a, b, r, B2=a.copy())
    assert row.cls == ROUNDING and "B varies run to run" in row.note and row.nd_b > 0
    # Without references (a side that writes none) only the repeat can explain the difference.
    bare = dict(step=1, kind="grad", name="w", RA=None, RB=None)
    assert compare_tensor(A=a, B=b, **bare).cls == BEYOND
    row = compare_tensor(A=a, B=b, B2=a.copy(), **bare)
    assert row.cls == ROUNDING and "no float64 reference" in row.note


def test_shape_mismatch_and_non_finite():
    r = np.ones(4)
    row = compare_tensor(step=1, kind="fwd", name="m", A=np.ones(4, np.float32), B=np.ones(5, np.float32), RA=r, RB=None)
    assert row.cls == BEYOND and "shape" in row.note
    nan = np.array([np.nan, 1.0], np.float32)
    assert cmp(nan, nan.copy(), np.array([np.nan, 1.0])).cls == IDENTICAL
    row = cmp(nan, np.array([1.0, 1.0], np.float32), np.array([1.0, 1.0]))
    assert row.cls == BEYOND and "non-finite" in row.note
    assert row.to_dict()["max_abs"] is None  # JSON-safe


def test_order_follows_side_a_then_b_only_keys():
    a = {"grad/z": 0, "fwd/b": 0, "weight/w": 0, "fwd/a": 0, "loss/loss": 0, "ref64/fwd/a": 0, "meta/step": 0}
    b = {"fwd/a": 0, "fwd/c": 0, "grad/z": 0}
    assert ordered_names(a, b) == [("fwd", "b"), ("fwd", "a"), ("fwd", "c"), ("loss", "loss"), ("grad", "z"),
                                   ("weight", "w")]


def test_module_of():
    assert module_of("grad", "layers.0.lstm.weight") == "layers.0.lstm"
    assert module_of("fwd", "layers.0.lstm@20:1") == "layers.0.lstm"
    assert module_of("loss", "loss") == "loss"


def test_start_gap():
    w = np.linspace(-1, 1, 10)
    pa = {"ref64/weight/w": w, "weight/w": w.astype(np.float32)}
    pb = {"ref64/weight/w": w + 1e-17, "weight/w": w.astype(np.float32)}
    assert start_gap(pa, pb) == 0.0  # float64 noise vanishes when both round to float32
    pc = {"ref64/weight/w": w * 1.01, "weight/w": w.astype(np.float32)}
    assert start_gap(pa, pc) == pytest.approx(0.01, rel=1e-3)
    assert start_gap(None, pb) is None


def test_summary_names_first_difference_and_first_beyond():
    g = rng(9)
    r = g.standard_normal(100)
    a32, noisy = r.astype(np.float32), f32_with_error(r, g)
    a = {"fwd/layers.0": a32, "ref64/fwd/layers.0": r, "grad/layers.1.bias": a32, "ref64/grad/layers.1.bias": r}
    b = {"fwd/layers.0": noisy, "ref64/fwd/layers.0": r, "grad/layers.1.bias": a32 * 2, "ref64/grad/layers.1.bias": r * 2}
    rows = compare_step(a, b, 1)
    s = summarize(rows, [], [], "x", "y")
    assert s["verdict"] == BEYOND
    assert s["first_difference"]["name"] == "layers.0" and s["first_difference"]["kind"] == "fwd"
    assert s["first_beyond"]["name"] == "layers.1.bias" and s["first_beyond"]["kind"] == "grad"
    line = summary_line(s)
    assert line.startswith("first difference: step 1, layers.0 fwd; beyond rounding first at: step 1, grad of layers.1.bias")
    assert line.endswith("verdict: beyond rounding")
    assert math.isfinite(s["max_ratio_rounding"])
