"""The MNIST autoencoder: the original study's control network.

A fully connected autoencoder (784 → hidden → code → hidden → 784, ReLU, sigmoid
output), trained with pixel MSE and Adam on the real MNIST digits. The original
study found no CPU/GPU difference here; its training loop calls backward right
after each forward, so it never reuses a buffer before backward (DESIGN.md §1).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from devicediff.data.mnist import load_mnist
from devicediff.errors import ParamError
from devicediff.spec import Batch, Workload, epoch_order


FAULTS = ("none", "drop_bias")  # planted faults (per-config params) that `devicediff diverge` must catch


class AutoEncoder(nn.Module):
    """``dropout > 0`` adds an ``nn.Dropout`` after each hidden layer's ReLU (``drops.0``, ...):
    a model that draws random numbers during training (docs/randomness.md). With the default 0
    no dropout module exists, so the model and its bits are what they were without the option."""

    def __init__(self, sizes: list[int], fault: str = "none", dropout: float = 0.0):
        super().__init__()
        dims = [784, *sizes, *reversed(sizes[:-1]), 784]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fault = fault
        if dropout > 0:
            self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in self.layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 784)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # Planted fault for testing `devicediff diverge`: layers.1 silently drops its bias.
            h = torch.nn.functional.linear(h, layer.weight) if self.fault == "drop_bias" and i == 1 else layer(h)
            h = torch.sigmoid(h) if i == last else torch.relu(h)
            if i < last and hasattr(self, "drops"):
                h = self.drops[i](h)
        return h


def init_linear(model: nn.Module, seed: int) -> None:
    """He-uniform weights, zero biases, from a private CPU generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / m.in_features)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                m.bias.zero_()


class Autoencoder(Workload):
    name = "autoencoder"
    primary_metrics = ("eval_loss",)

    def __init__(
        self,
        *,
        sizes: list[int] | tuple[int, ...] = (256, 64),
        batch_size: int = 100,
        lr: float = 1e-3,
        train_size: int | None = None,
        eval_size: int | None = None,
        eval_split: str = "valid",
        mnist_root: str | None = None,
        fault: str = "none",
        dropout: float = 0.0,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ParamError(f"autoencoder.dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        if fault not in FAULTS:
            raise ParamError(f"autoencoder.fault {fault!r} unknown; use one of {list(FAULTS)}")
        self.fault = fault
        if batch_size < 1:
            raise ParamError(f"autoencoder.batch_size must be >= 1, got {batch_size}")
        if not lr > 0:
            raise ParamError(f"autoencoder.lr must be > 0, got {lr}")
        if not sizes or any(s < 1 for s in sizes):
            raise ParamError(f"autoencoder.sizes must be a non-empty list of layer widths >= 1, got {list(sizes)}")
        self.sizes, self.batch_size, self.lr = list(sizes), int(batch_size), float(lr)
        x, _ = load_mnist("train", mnist_root)
        xe, _ = load_mnist(eval_split, mnist_root)
        self.train_x = torch.from_numpy(np.ascontiguousarray(x[:train_size]))
        self.eval_x = torch.from_numpy(np.ascontiguousarray(xe[:eval_size]))
        if len(self.train_x) < self.batch_size:
            raise ParamError(f"autoencoder: train_size {len(self.train_x)} is smaller than batch_size {batch_size}")
        self.eval_split = eval_split

    def describe(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "batch_size": self.batch_size, "lr": self.lr,
                "train_size": len(self.train_x), "eval_split": self.eval_split, "eval_size": len(self.eval_x),
                "fault": self.fault, "dropout": self.dropout}

    def build_model(self, init_seed: int) -> nn.Module:
        model = AutoEncoder(self.sizes, self.fault, self.dropout)
        init_linear(model, init_seed)
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size  # drop the last partial batch

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        order = epoch_order(data_seed, epoch, len(self.train_x))
        order = torch.from_numpy(order)
        for i in range(self.steps_per_epoch()):
            yield Batch(self.train_x[order[i * self.batch_size : (i + 1) * self.batch_size]])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.data
        return torch.mean((model(x) - x.reshape(x.shape[0], 784)) ** 2)

    def evaluate(self, model: nn.Module, device) -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(self.eval_x), 1000):
            x = self.eval_x[i : i + 1000].to(device)
            total += torch.sum((model(x) - x.reshape(x.shape[0], 784)) ** 2).item()
            n += x.shape[0] * 784
        return {"eval_loss": total / n}


