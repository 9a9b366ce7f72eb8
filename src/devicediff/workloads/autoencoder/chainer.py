"""The Chainer twin of the MNIST autoencoder (``workload.py``): same architecture, names,
data and order; hyper-parameters from the PyTorch workload's resolved ``describe()``."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from devicediff.errors import ParamError
from devicediff.spec import Batch, epoch_order


class AutoEncoderNet(chainer.Chain):
    """784 -> sizes -> reversed -> 784, ReLU, sigmoid output (workload.py)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        dims = [784, *sizes, *reversed(sizes[:-1]), 784]
        with self.init_scope():
            self.layers = chainer.ChainList(
                *[L.Linear(a, b, initialW=chainer.initializers.Zero()) for a, b in zip(dims[:-1], dims[1:])]
            )

    def forward(self, x):
        h = F.reshape(x, (x.shape[0], 784))
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            h = F.sigmoid(h) if i == n - 1 else F.relu(h)
        return h


class ChainerAutoencoder:
    """The autoencoder workload; hyper-parameters from the PyTorch workload's ``describe()``."""

    name = "autoencoder"

    def __init__(self, params: Mapping[str, Any], described: Mapping[str, Any], mnist_path: str | None):
        from devicediff.data.mnist import load_mnist

        if float(described.get("dropout", 0.0)) > 0:
            raise ParamError(f"autoencoder.dropout = {described['dropout']}: the Chainer twin has no dropout (its "
                             "masks would come from another generator); use dropout = 0 in Chainer configs")
        self.sizes = [int(s) for s in described["sizes"]]
        self.batch_size = int(described["batch_size"])
        self.lr = float(described["lr"])
        root = params.get("mnist_root") or mnist_path
        x, _ = load_mnist("train", root)
        xe, _ = load_mnist(described.get("eval_split", "valid"), root)
        self.train_x = np.ascontiguousarray(x[: int(described["train_size"])])
        self.eval_x = np.ascontiguousarray(xe[: int(described["eval_size"])])
        self._described = dict(described)

    def describe(self) -> dict:
        return self._described

    def build_model(self) -> chainer.Chain:
        return AutoEncoderNet(self.sizes)

    def learning_rate(self, step: int, total: int) -> float | None:
        return None

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        order = epoch_order(data_seed, epoch, len(self.train_x))
        for i in range(self.steps_per_epoch()):
            yield Batch(self.train_x[order[i * self.batch_size : (i + 1) * self.batch_size]])

    def reset_state(self) -> None:
        pass

    def loss(self, model, batch: Batch, feed):
        x = feed("input", batch.data)
        return F.mean_squared_error(model(x), F.reshape(x, (x.shape[0], 784)))

    def evaluate(self, model, xp) -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(self.eval_x), 1000):
            x = self.eval_x[i : i + 1000]
            y = chainer.backends.cuda.to_cpu(model(xp.asarray(x)).array)
            total += float(np.sum((y - x.reshape(x.shape[0], 784)) ** 2))
            n += x.shape[0] * 784
        return {"eval_loss": total / n}

    def artifacts(self, model, xp, outdir) -> dict:
        return {}
