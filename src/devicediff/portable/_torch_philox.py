"""The torch implementation of :mod:`devicediff.portable.philox`: the same words, on any device.

Two paths with identical bits:

* **eager**: plain int64 tensor operations, on any device. torch has no uint32 multiply-high, and
  the 32x32-bit product of Philox can reach 2**64, past int64. The trick: with ``Mn = M - 2**32``
  (negative, ``|Mn| < 2**30`` for both Philox multipliers) the product ``a * Mn`` of a word
  ``a < 2**32`` fits int64 exactly, and since ``a * M = a * Mn + a * 2**32``::

      lo = (a * Mn) & 0xFFFFFFFF         # the low word: a * M and a * Mn agree modulo 2**32
      hi = ((a * Mn) >> 32) + a          # arithmetic shift = floor division by 2**32

  so no operation ever overflows or relies on wrap-around. On the CPU it works in cache-sized chunks.
* **triton** (CUDA, when Triton imports): one fused kernel per draw, and for dropout one kernel that
  reads x, draws the mask and writes the output, so the mask never touches memory; backward runs the
  same kernel on the gradient (the mask is recomputed, not stored). Set ``DEVICEDIFF_PORTABLE_TRITON=0``
  to force the eager path.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from devicediff.portable.philox import (
    MASK32,
    PHILOX_M0,
    PHILOX_M1,
    counter_words,
    key_words,
    round_keys,
    stream_id,
    uniform_threshold,
)

_M0N = PHILOX_M0 - (1 << 32)
_M1N = PHILOX_M1 - (1 << 32)
_CPU_CHUNK_BLOCKS = 1 << 15  # 32k blocks: a few int64 temporaries of 256 KiB stay in L2


def _mulhilo(a, m: int, mn: int):
    """(hi, lo) words of a * m for a word a (Python int or int64 tensor in [0, 2**32))."""
    if isinstance(a, int):
        p = a * m
        return p >> 32, p & MASK32
    p = a * mn
    return (p >> 32).add_(a), p.bitwise_and_(MASK32)


def philox4x32_torch(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors (or Python ints) holding words; returns 4 words (tensors
    where they depend on a tensor input)."""
    for rk0, rk1 in round_keys(k0, k1):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0, _M0N)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1, _M1N)
        c0, c1, c2, c3 = hi1 ^ c1 ^ rk0, lo1, hi0 ^ c3 ^ rk1, lo0
    return c0, c1, c2, c3


def _words(seed, stream, counter):
    k0, k1 = key_words(seed)
    lo, hi = counter_words(counter)
    return k0, k1, stream_id(stream), lo, hi


def _bits_eager(n: int, seed, stream, counter, device) -> torch.Tensor:
    """int64 words in [0, 2**32), flat, length n."""
    k0, k1, s, lo, hi = _words(seed, stream, counter)
    nblocks = -(-n // 4)
    out = torch.empty((nblocks, 4), dtype=torch.int64, device=device)
    chunk = _CPU_CHUNK_BLOCKS if out.device.type == "cpu" else max(nblocks, 1)
    for b0 in range(0, nblocks, chunk):
        b1 = min(nblocks, b0 + chunk)
        blocks = torch.arange(b0, b1, dtype=torch.int64, device=out.device)
        r = philox4x32_torch(blocks, s, lo, hi, k0, k1)
        for j in range(4):
            out[b0:b1, j] = r[j]
    return out.reshape(-1)[:n]


# -- triton ------------------------------------------------------------------------------------

def _use_triton(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("DEVICEDIFF_PORTABLE_TRITON", "1") == "0":
        return False
    from devicediff.portable import _triton_philox

    return _triton_philox.available()


def _device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


# -- public (called from philox.py with a normalised shape) --------------------------------------

def random_bits(shape, seed, stream, counter, device, backend: str = "auto") -> torch.Tensor:
    d = _device(device)
    n = math.prod(shape)
    if backend == "triton" or (backend == "auto" and _use_triton(d)):
        from devicediff.portable import _triton_philox

        return _triton_philox.bits(n, _words(seed, stream, counter), d).reshape(shape)
    return _bits_eager(n, seed, stream, counter, d).reshape(shape)


def uniform(shape, seed, stream, counter, device, backend: str = "auto") -> torch.Tensor:
    w = random_bits(shape, seed, stream, counter, device, backend)
    return (w >> 8).to(torch.float32).mul_(2.0**-24)


def bernoulli_mask(shape, threshold: int, seed, stream, counter, device, backend: str = "auto") -> torch.Tensor:
    """Keep iff ``word >> 8 < threshold``, i.e. ``word < threshold * 256``."""
    if threshold >= (1 << 24):
        return torch.ones(shape, dtype=torch.bool, device=_device(device))
    w = random_bits(shape, seed, stream, counter, device, backend)
    return w < (threshold << 8)


def normal(shape, seed, stream, counter, device, dtype=None, backend: str = "auto") -> torch.Tensor:
    n = math.prod(shape)
    w = random_bits((-(-n // 4) * 4,), seed, stream, counter, device, backend).reshape(-1, 2, 2)
    top = (w >> 8).to(torch.float64)
    u1 = (top[..., 0] + 1.0) * 2.0**-24
    theta = top[..., 1] * (2.0 * math.pi * 2.0**-24)
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).reshape(-1)[:n]
    return z.to(dtype or torch.float32).reshape(shape)


def mask_scale(x: torch.Tensor, p: float, seed, stream, counter, backend: str = "auto") -> torch.Tensor:
    """``scale`` where kept and ``0`` where dropped, in x's dtype and shape (C order)."""
    keep = bernoulli_mask(tuple(x.shape), uniform_threshold(1.0 - p), seed, stream, counter, x.device, backend)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=x.device)
    return torch.where(keep, scale, torch.zeros((), dtype=x.dtype, device=x.device))


@functools.lru_cache(maxsize=64)
def _threshold_scale(p: float, dtype: torch.dtype) -> tuple[int, float]:
    """Keep threshold and ``1 / (1 - p)`` rounded to ``dtype`` (as the eager path rounds it)."""
    return uniform_threshold(1.0 - p), float(torch.tensor(1.0 / (1.0 - p), dtype=dtype))


def dropout_apply(x: torch.Tensor, p: float, seed, stream, counter, backend: str = "auto"):
    """``x * mask_scale`` (no autograd bookkeeping); returns (out, saved) where saved is the
    mask-scale tensor if one was materialised (eager) or None (fused Triton: recompute it)."""
    d = x.device
    if (backend == "triton" or (backend == "auto" and _use_triton(d))) and x.dtype in (
        torch.float32, torch.float16, torch.bfloat16,
    ):
        from devicediff.portable import _triton_philox

        t, scale = _threshold_scale(float(p), x.dtype)
        return _triton_philox.dropout(x, t, scale, _words(seed, stream, counter)), None
    ms = mask_scale(x, p, seed, stream, counter, backend="eager" if backend == "triton" else backend)
    return x * ms, ms
