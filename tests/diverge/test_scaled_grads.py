"""The rounding model under a gradient scaler (fp16's GradScaler): the output gradients the
model holds during backward carry the loss scale, the recorded gradients do not. Found on an
H200 (fp16-autocast pairs came out `suspect`, own error ~20-30x the bound, because the replay
used the scaled output gradients); here on the CPU with a CPU GradScaler and bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devicediff.frameworks.torch.lockstep import LocalModel, Recorder, U, run_step
from devicediff.spec import Batch


class _AE:
    def loss(self, model, batch):
        x = batch.data
        return ((model(x) - x) ** 2).mean()


def _model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 32))


@pytest.mark.parametrize("init_scale", [1.0, 2.0**16])
def test_scaled_backward_is_inside_its_own_bound(init_scale):
    model = _model(0)
    model64 = _model(0).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    local = LocalModel(model64, lambda mod: U["fp32"] if mod is None else U["bf16"])
    rec = Recorder(model, local)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x = torch.rand(64, 32, generator=torch.Generator().manual_seed(1))
    run_step(workload=_AE(), forward_model=model, model=model, optimizer=opt, batch=Batch(x),
             device=torch.device("cpu"), seed=0, lr=None, recorder=rec, autocast=torch.bfloat16,
             scaler=scaler, local=local)
    grads = {k: v for k, v in local.arrays().items() if k.startswith("local/grad/")}
    assert len(grads) == 4  # both layers' weight and bias
    own = {k: v[0] / v[1] for k, v in grads.items()}
    assert all(np.isfinite(r) and r < 1 for r in own.values()), own
