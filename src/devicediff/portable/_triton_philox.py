"""Triton kernels for the portable generator on CUDA: the same words as the numpy and eager torch
paths (Philox4x32-10, Salmon et al. 2011), fused with what is done to them.

Each program computes ``BLOCK`` Philox blocks (4 words each) and handles the 4 * BLOCK contiguous
elements they cover as a [BLOCK, 4] tile, so loads and stores are contiguous. Counter and key words
travel as signed 32-bit arguments (bit patterns) and are reinterpreted as uint32 inside, so one
compiled kernel serves every seed, stream and step.
"""

from __future__ import annotations

import torch

_AVAILABLE: bool | None = None
BLOCK = 512
NUM_WARPS = 4


def available() -> bool:
    """Triton imports and a tiny kernel compiles and runs (checked once per process)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401

            _kernels()
            out = torch.empty(8, dtype=torch.int32, device="cuda")
            _launch_bits(out, 8, (0, 0, 0, 0, 0))
            _AVAILABLE = True
        except Exception:  # no Triton, no compiler: the eager path gives the same bits
            _AVAILABLE = False
    return _AVAILABLE


def _i32(w: int) -> int:
    """A uint32 word as the int32 with the same bits."""
    return w - (1 << 32) if w >= (1 << 31) else w


_K = None


def _kernels():
    global _K
    if _K is not None:
        return _K
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_tile(pid, k0, k1, s, lo, hi, BLOCK: tl.constexpr):
        """Words of the BLOCK blocks of program pid as a [BLOCK, 4] uint32 tile, and the tile's
        element indices (int64)."""
        b = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c0 = b.to(tl.uint32)
        c1 = tl.full([BLOCK], 0, tl.uint32) + s.to(tl.uint32, bitcast=True)
        c2 = tl.full([BLOCK], 0, tl.uint32) + lo.to(tl.uint32, bitcast=True)
        c3 = tl.full([BLOCK], 0, tl.uint32) + hi.to(tl.uint32, bitcast=True)
        key0 = k0.to(tl.uint32, bitcast=True)
        key1 = k1.to(tl.uint32, bitcast=True)
        for _ in tl.static_range(10):
            a0 = c0
            a2 = c2
            c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ key0
            c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ key1
            c1 = a2 * 0xCD9E8D57
            c3 = a0 * 0xD2511F53
            key0 = key0 + 0x9E3779B9
            key1 = key1 + 0xBB67AE85
        lane = tl.arange(0, 4)[None, :]
        w = tl.where(lane == 0, c0[:, None],
                     tl.where(lane == 1, c1[:, None], tl.where(lane == 2, c2[:, None], c3[:, None])))
        idx = b[:, None] * 4 + lane
        return w, idx

    @triton.jit(do_not_specialize=["k0", "k1", "s", "lo", "hi"])
    def bits_kernel(out_ptr, n, k0, k1, s, lo, hi, BLOCK: tl.constexpr):
        w, idx = _philox_tile(tl.program_id(0), k0, k1, s, lo, hi, BLOCK)
        tl.store(out_ptr + idx, w.to(tl.int32, bitcast=True), mask=idx < n)

    @triton.jit(do_not_specialize=["k0", "k1", "s", "lo", "hi", "thr"])
    def dropout_kernel(x_ptr, out_ptr, n, k0, k1, s, lo, hi, thr, scale, BLOCK: tl.constexpr):
        w, idx = _philox_tile(tl.program_id(0), k0, k1, s, lo, hi, BLOCK)
        m = idx < n
        x = tl.load(x_ptr + idx, mask=m)
        keep = w < thr.to(tl.uint32, bitcast=True)
        f = tl.where(keep, scale, 0.0)  # float32; exact for the dtype-rounded scale
        y = x.to(tl.float32) * f
        tl.store(out_ptr + idx, y.to(x.dtype), mask=m)

    _K = (bits_kernel, dropout_kernel)
    return _K


def _grid(n: int):
    return (max(1, -(-n // (4 * BLOCK))),)


def _launch_bits(out: torch.Tensor, n: int, words) -> None:
    k0, k1, s, lo, hi = (_i32(w) for w in words)
    bits_kernel, _ = _kernels()
    with torch.cuda.device(out.device):
        bits_kernel[_grid(n)](out, n, k0, k1, s, lo, hi, BLOCK=BLOCK, num_warps=NUM_WARPS)


def bits(n: int, words, device: torch.device) -> torch.Tensor:
    """int64 words in [0, 2**32), flat, length n (same as the eager path)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    if n:
        _launch_bits(out, n, words)
    return out.to(torch.int64).bitwise_and_(0xFFFFFFFF)


def dropout(x: torch.Tensor, threshold: int, scale: float, words) -> torch.Tensor:
    """``x * (scale if word < threshold * 256 else 0)`` elementwise in C order, one kernel.
    ``scale`` must already be rounded to x's dtype (so that the float32 product, rounded back to
    x's dtype, equals the eager path's product in x's dtype)."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return out
    if threshold >= (1 << 24):
        return out.copy_(xc).mul_(scale)
    k0, k1, s, lo, hi = (_i32(w) for w in words)
    _, dropout_kernel = _kernels()
    with torch.cuda.device(xc.device):
        dropout_kernel[_grid(n)](xc, out, n, k0, k1, s, lo, hi, _i32(threshold << 8), scale,
                                 BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
