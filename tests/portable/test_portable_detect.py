"""Detection of draws on torch's generators: generator snapshots and the random-op watch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from devicediff.portable.detect import RandomOpWatch, drew, rng_snapshot  # noqa: E402
from devicediff.portable.torch import PortableRandom, make_portable  # noqa: E402


def _model(dropout: bool):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(16, 1))
    return nn.Sequential(*layers)


def _step(model):
    x = torch.ones(4, 8)
    model(x).sum().backward()


def test_snapshot_sees_the_cpu_generator_advance():
    before = rng_snapshot()
    assert "cpu" in before
    assert drew(before, rng_snapshot()) == []
    torch.rand(3)
    assert drew(before, rng_snapshot()) == ["cpu"]
    before = rng_snapshot(["cpu"])
    _step(_model(False).train())  # _model reseeds: reset the snapshot after building
    assert drew(before, rng_snapshot(["cpu"])) == ["cpu"]  # manual_seed inside _model moved it
    m = _model(True).train()
    before = rng_snapshot(["cpu"])
    _step(m)
    assert drew(before, rng_snapshot(["cpu"])) == ["cpu"]
    m = _model(False).train()
    before = rng_snapshot(["cpu"])
    _step(m)
    assert drew(before, rng_snapshot(["cpu"])) == []


def test_watch_names_the_dropout_module():
    m = _model(True).train()
    with RandomOpWatch(m) as w:
        _step(m)
    assert w.any
    assert w.modules == [("2", "Dropout")]
    assert all(d.device == "cpu" and d.module == "2" for d in w.draws)
    assert "module 2 (Dropout)" in w.summary()


def test_watch_sees_nothing_without_random_ops_or_in_eval():
    m = _model(False).train()
    with RandomOpWatch(m) as w:
        _step(m)
    assert not w.any and w.modules == [] and w.summary() == ""
    m = _model(True).eval()
    with RandomOpWatch(m) as w:
        _step(m)
    assert not w.any


def test_portable_dropout_draws_nothing_from_torch():
    m = _model(True).train()
    ctx = PortableRandom(1)
    make_portable(m, ctx)
    before = rng_snapshot()
    with RandomOpWatch(m) as w:
        _step(m)
    assert not w.any
    assert drew(before, rng_snapshot()) == []


def test_watch_without_model_and_private_generators():
    g = torch.Generator().manual_seed(0)
    with RandomOpWatch() as w:
        torch.randperm(10)
        torch.rand(3, generator=g)
        torch.zeros(3).add_(1)
    ops = {(d.op, d.module, d.private_generator) for d in w.draws}
    assert ops == {("randperm", None, False), ("rand", None, True)}


def test_watch_in_nested_modules_and_hooks_removed():
    class Inner(nn.Module):
        def forward(self, x):
            return x * torch.rand_like(x)

    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(Inner()))
    with RandomOpWatch(m) as w:
        m(torch.ones(1, 2))
    assert w.modules == [("1.0", "Inner")]
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
