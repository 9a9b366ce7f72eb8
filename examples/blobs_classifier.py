"""A user's own classifier, with the files that let devicediff compare its predictions.

Five Gaussian blobs in 16 dimensions, overlapping enough that a network gets some inputs wrong;
an MLP with dropout, Adam. Beside the metrics, ``artifacts`` saves the held-out predicted
classes (``predictions.npy``, one class per held-out input, in the same order in every run) and
the true labels (``labels.npy``). With those, ``devicediff run``/``status`` and the report say
whether a config changes *which* inputs the network gets wrong more than a change of seed does
(churn against the seed floor), beside the accuracy verdict. The study file beside it,
``blobs_classifier.toml``, names it as ``blobs_classifier.py:make``, and sets ``portable_random``
so the dropout masks are the same on every device.

Measured (6 seeds): on the 2-core CPU VM, 2 threads gave the same bits as 1, bfloat16 autocast
flipped 0.57% of held-out predictions against 10.6% for a change of seed. On an NVIDIA H200 with
``cuda`` and ``cuda-tf32`` configs added (2026-12-03): ``cuda`` gave the CPU's bits in every seed
and ``diverge --a cpu-1t --b cuda`` says ``rounding``; TF32 flipped 0.56%. With ``nn.Dropout``'s own
masks instead, each GPU run drew other masks than its CPU twin (devicediff warned so) and flipped
7.3% of predictions, most of a seed change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from devicediff import Batch, Workload, epoch_order


class BlobsClassifier(Workload):
    name = "blobs-classifier"

    def __init__(self, *, n: int = 3000, dim: int = 16, classes: int = 5, spread: float = 2.2, hidden: int = 64,
                 dropout: float = 0.1, batch_size: int = 50, lr: float = 0.003):
        rng = np.random.default_rng(2024)  # the task is fixed; seeds vary only init, order and dropout
        centres = rng.standard_normal((classes, dim)).astype(np.float32) * 1.5
        y = rng.integers(0, classes, n)
        x = centres[y] + spread * rng.standard_normal((n, dim)).astype(np.float32)
        split = int(0.7 * n)
        self.x, self.y = torch.from_numpy(x[:split]), torch.from_numpy(y[:split])
        self.xe, self.ye = torch.from_numpy(x[split:]), torch.from_numpy(y[split:])
        self.dim, self.classes, self.hidden, self.dropout = dim, classes, hidden, dropout
        self.batch_size, self.lr = batch_size, lr

    def build_model(self, init_seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(init_seed)
        model = nn.Sequential(nn.Linear(self.dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                              nn.Linear(self.hidden, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.classes))
        with torch.no_grad():
            for p in model.parameters():  # drawn from the init seed alone, on the CPU
                p.copy_(torch.randn(p.shape, generator=g) * (0.0 if p.dim() == 1 else (1.0 / p.shape[1]) ** 0.5))
        return model

    def make_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int):
        order = torch.from_numpy(epoch_order(data_seed, epoch, len(self.x)))
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch((self.x[idx], self.y[idx]))

    def loss(self, model, batch):
        x, y = batch.data
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model, device):
        logits = model(self.xe.to(device))
        return {"eval_loss": nn.functional.cross_entropy(logits, self.ye.to(device)).item(),
                "eval_accuracy": (logits.argmax(1).cpu() == self.ye).float().mean().item()}

    def artifacts(self, model, device, outdir: Path):
        """``predictions`` (held-out predicted classes) and ``labels``: what churn is computed from."""
        with torch.no_grad():
            pred = model(self.xe.to(device)).argmax(1).cpu().numpy().astype(np.int16)
        np.save(outdir / "predictions.npy", pred)
        np.save(outdir / "labels.npy", self.ye.numpy().astype(np.int16))
        return {"predictions": outdir / "predictions.npy", "labels": outdir / "labels.npy"}

    def describe(self):
        return {"hidden": self.hidden, "dropout": self.dropout, "batch_size": self.batch_size, "lr": self.lr}


def make(**params) -> BlobsClassifier:
    return BlobsClassifier(**params)
