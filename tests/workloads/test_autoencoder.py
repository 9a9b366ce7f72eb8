"""The MNIST autoencoder, directly: its parameters, batches and evaluation."""

from __future__ import annotations

import pytest
import torch

from devicediff.errors import ParamError
from devicediff.workloads import make_workload

SMALL = dict(sizes=[16, 4], batch_size=50, train_size=200, eval_size=100)


def test_batches_are_the_epoch_order_and_the_model_is_the_seed():
    wl = make_workload("autoencoder", SMALL)
    assert wl.steps_per_epoch() == 4 and wl.primary_metrics == ("eval_loss",)
    a = [b.data for b in wl.train_batches(3, 0)]
    b = [b.data for b in wl.train_batches(3, 0)]
    c = [b.data for b in wl.train_batches(3, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    m1, m2 = wl.build_model(5), wl.build_model(5)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(next(wl.build_model(6).parameters()), next(m1.parameters()))


def test_loss_and_evaluation():
    wl = make_workload("autoencoder", SMALL)
    model = wl.build_model(0)
    batch = next(iter(wl.train_batches(0, 0)))
    loss = wl.loss(model, batch)
    assert loss.ndim == 0 and 0 < loss.item() < 1
    with torch.no_grad():
        ev = wl.evaluate(model, torch.device("cpu"))
    assert set(ev) == {"eval_loss"} and 0 < ev["eval_loss"] < 1
    assert wl.describe()["train_size"] == 200


@pytest.mark.parametrize("params,needle", [
    ({"lr": 0.0}, "lr must be > 0"), ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"sizes": []}, "sizes must be a non-empty list"), ({"fault": "x"}, "fault 'x' unknown"),
    ({"train_size": 10}, "smaller than batch_size"),
])
def test_out_of_range_parameters(params, needle):
    with pytest.raises(ParamError, match=needle):
        make_workload("autoencoder", {**SMALL, **params})
