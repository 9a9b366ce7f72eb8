"""Lockstep's host copies (docs/diverge.md, "Cost"): a GPU side's recorded tensors go to the host as
one flat buffer per dtype instead of one copy each; the values, shapes and dtypes are exactly those
of copying each tensor alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devicediff.frameworks.torch import lockstep as ls


def _tensors(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, generator=g), torch.tensor(2.5), torch.empty(0), torch.randn(2, 1, 3, generator=g),
          torch.arange(5), torch.tensor([True, False]), torch.randn(7, generator=g).to(torch.bfloat16),
          torch.randn(2, 2, generator=g).double()]
    return [t.to(device) for t in ts]


def _each_alone(ts: list[torch.Tensor]) -> list[np.ndarray]:
    return [(t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).cpu().numpy() for t in ts]


def test_one_flat_copy_splits_back_into_each_tensor_exactly():
    ts = [t for t in _tensors("cpu") if t.dtype == torch.float32]
    for got, want in zip(ls.flat_to_host(ts), _each_alone(ts)):
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)


def test_cpu_tensors_are_converted_as_they_are():
    ts = _tensors("cpu")
    got = ls.host_copies(ts)
    for g, w in zip(got, _each_alone(ts)):
        assert g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk", [ls.FLAT_CHUNK_BYTES, 16])  # one copy per dtype; a copy every tensor or two
def test_device_tensors_come_back_exactly_in_flat_copies(monkeypatch, chunk):
    monkeypatch.setattr(ls, "FLAT_CHUNK_BYTES", chunk)
    ts = _tensors("cuda")
    got = ls.host_copies(ts)
    for g, w in zip(got, _each_alone(ts)):
        assert g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w)
