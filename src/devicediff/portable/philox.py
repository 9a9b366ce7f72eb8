"""Philox4x32-10: one counter-based generator, the same bits on numpy, on torch's CPU and on any GPU.

Why: torch's CPU generator (Mersenne Twister) and its CUDA generator (Philox with its own counter
layout and per-kernel offsets) give different streams from the same seed, so a model with dropout
trained on CPU and on GPU draws different masks, and the configs are no longer paired. A
counter-based generator is a pure function of (key, counter): every element's random word can be
computed anywhere, in any order, with integer arithmetic alone, so the bits cannot depend on the
device, the thread count or the framework.

The algorithm is Philox4x32 with 10 rounds from Salmon, Moraes, Dror and Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC 2011 (constants from section 4 of the paper). One call maps a
128-bit counter (four 32-bit words) and a 64-bit key (two words) to four 32-bit words. devicediff
lays the words out as::

    key     = (seed & 0xFFFFFFFF, seed >> 32)                  # 64-bit seed
    counter = (block, stream, counter & 0xFFFFFFFF, counter >> 32)

and element ``i`` of a draw (C order over ``shape``) takes word ``i % 4`` of block ``i // 4``. So a
draw is named by ``(seed, stream, counter)``: ``stream`` (32 bits, or a name hashed to 32 bits)
separates users (e.g. dropout layers), ``counter`` (64 bits) separates draws of one user (e.g.
training steps). One draw holds at most 2**34 elements.

Derived values, each defined on the integer word so that every implementation agrees exactly:

* ``uniform``: ``(word >> 8) * 2**-24`` as float32, in [0, 1): the top 24 bits, exact in float32.
* ``bernoulli_mask(p_keep)``: ``(word >> 8) < ceil(p_keep * 2**24)`` (True = keep), i.e. exactly
  ``uniform < p_keep`` with p_keep taken at 2**-24 resolution.
* ``normal``: Box-Muller on the words of a block, pairs (0, 1) and (2, 3):
  ``r = sqrt(-2 ln u1)`` with ``u1 = ((w0 >> 8) + 1) * 2**-24`` in (0, 1], ``theta = 2 pi (w1 >> 8) 2**-24``,
  elements ``r cos theta`` and ``r sin theta``. Computed in float64 and rounded to float32; log and cos
  are not correctly rounded in every math library, so two devices can disagree in the last float32
  bit on rare elements (about one in 10**8); the uniform and Bernoulli draws are exact everywhere.

This module needs only the standard library and numpy (the Chainer environment uses it). Passing a
``device`` (anything ``torch.device`` accepts) to :func:`uniform`, :func:`normal`,
:func:`bernoulli_mask` or :func:`random_bits` computes the same values with torch tensor operations
on that device instead (:mod:`devicediff.portable._torch_philox`, imported only then).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence, Union

import numpy as np

# Salmon et al. 2011, Philox4x32: round multipliers and Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10

MASK32 = 0xFFFFFFFF
MAX_ELEMENTS = 4 << 32  # the block index is one 32-bit word
_CHUNK_BLOCKS = 1 << 16  # numpy works in chunks that stay in cache

Stream = Union[int, str]
Shape = Union[int, Sequence[int]]


# -- key and counter words ----------------------------------------------------------------------


def stream_id(stream: Stream) -> int:
    """A stream as a 32-bit word: an int in [0, 2**32) as is, a name by the first 4 bytes of its
    BLAKE2b digest (stable across processes, machines and Python versions, unlike ``hash``)."""
    if isinstance(stream, str):
        return int.from_bytes(hashlib.blake2b(stream.encode("utf-8"), digest_size=4).digest(), "little")
    s = int(stream)
    if not 0 <= s <= MASK32:
        raise ValueError(f"stream must be in [0, 2**32) or a name, got {stream!r}")
    return s


def key_words(seed: int) -> tuple[int, int]:
    """The two key words of a seed in [0, 2**64); a negative seed is taken modulo 2**64."""
    s = int(seed) & ((1 << 64) - 1)
    return s & MASK32, s >> 32


def counter_words(counter: int) -> tuple[int, int]:
    c = int(counter)
    if not 0 <= c < (1 << 64):
        raise ValueError(f"counter must be in [0, 2**64), got {counter!r}")
    return c & MASK32, c >> 32


def round_keys(k0: int, k1: int) -> list[tuple[int, int]]:
    """The key of each of the 10 rounds: bumped by the Weyl increments between rounds."""
    keys = []
    for _ in range(ROUNDS):
        keys.append((k0, k1))
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return keys


def uniform_threshold(p_keep: float) -> int:
    """The integer threshold on the top 24 bits: keep iff ``word >> 8 < threshold``."""
    p = float(p_keep)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p_keep must be in [0, 1], got {p_keep!r}")
    return int(math.ceil(p * (1 << 24)))  # p * 2**24 is exact in double


def normalize_shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise ValueError(f"a draw holds at most 2**34 elements, shape {shape} has {n}")
    return shape


# -- numpy implementation ------------------------------------------------------------------------


def philox4x32_np(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on numpy arrays (or scalars) of uint32 counter words; returns 4 uint32 arrays.

    The 32x32 -> 64-bit products are exact in uint64."""
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    for rk0, rk1 in round_keys(k0, k1):
        p0 = c0.astype(np.uint64) * m0
        p1 = c2.astype(np.uint64) * m1
        hi0 = (p0 >> np.uint64(32)).astype(np.uint32)
        hi1 = (p1 >> np.uint64(32)).astype(np.uint32)
        c0, c1, c2, c3 = (
            hi1 ^ c1 ^ np.uint32(rk0),
            p1.astype(np.uint32),
            hi0 ^ c3 ^ np.uint32(rk1),
            p0.astype(np.uint32),
        )
    return c0, c1, c2, c3


def _bits_np(n: int, seed: int, stream: Stream, counter: int) -> np.ndarray:
    k0, k1 = key_words(seed)
    s = stream_id(stream)
    lo, hi = counter_words(counter)
    nblocks = -(-n // 4)
    out = np.empty(nblocks * 4, dtype=np.uint32)
    words = out.reshape(nblocks, 4)
    for b0 in range(0, nblocks, _CHUNK_BLOCKS):
        b1 = min(nblocks, b0 + _CHUNK_BLOCKS)
        blocks = np.arange(b0, b1, dtype=np.uint32)
        r = philox4x32_np(blocks, s, lo, hi, k0, k1)
        for j in range(4):
            words[b0:b1, j] = r[j]
    return out[:n]


# -- public API: numpy when device is None, torch on `device` otherwise ---------------------------


def random_bits(shape: Shape, seed: int, stream: Stream, counter: int, device=None):
    """The raw 32-bit words of a draw: a numpy uint32 array, or (with ``device``) an int64 torch
    tensor holding values in [0, 2**32) (torch has no full uint32 arithmetic)."""
    shape = normalize_shape(shape)
    if device is not None:
        from devicediff.portable import _torch_philox

        return _torch_philox.random_bits(shape, seed, stream, counter, device)
    return _bits_np(math.prod(shape), seed, stream, counter).reshape(shape)


def uniform(shape: Shape, seed: int, stream: Stream, counter: int, device=None):
    """float32 in [0, 1) from the top 24 bits of each word."""
    shape = normalize_shape(shape)
    if device is not None:
        from devicediff.portable import _torch_philox

        return _torch_philox.uniform(shape, seed, stream, counter, device)
    w = _bits_np(math.prod(shape), seed, stream, counter)
    return ((w >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).reshape(shape)


def bernoulli_mask(shape: Shape, p_keep: float, seed: int, stream: Stream, counter: int, device=None):
    """Boolean mask, True with probability ``p_keep`` (at 2**-24 resolution) independently per element.

    The mask a Chainer dropout function would use: ``x * mask / p_keep``."""
    shape = normalize_shape(shape)
    t = uniform_threshold(p_keep)
    if device is not None:
        from devicediff.portable import _torch_philox

        return _torch_philox.bernoulli_mask(shape, t, seed, stream, counter, device)
    w = _bits_np(math.prod(shape), seed, stream, counter)
    return ((w >> np.uint32(8)) < np.uint32(t) if t < (1 << 24) else np.ones(w.shape, bool)).reshape(shape)


def normal(shape: Shape, seed: int, stream: Stream, counter: int, device=None, dtype=None):
    """Standard normal (float32 unless ``dtype``) by Box-Muller on each block's word pairs; see the
    module docstring for the exact recipe and its last-bit caveat across math libraries."""
    shape = normalize_shape(shape)
    if device is not None:
        from devicediff.portable import _torch_philox

        return _torch_philox.normal(shape, seed, stream, counter, device, dtype)
    n = math.prod(shape)
    w = _bits_np(-(-n // 4) * 4, seed, stream, counter).reshape(-1, 2, 2)  # blocks x pairs x (u1, u2)
    top = (w >> np.uint32(8)).astype(np.float64)
    u1 = (top[..., 0] + 1.0) * 2.0**-24
    theta = top[..., 1] * (2.0 * math.pi * 2.0**-24)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1).reshape(-1)[:n]
    return z.astype(dtype or np.float32).reshape(shape)


def dropout_np(x: np.ndarray, p: float, seed: int, stream: Stream, counter: int) -> np.ndarray:
    """Inverted dropout of a numpy array with the portable mask (Chainer's side of the bargain):
    kept elements scaled by ``1 / (1 - p)``, the same elements as the torch :func:`dropout`."""
    if p <= 0:
        return x
    if p >= 1:
        return np.zeros_like(x)
    mask = bernoulli_mask(x.shape, 1.0 - p, seed, stream, counter)
    return np.where(mask, x * x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0))
