"""The portable generator: known answers, numpy == torch bit for bit, and statistical soundness."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from devicediff.portable import philox

torch = pytest.importorskip("torch")
from devicediff.portable import _torch_philox  # noqa: E402

M = 0xFFFFFFFF

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors), the reference
# implementation of Salmon et al. 2011: (counter words, key words) -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers_numpy_and_torch(ctr, key, expected):
    got = philox.philox4x32_np(*ctr, *key)
    assert tuple(int(x) for x in got) == expected
    t = _torch_philox.philox4x32_torch(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(x[0]) for x in t) == expected


def test_torch_multiply_high_is_exact_at_the_extremes():
    # words where a * M is near 2**64 (int64 would overflow with a naive product)
    a = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    for m, mn in ((philox.PHILOX_M0, _torch_philox._M0N), (philox.PHILOX_M1, _torch_philox._M1N)):
        hi, lo = _torch_philox._mulhilo(a.clone(), m, mn)
        for x, h, l in zip(a.tolist(), hi.tolist(), lo.tolist()):
            assert (h, l) == ((x * m) >> 32, (x * m) & M)


SHAPES = [(), (1,), (3,), (4,), (5,), (7, 3), (2, 3, 5, 7), (65537,), (1 << 15 | 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed,stream,counter", [
    (0, 0, 0), (1, 2, 3), (2**64 - 1, M, 2**64 - 1), (123456789012345, "layer.0", 7 << 16 | 1), (-5, "x", 2**40),
])
def test_numpy_and_torch_cpu_give_the_same_bits(shape, seed, stream, counter):
    a = philox.random_bits(shape, seed, stream, counter)
    b = philox.random_bits(shape, seed, stream, counter, device="cpu")
    assert a.dtype == np.uint32 and b.dtype == torch.int64 and tuple(b.shape) == tuple(a.shape)
    np.testing.assert_array_equal(a.astype(np.int64), b.numpy())
    np.testing.assert_array_equal(philox.uniform(shape, seed, stream, counter),
                                  philox.uniform(shape, seed, stream, counter, device="cpu").numpy())
    for p_keep in (0.0, 0.5, 0.8, 1.0 - 1e-9, 1.0):
        np.testing.assert_array_equal(philox.bernoulli_mask(shape, p_keep, seed, stream, counter),
                                      philox.bernoulli_mask(shape, p_keep, seed, stream, counter, device="cpu").numpy())


def test_prefix_property_and_chunk_boundaries():
    # element i depends on i alone, not on the draw's size (and chunked generation leaves no seams)
    n = 3 * (1 << 16) + 5
    full = philox.random_bits(n, 9, 9, 9)
    np.testing.assert_array_equal(philox.random_bits(1001, 9, 9, 9), full[:1001])
    np.testing.assert_array_equal(philox.random_bits(n, 9, 9, 9, device="cpu").numpy(), full.astype(np.int64))


def test_uniform_is_top_24_bits_in_unit_interval():
    w = philox.random_bits(10_000, 1, 2, 3)
    u = philox.uniform(10_000, 1, 2, 3)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(u, (w >> 8).astype(np.float64) / 2**24)


def test_bernoulli_threshold_is_exactly_uniform_less_than_p():
    u = philox.uniform(100_000, 4, 4, 4)
    for p in (0.1, 0.25, 1 / 3, 0.9):
        np.testing.assert_array_equal(philox.bernoulli_mask(100_000, p, 4, 4, 4), u.astype(np.float64) < p)


def test_streams_names_are_stable():
    # BLAKE2b-based: fixed across processes and versions (a change here changes every mask)
    assert philox.stream_id("dropout:net.2") == philox.stream_id("dropout:net.2")
    assert philox.stream_id("a") != philox.stream_id("b")
    assert philox.stream_id(17) == 17
    with pytest.raises(ValueError):
        philox.stream_id(2**32)


def test_normal_numpy_vs_torch_within_one_ulp_and_moments():
    z = philox.normal((1 << 20) + 3, 11, "n", 0)
    zt = philox.normal((1 << 20) + 3, 11, "n", 0, device="cpu").numpy()
    assert z.dtype == np.float32
    ulp = np.spacing(np.abs(z).astype(np.float32))
    assert np.all(np.abs(z - zt) <= ulp)
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 5 * math.sqrt(0.5 / z.size)
    # Kolmogorov-Smirnov against N(0, 1): scipy.stats.kstest(z, "norm")
    assert stats.kstest(z[:200_000].astype(np.float64), "norm").pvalue > 1e-4


# -- statistics: ~1M elements on the CPU -------------------------------------------------------

N = 1 << 20
SIGMA_R = 1 / math.sqrt(N)  # sd of a sample correlation of independent series


def _corr(a, b) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


@pytest.mark.parametrize("p_keep", [0.5, 0.8, 0.9, 0.1])
def test_keep_rate_within_binomial_bounds(p_keep):
    m = philox.bernoulli_mask(N, p_keep, 2024, "dropout:fc", 5 << 16)
    sd = math.sqrt(N * p_keep * (1 - p_keep))
    assert abs(m.sum() - N * p_keep) < 5 * sd
    # scipy.stats.binomtest(k, n, p): the two-sided p-value
    assert stats.binomtest(int(m.sum()), N, p_keep).pvalue > 1e-5


def test_independence_of_neighbours_lanes_steps_and_layers():
    u = philox.uniform(N, 7, "dropout:a", 3 << 16)
    assert abs(_corr(u[:-1], u[1:])) < 5 * SIGMA_R  # adjacent elements (mostly in one Philox block)
    assert abs(_corr(u[:-4], u[4:])) < 5 * SIGMA_R  # same lane, consecutive blocks
    blocks = u.reshape(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(blocks[:, i], blocks[:, j])) < 5 * 2 * SIGMA_R
    nxt = philox.uniform(N, 7, "dropout:a", 4 << 16)  # the next training step
    call = philox.uniform(N, 7, "dropout:a", 3 << 16 | 1)  # the same layer's second call this step
    other = philox.uniform(N, 7, "dropout:b", 3 << 16)  # another layer
    seed2 = philox.uniform(N, 8, "dropout:a", 3 << 16)  # another seed
    for v in (nxt, call, other, seed2):
        assert abs(_corr(u, v)) < 5 * SIGMA_R
    m1 = philox.bernoulli_mask(N, 0.8, 7, "dropout:a", 3 << 16)
    m2 = philox.bernoulli_mask(N, 0.8, 7, "dropout:a", 4 << 16)
    # both kept: P = 0.64 if independent
    assert abs((m1 & m2).mean() - 0.64) < 5 * math.sqrt(0.64 * 0.36 / N)


def test_chi_square_on_bytes_and_on_uniform_bins():
    w = philox.random_bits(N, 99, 1, 0)
    by = w.view(np.uint8)
    counts = np.bincount(by, minlength=256)
    # scipy.stats.chisquare(counts): uniform expected frequencies, 255 degrees of freedom
    assert stats.chisquare(counts).pvalue > 1e-5
    # serial pairs of bytes (65536 cells) catch byte-to-byte dependence
    pairs = by[0::2].astype(np.int64) * 256 + by[1::2]
    assert stats.chisquare(np.bincount(pairs, minlength=65536)).pvalue > 1e-5
    u = philox.uniform(N, 99, 2, 0)
    assert stats.chisquare(np.bincount((u * 1000).astype(np.int64), minlength=1000)).pvalue > 1e-5


def test_every_bit_is_fair():
    w = philox.random_bits(N, 5, 5, 5)
    bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    sd = math.sqrt(N * 0.25)
    assert np.all(np.abs(bits.sum(axis=0) - N / 2) < 5 * sd)


def test_numpy_dropout_matches_mask():
    x = np.arange(1, 1001, dtype=np.float32).reshape(10, 100)
    y = philox.dropout_np(x, 0.3, 1, "l", 0)
    m = philox.bernoulli_mask(x.shape, 0.7, 1, "l", 0)
    np.testing.assert_array_equal(y != 0, m)
    np.testing.assert_array_equal(y[m], x[m] * np.float32(1 / 0.7))


def test_bad_arguments():
    with pytest.raises(ValueError):
        philox.bernoulli_mask(3, 1.5, 0, 0, 0)
    with pytest.raises(ValueError):
        philox.uniform(3, 0, 0, -1)
    with pytest.raises(ValueError):
        philox.uniform((1 << 35,), 0, 0, 0)
