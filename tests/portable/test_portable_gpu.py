"""On a CUDA GPU: the portable draws are bitwise identical to the CPU's (Triton and eager paths)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from devicediff.portable import _torch_philox, philox  # noqa: E402
from devicediff.portable.detect import RandomOpWatch, drew, rng_snapshot  # noqa: E402
from devicediff.portable.torch import Dropout, Dropout2d, Key, PortableRandom, dropout, make_portable  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(1,), (3,), (4,), (5,), (7, 3), (2, 3, 5, 7), (4097,), (1000, 1001), ((1 << 24) + 3,)]
KEYS = [(0, 0, 0), (2**64 - 1, 0xFFFFFFFF, 2**64 - 1), (123456789012345, "dropout:net.2", 7 << 16 | 1)]


def test_triton_path_is_available():
    from devicediff.portable import _triton_philox

    assert _triton_philox.available()


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_and_cuda_bits_masks_uniforms_identical(shape, backend):
    for seed, stream, counter in KEYS:
        cpu = _torch_philox.random_bits(shape, seed, stream, counter, "cpu")
        gpu = _torch_philox.random_bits(shape, seed, stream, counter, "cuda", backend=backend)
        assert torch.equal(cpu, gpu.cpu())
        for t in (0, 1 << 23, 13421773, (1 << 24) - 1):
            assert torch.equal(_torch_philox.bernoulli_mask(shape, t, seed, stream, counter, "cpu"),
                               _torch_philox.bernoulli_mask(shape, t, seed, stream, counter, "cuda", backend).cpu())
        assert torch.equal(_torch_philox.uniform(shape, seed, stream, counter, "cpu"),
                           _torch_philox.uniform(shape, seed, stream, counter, "cuda", backend).cpu())
    np.testing.assert_array_equal(philox.random_bits(shape, 1, 2, 3).astype(np.int64),
                                  philox.random_bits(shape, 1, 2, 3, device="cuda").cpu().numpy())


def test_normal_within_one_ulp():
    z = philox.normal((1 << 20) + 1, 3, "n", 5, device="cpu")
    zg = philox.normal((1 << 20) + 1, 3, "n", 5, device="cuda").cpu()
    ulp = torch.from_numpy(np.spacing(z.abs().numpy()))
    assert torch.all((z - zg).abs() <= ulp)
    assert (z != zg).float().mean() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(5,), (64, 33), (8, 3, 17, 19), (1 << 22,)])
def test_dropout_same_output_and_gradient_on_cpu_and_cuda(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    key = Key(42, "dropout:layer", 3 << 16)
    outs, grads = [], []
    for dev in ("cpu", "cuda"):
        xd = x.detach().to(dev).requires_grad_(True)
        y = dropout(xd, 0.3, True, key)
        y.backward(grad.to(dev))
        outs.append(y.detach().cpu())
        grads.append(xd.grad.cpu())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    # and the eager CUDA path agrees too
    eager, _ = _torch_philox.dropout_apply(x.cuda(), 0.3, *key, backend="eager")
    assert torch.equal(eager.cpu(), outs[0])


def test_portable_model_same_on_cpu_and_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2), nn.Linear(64, 8 * 4 * 4),
                          nn.Unflatten(1, (8, 4, 4)), nn.Dropout2d(0.5))
    x = torch.randn(16, 32)
    res = []
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)  # same weights
        ctx = PortableRandom(7)
        make_portable(m, ctx)
        before = rng_snapshot(["cpu", "cuda"])
        with RandomOpWatch(m) as w:
            out = m(x.to(dev))
        assert not w.any and drew(before, rng_snapshot(["cpu", "cuda"])) == []
        zeros = (out == 0).cpu()
        res.append(zeros)
        assert isinstance(m[1], Dropout) and isinstance(m[4], Dropout2d)
    assert torch.equal(res[0], res[1])


def test_device_dropout_is_detected_on_cuda():
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).cuda().train()
    before = rng_snapshot()
    with RandomOpWatch(m) as w:
        m(torch.ones(4, 8, device="cuda")).sum().backward()
    assert "cuda:0" in drew(before, rng_snapshot())
    assert w.modules == [("1", "Dropout")] and w.devices == ["cuda:0"]
