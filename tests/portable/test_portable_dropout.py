"""Portable dropout layers: scaling, eval mode, gradients, make_portable, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from devicediff.portable import philox  # noqa: E402
from devicediff.portable.torch import (  # noqa: E402
    Dropout, Dropout1d, Dropout2d, Dropout3d, Key, PortableRandom, attach, contexts, dropout, make_portable,
)


def test_dropout_keeps_the_portable_mask_and_scales():
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    key = Key(7, "dropout:fc", 3 << 16)
    y = dropout(x, 0.25, True, key)
    m = torch.from_numpy(philox.bernoulli_mask(x.shape, 0.75, *key))
    assert torch.equal(y != 0, m & (x != 0))
    scale = torch.tensor(1 / 0.75, dtype=torch.float32)
    assert torch.equal(y[m], x[m] * scale)
    assert torch.all(y[~m] == 0)
    # the same as the numpy path (a Chainer dropout uses it)
    np.testing.assert_array_equal(y.numpy(), philox.dropout_np(x.numpy(), 0.25, *key))


def test_dropout_edge_probabilities_and_eval():
    x = torch.randn(10, 10)
    key = Key(0, 0, 0)
    assert dropout(x, 0.0, True, key) is x
    assert dropout(x, 0.5, False, key) is x
    assert torch.all(dropout(x, 1.0, True, key) == 0)
    with pytest.raises(ValueError):
        dropout(x, 1.5, True, key)
    with pytest.raises(ValueError):
        dropout(x, 0.5, True, None)
    d = Dropout(0.5, name="d", ctx=PortableRandom(1)).eval()
    assert d(x) is x


def test_gradient_mask_equals_forward_mask():
    x = torch.randn(32, 50, requires_grad=True)
    ctx = PortableRandom(3)
    d = Dropout(0.4, name="d", ctx=ctx)
    y = d(x)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    scale = torch.tensor(1 / 0.6, dtype=torch.float32)
    assert torch.equal(x.grad != 0, kept & (g != 0))
    assert torch.equal(x.grad[kept], g[kept] * scale)


def test_non_contiguous_input_uses_logical_order():
    x = torch.randn(40, 30).t()
    key = Key(1, 2, 3)
    assert torch.equal(dropout(x, 0.5, True, key), dropout(x.contiguous(), 0.5, True, key))


def test_keys_per_call_per_step_and_per_layer():
    ctx = PortableRandom(11)
    a, b = Dropout(0.5, name="a", ctx=ctx), Dropout(0.5, name="b", ctx=ctx)
    x = torch.ones(4096)
    a1, a2, b1 = a(x), a(x), b(x)
    assert not torch.equal(a1, a2)  # second call of the layer in one step: fresh mask
    assert not torch.equal(a1, b1)
    ctx.advance()
    assert not torch.equal(a(x), a1)
    # the keys spelled out
    c = PortableRandom(11)
    assert c.key("a") == Key(11, "dropout:a", 0)
    assert c.key("a") == Key(11, "dropout:a", 1)
    c.advance()
    assert c.key("a") == Key(11, "dropout:a", 1 << 16)


def test_state_dict_resumes_the_same_masks():
    x = torch.ones(1000)
    ctx = PortableRandom(5)
    d = Dropout(0.3, name="d", ctx=ctx)
    masks, saved = [], None
    for step in range(4):
        if step == 2:
            saved = copy.deepcopy(ctx.state_dict())
        masks.append(d(x))
        ctx.advance()
    resumed = PortableRandom(0)
    resumed.load_state_dict(saved)
    d2 = Dropout(0.3, name="d", ctx=resumed)
    for step in (2, 3):
        assert torch.equal(d2(x), masks[step])
        resumed.advance()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x)))


def _nested():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Dropout(0.1), nn.ModuleList([Block(), Block()]),
        nn.ModuleDict({"c": nn.Conv1d(16, 16, 1), "d1": nn.Dropout1d(0.2)}),
        nn.Dropout2d(0.3), nn.Dropout3d(0.3), nn.AlphaDropout(0.1), nn.Linear(16, 1),
    )


def test_make_portable_swaps_nested_dropouts_and_reports():
    model = _nested()
    ctx = PortableRandom(1)
    report = make_portable(model, ctx)
    assert sorted(report.swapped) == sorted([
        ("1", "Dropout"), ("2.0.drop", "Dropout"), ("2.1.drop", "Dropout"), ("3.d1", "Dropout1d"),
        ("4", "Dropout2d"), ("5", "Dropout3d"),
    ])
    assert report.not_swapped == [("6", "AlphaDropout", "no portable version")]
    assert isinstance(model[2][0].drop, Dropout) and model[2][0].drop.portable_name == "2.0.drop"
    assert isinstance(model[3]["d1"], Dropout1d) and isinstance(model[4], Dropout2d)
    assert isinstance(model[5], Dropout3d)
    assert model[1].p == 0.1 and contexts(model) == [ctx]
    # again: nothing left to swap, the portable layers are attached to the new context
    ctx2 = PortableRandom(2)
    report2 = make_portable(model, ctx2)
    assert report2.swapped == [] and len(report2.attached) == 6 and contexts(model) == [ctx2]
    assert attach(model, ctx) == 6


def test_make_portable_model_trains_without_touching_torch_generators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), Block(), nn.Linear(16, 1))
    ctx = PortableRandom(9)
    make_portable(model, ctx)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x.sum(1, keepdim=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = torch.get_rng_state()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        ctx.advance()
        losses.append(loss.item())
    assert torch.equal(state, torch.get_rng_state())
    assert ctx.step == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_feature_dropout_drops_whole_channels():
    ctx = PortableRandom(4)
    for cls, shape, cdims in ((Dropout1d, (8, 6, 10), 2), (Dropout1d, (6, 10), 1), (Dropout2d, (8, 6, 5, 5), 2),
                              (Dropout2d, (8, 6, 10), 2), (Dropout3d, (2, 6, 3, 4, 5), 2), (Dropout3d, (6, 3, 4, 5), 1)):
        d = cls(0.5, name="f", ctx=ctx)
        y = d(torch.ones(shape))
        per_channel = y.reshape(*shape[:cdims], -1)
        assert torch.all((per_channel == 0).all(-1) | (per_channel == 2).all(-1)), cls
        assert (per_channel == 0).all(-1).any() and (per_channel == 2).all(-1).any()


def test_missing_context_or_name_is_a_clear_error():
    with pytest.raises(RuntimeError, match="make_portable"):
        Dropout(0.5, name="x")(torch.ones(3))
    with pytest.raises(RuntimeError, match="name"):
        Dropout(0.5, ctx=PortableRandom(0))(torch.ones(3))
    ctx = PortableRandom(0)
    with ctx:
        y = Dropout(0.5, name="x")(torch.ones(100))
    assert torch.equal(y, Dropout(0.5, name="x", ctx=PortableRandom(0))(torch.ones(100)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 64)

    def forward(self, x):
        h = F.dropout(self.fc(x), 0.5, self.training)
        return torch.dropout(h, 0.5, self.training) + F.dropout2d(h[:, :, None, None], 0.5, self.training)[:, :, 0, 0]


def test_functional_dropout_rerouted_when_asked():
    model = Functional()
    ctx = PortableRandom(2)
    report = make_portable(model, ctx, functional=True)
    assert report.functional
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    y1 = model(x)
    assert torch.equal(state, torch.get_rng_state())  # no draw on torch's generator
    assert set(ctx.state_dict()["calls"]) == {"dropout:#dropout", "dropout:#dropout2d"}
    again = PortableRandom(2)
    model2 = Functional()
    model2.load_state_dict(model.state_dict())
    make_portable(model2, again, functional=True)
    assert torch.equal(model2(x), y1)
    model.eval()
    assert torch.equal(model(x), model2.eval()(x))
