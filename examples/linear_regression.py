"""A user's own workload, plugged into devicediff by name.

Noisy linear regression on synthetic data, an MLP with one hidden layer, SGD.
Every rule of ``devicediff.spec`` is followed: weights from the init seed on
CPU, batches from a CPU generator seeded by (data seed, epoch). Use it as a
template for your own model. The study file beside it names it as
``linear_regression.py:make``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from devicediff import Batch, Workload, epoch_order


class LinearRegression(Workload):
    name = "linear-regression"

    def __init__(self, *, n: int = 2048, dim: int = 32, hidden: int = 64, batch_size: int = 64, lr: float = 0.05,
                 noise: float = 0.1):
        rng = np.random.default_rng(12345)  # the task itself is fixed; seeds vary only init and order
        self.w_true = rng.standard_normal(dim).astype(np.float32)
        x = rng.standard_normal((n, dim)).astype(np.float32)
        y = x @ self.w_true + noise * rng.standard_normal(n).astype(np.float32)
        split = int(0.8 * n)
        self.x, self.y = torch.from_numpy(x[:split]), torch.from_numpy(y[:split])
        self.xe, self.ye = torch.from_numpy(x[split:]), torch.from_numpy(y[split:])
        self.dim, self.hidden, self.batch_size, self.lr = dim, hidden, batch_size, lr

    def build_model(self, init_seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(init_seed)
        model = nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return model

    def make_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.lr)

    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int):
        order = torch.from_numpy(epoch_order(data_seed, epoch, len(self.x)))
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch((self.x[idx], self.y[idx]))

    def loss(self, model, batch):
        x, y = batch.data
        return torch.mean((model(x).squeeze(-1) - y) ** 2)

    def evaluate(self, model, device):
        pred = model(self.xe.to(device)).squeeze(-1)
        return {"eval_loss": torch.mean((pred - self.ye.to(device)) ** 2).item()}


def make(**params) -> LinearRegression:
    return LinearRegression(**params)
