"""A tiny synthetic workload for the executor, store and crash-safety tests.

No data files, a few milliseconds a step, and knobs to make a run slow, fail or
draw random numbers during training:

- ``optimizer``: ``adam`` (default) or ``sgd`` (diverges to NaN with a huge ``lr``);
- ``step_delay``: seconds slept in every training step (does not change the bits);
- ``fail_at_step``: raise at that (1-based) step of this process;
- ``noisy``: add Gaussian noise to the inputs from torch's global RNG, so a
  resumed run matches an uninterrupted one only if the RNG state is restored;
- ``leak``: at the end of the run (``artifacts``) set torch's default dtype to float64 and
  leave it so: a later run in the same process builds a float64 model unless the warm
  worker's reset puts the default back (tests/executors/test_warm.py);
- ``DEVICEDIFF_TEST_TRACE`` (environment): a file to which every training step
  appends this process's pid, so a test can count the steps each attempt ran.

Studies name it as ``/abs/path/to/synthetic.py:make``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from devicediff import Batch, Workload, epoch_order


class Synthetic(Workload):
    name = "synthetic"

    def __init__(self, *, n: int = 640, dim: int = 16, hidden: int = 32, batch_size: int = 32, lr: float = 0.05,
                 optimizer: str = "adam", step_delay: float = 0.0, fail_at_step: int | None = None,
                 noisy: bool = False, leak: bool = False):
        rng = np.random.default_rng(7)
        w = rng.standard_normal(dim).astype(np.float32)
        x = rng.standard_normal((n, dim)).astype(np.float32)
        y = np.tanh(x @ w) + 0.1 * rng.standard_normal(n).astype(np.float32)
        split = int(0.75 * n)
        self.x, self.y = torch.from_numpy(x[:split]), torch.from_numpy(y[:split].astype(np.float32))
        self.xe, self.ye = torch.from_numpy(x[split:]), torch.from_numpy(y[split:].astype(np.float32))
        self.dim, self.hidden, self.batch_size, self.lr = dim, hidden, batch_size, lr
        self.optimizer, self.step_delay, self.fail_at_step, self.noisy = optimizer, step_delay, fail_at_step, noisy
        self.leak = leak
        self.calls = 0
        self.trace = os.environ.get("DEVICEDIFF_TEST_TRACE")

    def build_model(self, init_seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(init_seed)
        model = nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model

    def make_optimizer(self, model):
        opt = torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam
        return opt(model.parameters(), lr=self.lr)

    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int):
        order = torch.from_numpy(epoch_order(data_seed, epoch, len(self.x)))
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch((self.x[idx], self.y[idx]))

    def loss(self, model, batch):
        self.calls += 1
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(f"{os.getpid()}\n")
        if self.fail_at_step is not None and self.calls >= self.fail_at_step:
            raise RuntimeError(f"planted failure at step {self.calls}")
        if self.step_delay:
            time.sleep(self.step_delay)
        x, y = batch.data
        if self.noisy:
            x = x + 0.01 * torch.randn(x.shape).to(x.device)
        return torch.mean((model(x).squeeze(-1) - y) ** 2)

    def artifacts(self, model, device, outdir):
        if self.leak:
            torch.set_default_dtype(torch.float64)  # left set on purpose
        return {}

    def evaluate(self, model, device):
        pred = model(self.xe.to(device)).squeeze(-1)
        return {"eval_loss": torch.mean((pred - self.ye.to(device)) ** 2).item()}


def make(**params) -> Synthetic:
    return Synthetic(**params)


def study_toml(name: str = "syn", *, seeds: int = 2, threads: tuple[int, ...] = (1, 2), epochs: int = 1,
               steps: int | None = None, params: dict | None = None, budget: dict | None = None,
               configs: list[dict] | None = None) -> str:
    """A study of this workload; ``configs`` overrides the default CPU thread configs."""
    lines = [f'name = "{name}"', "[workload]", f'name = "{Path(__file__).resolve()}:make"']
    for k, v in (params or {}).items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["[seeds]", f"count = {seeds}", "[budget]"]
    b = {"steps": steps} if steps else {"epochs": epochs}
    b.update({"metric_every": 5, **(budget or {})})
    lines += [f"{k} = {v}" for k, v in b.items()]
    cfgs = configs or [{"name": f"cpu-{t}t", "threads": t} for t in threads]
    for i, c in enumerate(cfgs):
        lines.append("[[configs]]")
        for k, v in c.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}")
        if i == 0:
            lines.append("reference = true")
    return "\n".join(lines) + "\n"


def _inline(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"

