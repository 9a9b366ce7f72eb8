"""Fused elementwise kernels for the lotter step on CUDA, with eager's arithmetic bit for bit.

Why (issue 17, docs/prednet.md "Fused elementwise kernels"): the lotter training step at the
headline settings issued about 2,800 CUDA kernels carrying 57 ms of GPU work, and on the lent
virtual machines the host could not always issue them that fast. Most of the small ones were the
ConvLSTM cell's and the error units' elementwise operations: per layer and time step 8 forward
kernels of the cell, about 14 backward, 4 + 4 of the errors. Here each becomes one kernel (two for
the cell's backward: its kernel and the concat of the gate gradients), written with
``torch.cuda.jiterator`` (NVRTC, shipped with PyTorch): 1,749 kernels a step instead of 2,763.

**The same bits.** Each kernel does, element by element, exactly the roundings eager's kernels do,
in eager's order: every product and sum is an explicitly rounded intrinsic (``__fmul_rn``,
``__fadd_rn``: the compiler may not contract them into a fused multiply-add), except where eager's
own compiled kernel does contract, where it is an explicit ``__fmaf_rn`` (``addcmul``, ``a + b*c``,
and ``tanh``'s backward, ``a * (1 - b*b)``: found by ``scripts/gpu/fused_forms.py`` on torch 2.11
+ CUDA 13.0, H200); ``tanhf`` is the function eager's ``tanh`` calls. Gradient sums the
autograd engine would form have two terms each, and IEEE addition commutes. Nothing is taken on
trust: before a device's first fused call, :func:`self_check` runs the fused forward and backward
and eager's on inputs that cover the edges (the hard sigmoid's corners, zeros of both signs, large,
tiny, infinite values) and compares the bits; if one differs the process keeps eager on that
device and says so once on stderr. The GPU tests in ``tests/workloads/test_prednet.py`` also train
whole steps both ways and compare the weights' bits.

**Where it runs.** ``usable``: CUDA float32 tensors in the default (contiguous) layout, outside
``torch.compile`` tracing and outside any dispatch mode, so ``devicediff diverge``'s
operation recorder (a ``TorchDispatchMode``) and the random-draw watch see eager's aten operations,
which compute the same bits. Elsewhere (CPU, float64 references, channels_last, autocast's
half-precision tensors) the model runs its eager code.
"""

from __future__ import annotations

import sys

import torch

# -- the kernels -------------------------------------------------------------------------------
# Eager's lotter cell (``eager_cell`` below): i, f, o = hardtanh(z * 0.2 + 0.5, 0, 1) (Keras's hard
# sigmoid: mul, add_, clamp), g = tanh(z_g), c = addcmul(f * c_prev, i, g), h = o * tanh(c).


def _hsig(name: str, z: str) -> str:
    # mul(0.2) and add_(0.5) round separately; clamp lets NaN through.
    return (f"float y{name} = __fadd_rn(__fmul_rn({z}, 0.2f), 0.5f);\n"
            f"  float {name} = y{name} != y{name} ? y{name} : fminf(fmaxf(y{name}, 0.0f), 1.0f);\n")


_CELL = ("  " + _hsig("i", "zi") + "  " + _hsig("f", "zf") + "  " + _hsig("o", "zo")
         + "  float g = tanhf(zg);\n"
         "  float cc = __fmaf_rn(i, g, __fmul_rn(f, cp));\n"  # addcmul(fc, i, g): one rounding, as eager's
         "  float th = tanhf(cc);\n")

# tanh's backward as eager's kernel computes it: a * (1 - b*b), with 1 - b*b contracted.
_TANH_BW = "__fmul_rn({g}, __fmaf_rn(-{y}, {y}, 1.0f))"
# hardtanh's backward: zero where the input was at or beyond a bound; then mul's by 0.2.
_HSIG_BW = "__fmul_rn((y{n} <= 0.0f || y{n} >= 1.0f) ? 0.0f : {g}, 0.2f)"

CELL_FWD = ("template <typename T> void dd_lotter_cell_fwd(T zi, T zf, T zo, T zg, T cp, T& h, T& c) {\n"
            + _CELL + "  c = cc;\n  h = __fmul_rn(o, th);\n}\n")


def _cell_bwd(with_gc: bool) -> str:
    name, gc_arg = ("dd_lotter_cell_bwd_gc", ", T gc") if with_gc else ("dd_lotter_cell_bwd", "")
    add_gc = "  gcc = __fadd_rn(gcc, gc);\n" if with_gc else ""
    return (f"template <typename T> void {name}(T zi, T zf, T zo, T zg, T cp, T gh{gc_arg}, "
            "T& dzi, T& dzf, T& dzo, T& dzg, T& dcp) {\n" + _CELL
            + "  float go = __fmul_rn(gh, th);\n"  # h = o * th
            "  float gth = __fmul_rn(gh, o);\n"
            f"  float gcc = {_TANH_BW.format(g='gth', y='th')};\n"
            + add_gc
            + "  float gi = __fmul_rn(gcc, g);\n"  # addcmul(fc, i, g): grad * g, grad * i, grad
            "  float gg = __fmul_rn(gcc, i);\n"
            "  float gf = __fmul_rn(gcc, cp);\n"  # fc = f * cp
            "  dcp = __fmul_rn(gcc, f);\n"
            f"  dzg = {_TANH_BW.format(g='gg', y='g')};\n"
            f"  dzi = {_HSIG_BW.format(n='i', g='gi')};\n"
            f"  dzf = {_HSIG_BW.format(n='f', g='gf')};\n"
            f"  dzo = {_HSIG_BW.format(n='o', g='go')};\n}}\n")


CELL_BWD, CELL_BWD_GC = _cell_bwd(False), _cell_bwd(True)

# Eager's error units (``eager_errors`` below): d = a - p; E = relu_(cat[d, -d]). Here one kernel writes both
# halves: ``s`` (+1, -1) broadcast over a (B, 2, C, H, W) output picks the half.
ERR_FWD = ("template <typename T> void dd_errors_fwd(T a, T p, T s, T& e) {\n"
           "  float d = __fsub_rn(a, p);\n"
           "  float x = s == 1.0f ? d : -d;\n"
           "  e = x != x ? x : fmaxf(x, 0.0f);\n}\n")
# relu's backward (threshold_backward on the result), neg's, the engine's sum, sub's.
ERR_BWD = ("template <typename T> void dd_errors_bwd(T g1, T g2, T e1, T e2, T& ga, T& gp) {\n"
           "  float a1 = e1 <= 0.0f ? 0.0f : g1;\n"
           "  float a2 = e2 <= 0.0f ? 0.0f : g2;\n"
           "  float gd = __fadd_rn(a1, -a2);\n"
           "  ga = gd;\n  gp = -gd;\n}\n")


_NAMES: dict[str, str] = {}


def _launch(code: str, n_out: int, *tensors: torch.Tensor) -> tuple:
    """Run a jiterator kernel (compiled by NVRTC at its first call, then cached) over ``tensors``."""
    name = _NAMES.get(code) or _NAMES.setdefault(code, code.split("void ", 1)[1].split("(", 1)[0])
    out = torch._C._cuda_jiterator_compile_and_launch_kernel(code, name, True, n_out, tensors, {})
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


# -- autograd ----------------------------------------------------------------------------------


class _LotterCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, c_prev, n):
        zi, zf, zo, zg = z.split(n, 1)
        h, c = _launch(CELL_FWD, 2, zi, zf, zo, zg, c_prev)
        ctx.save_for_backward(z, c_prev)
        ctx.n = n
        ctx.set_materialize_grads(False)
        return h, c

    @staticmethod
    def backward(ctx, gh, gc):
        z, c_prev = ctx.saved_tensors
        if gh is None:
            gh = torch.zeros_like(c_prev)
        parts = z.split(ctx.n, 1)
        if gc is None:
            g = _launch(CELL_BWD, 5, *parts, c_prev, gh)
        else:
            g = _launch(CELL_BWD_GC, 5, *parts, c_prev, gh, gc)
        return torch.cat(g[:4], 1), g[4], None


class _Errors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, p):
        b, ch = a.shape[:2]
        e = _launch(ERR_FWD, 1, a.unsqueeze(1), p.unsqueeze(1), _signs(a.device))[0]
        e = e.view(b, 2 * ch, *a.shape[2:])
        ctx.save_for_backward(e)
        return e

    @staticmethod
    def backward(ctx, ge):
        (e,) = ctx.saved_tensors
        ch = e.shape[1] // 2
        g1, g2 = ge.split(ch, 1)
        e1, e2 = e.split(ch, 1)
        ga, gp = _launch(ERR_BWD, 2, g1, g2, e1, e2)
        return ga, gp


_SIGNS: dict[torch.device, torch.Tensor] = {}


def _signs(device: torch.device) -> torch.Tensor:
    s = _SIGNS.get(device)
    if s is None:
        s = _SIGNS[device] = torch.tensor([1.0, -1.0], device=device).view(1, 2, 1, 1, 1)
    return s


# -- when ---------------------------------------------------------------------------------------

_checked: dict[torch.device, bool] = {}  # device -> self_check passed


def usable(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the fused kernels may stand in for eager's on these tensors now (module docstring):
    ``t`` contiguous, the others at least laid out like it (a frame sliced from a clip is)."""
    if torch.compiler.is_compiling() or not t.is_cuda or t.dtype != torch.float32 or not t.is_contiguous():
        return False
    for x in others:
        if x.dtype != torch.float32 or x.device != t.device or not _ordered(x):
            return False
    if torch._C._len_torch_dispatch_stack():
        return False
    ok = _checked.get(t.device)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # the check synchronises; a capture only replays what was checked before
        ok = _checked[t.device] = self_check(t.device)
    return ok


def _ordered(x: torch.Tensor) -> bool:
    """Strides in the contiguous order (a slice of a bigger contiguous tensor): results come out
    contiguous, as eager's do."""
    st = x.stride()
    return st[-1] == 1 and all(st[k] >= st[k + 1] * x.shape[k + 1] for k in range(x.dim() - 1))


def lotter_cell(z: torch.Tensor, c_prev: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c) of the lotter ConvLSTM cell from the gate convolution's output ``z`` (B, 4n, H, W)."""
    return _LotterCell.apply(z, c_prev, n)


def errors(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[ReLU(a - p), ReLU(p - a)] along channels."""
    return _Errors.apply(a, p)


# -- eager's code (the model's, everywhere else) and the check ------------------------------------


def eager_cell(z: torch.Tensor, c_prev: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lotter cell in aten operations: the model's code on CPU and wherever ``usable`` is False."""
    # One split, not two slices: the backward of a split is one concat, that of two slices two
    # zero-filled full-size gradients and their sum (5 launches); the same values.
    zifo, zg = z.split([3 * n, n], 1)
    # Keras 1/2 hard_sigmoid: clip(0.2 z + 0.5, 0, 1).
    i, f, o = torch.nn.functional.hardtanh(zifo.mul(0.2).add_(0.5), 0.0, 1.0).split(n, 1)
    c = torch.addcmul(f * c_prev, i, torch.tanh(zg))
    return o * torch.tanh(c), c


def eager_errors(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[ReLU(A - P), ReLU(P - A)] in aten operations; -(a - p) == (p - a) exactly, so one subtraction
    serves both."""
    d = a - p
    return torch.cat([d, d.neg()], 1).relu_()


def edge_values(device: torch.device, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Values for the check: the hard sigmoid's corners (z = ±2.5) and their neighbours, zeros of
    both signs, tiny, subnormal, large and infinite values, then normal draws at several scales."""
    special = torch.tensor([0.0, -0.0, 2.5, -2.5, 1e-38, -1e-38, 1e-45, -1e-45, 1.0, -1.0, 3e38, -3e38,
                            float("inf"), float("-inf"), 20.0, -20.0, 9.0, -9.0])
    near = torch.tensor([2.5, -2.5]).repeat_interleave(16)
    near = near + torch.arange(-8, 8).repeat(2) * 2.4e-7
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-3, 0.1, 1.0, 3.0, 30.0]).repeat_interleave(n // 5 + 1)
    normal = torch.randn(scales.numel(), generator=g) * scales
    return torch.cat([special, near, normal]).to(device)


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape:
        return False
    nan = torch.isnan(x)
    return bool(torch.equal(nan, torch.isnan(y)) and torch.equal(x.view(torch.int32)[~nan], y.view(torch.int32)[~nan]))


def compare(device: torch.device, batch: int = 2, n: int = 3, seed: int = 0) -> list[str]:
    """The fused forward and backward against eager's on edge values: the names of the results whose
    bits differ (NaN counts as equal to NaN), empty when all agree."""
    g = torch.Generator().manual_seed(seed)
    vals = edge_values(device, seed=seed)

    def draw(channels):  # (batch, channels, 16, 32) of edge values
        idx = torch.randint(len(vals), (batch * channels * 16 * 32,), generator=g)
        return vals[idx.to(device)].view(batch, channels, 16, 32)

    z0, c0 = draw(4 * n), draw(n)
    gh, gc = draw(n), draw(n)
    a0, p0, ge = draw(n), draw(n), draw(2 * n)
    bad = []
    for with_gc in (True, False):
        res = {}
        for how, cell in (("fused", lotter_cell), ("eager", eager_cell)):
            z, c_prev = z0.clone().requires_grad_(), c0.clone().requires_grad_()
            h, c = cell(z, c_prev, n)
            outs, grads = ((h, c), (gh, gc)) if with_gc else ((h,), (gh,))
            dz, dc = torch.autograd.grad(outs, (z, c_prev), grads)
            res[how] = {"h": h, "c": c, "dz": dz, "dc_prev": dc}
        bad += [f"cell{'' if with_gc else ' (no c grad)'} {k}" for k in res["eager"]
                if not _bits_equal(res["fused"][k], res["eager"][k])]
    res = {}
    for how, fn in (("fused", errors), ("eager", eager_errors)):
        a, p = a0.clone().requires_grad_(), p0.clone().requires_grad_()
        e = fn(a, p)
        da, dp = torch.autograd.grad(e, (a, p), ge)
        res[how] = {"e": e, "da": da, "dp": dp}
    bad += [f"errors {k}" for k in res["eager"] if not _bits_equal(res["fused"][k], res["eager"][k])]
    return bad


def self_check(device: torch.device) -> bool:
    """True when the fused kernels reproduce eager's bits on ``device`` (:func:`compare`); otherwise
    says which differ, once, on stderr."""
    try:  # the first fused call may come from an evaluation (no_grad) or under autocast
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
            bad = compare(device)
    except Exception as e:  # noqa: BLE001 - no NVRTC, an old torch: eager is always right
        bad = [f"{type(e).__name__}: {e}".splitlines()[0]]
    if bad:
        print(f"devicediff: prednet's fused lotter kernels do not reproduce eager's bits on {device} "
              f"({', '.join(bad)}); using eager", file=sys.stderr)
    return not bad
