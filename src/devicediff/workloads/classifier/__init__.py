"""The image classifier: does the configuration change what the network *predicts*?

A small CNN (``arch = "cnn"``, default) or a small ResNet-style network (``arch = "resnet"``),
trained with cross-entropy on the real MNIST digits (``data = "mnist"``: the classic 50k
training images, held out on the 10k validation images) or on a user's labelled images
(``data = PATH``: an ``.npz`` with ``x`` and ``y``, or a folder of class subfolders; see
``devicediff.data.images``), split deterministically into train and held-out sets.

Held-out metrics: ``eval_loss`` (mean cross-entropy), ``eval_accuracy`` (the primary metric),
``eval_ece`` (expected calibration error, 15 equal-width confidence bins: Guo, Pleiss, Sun &
Weinberger, "On Calibration of Modern Neural Networks", ICML 2017) and ``eval_acc_class_<k>``
for every class ``k`` present in the held-out set. Artifacts: the held-out predicted classes
(``predictions.npy``, int16), the predicted probabilities (``probs.npy``, float16, N x K) and
the true labels (``labels.npy``, int16), for churn between runs
(``devicediff.analysis.churn``).

The workload rules of ``devicediff.spec`` hold: the model is built on CPU from the init seed
through a private generator, batches come in ``epoch_order(data_seed, epoch, n)``, and the
optional dropout uses masks drawn on the CPU from ``(data_seed, epoch, step)``, never a device
generator, so every config drops the same units. The loss is written as
``-(log_softmax * one_hot).sum()`` rather than ``nll_loss``, whose CUDA kernel has no
deterministic mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from devicediff.data.images import load_labelled_images, split
from devicediff.data.mnist import load_mnist
from devicediff.errors import DataError, ParamError
from devicediff.spec import Batch, Workload, epoch_order
from devicediff.workloads.classifier.model import ARCHS, build

OPTIMIZERS = ("adam", "sgd")
ECE_BINS = 15
_DROPOUT_STREAM = 0x64726F70  # separates the dropout masks' random stream from epoch_order's


def _param(cond: bool, message: str) -> None:
    if not cond:
        raise ParamError(f"classifier.{message}")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of Guo et al. (2017): the confidence (max probability) of each input falls in one of
    ``bins`` equal-width bins ``((m-1)/M, m/M]``; ECE = sum over bins of
    (bin size / n) * |accuracy in bin - mean confidence in bin|."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / len(labels))  # sum_b n_b/n * |acc_b - conf_b|


def _softmax64(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, log-probabilities) in float64, numerically stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(logp), logp


def _subset(idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """At most ``n`` of ``idx``: a seeded random subset, in ascending order (all of it if n is None)."""
    if n is None or n >= len(idx):
        return idx
    pick = np.random.default_rng([int(seed), 0x737562]).permutation(len(idx))[:n]
    return np.sort(idx[pick])


def _check_params(*, arch, optimizer, channels, hidden, blocks, dropout, batch_size, lr, momentum, weight_decay,
                  train_size, eval_size, eval_split, eval_fraction, image_size, eval_batch_size, data) -> list[int]:
    """ParamError for the first out-of-range parameter of :class:`Classifier`, checked in this order;
    returns ``channels`` as a list."""
    _param(arch in ARCHS, f"arch {arch!r} unknown; use one of {list(ARCHS)}")
    _param(optimizer in OPTIMIZERS, f"optimizer {optimizer!r} unknown; use one of {list(OPTIMIZERS)}")
    channels = list(channels)
    _param(len(channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in channels),
           f"channels must be a non-empty list of integers >= 1, got {channels}")
    _param(hidden >= 1, f"hidden must be >= 1, got {hidden}")
    _param(blocks >= 1, f"blocks must be >= 1, got {blocks}")
    _param(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
    _param(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    _param(lr > 0, f"lr must be > 0, got {lr}")
    _param(0.0 <= momentum < 1.0, f"momentum must be in [0, 1), got {momentum}")
    _param(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
    _param(train_size is None or train_size >= 1, f"train_size must be >= 1 (or unset for all), got {train_size}")
    _param(eval_size is None or eval_size >= 1, f"eval_size must be >= 1 (or unset for all), got {eval_size}")
    _param(eval_split in ("valid", "test"), f"eval_split {eval_split!r} unknown; use 'valid' or 'test'")
    _param(0.0 < eval_fraction < 1.0, f"eval_fraction must be in (0, 1), got {eval_fraction}")
    _param(image_size is None or image_size >= 1, f"image_size must be >= 1 (or unset), got {image_size}")
    _param(eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {eval_batch_size}")
    _param(isinstance(data, str) and data != "", "data must be 'mnist' or a path to an .npz file or image folder")
    return channels


def _load_mnist_data(train_size: int | None, eval_size: int | None, eval_split: str, mnist_root: str | None):
    """((x, y, x_eval, y_eval), classes, data info) from MNIST: images as (N, 1, H, W)."""
    x, y = load_mnist("train", mnist_root)
    xe, ye = load_mnist(eval_split, mnist_root)
    x, y, xe, ye = x[:train_size], y[:train_size], xe[:eval_size], ye[:eval_size]
    x, xe = x[:, None], xe[:, None]
    info = {"train": "MNIST train (first 50k of the 60k)", "held_out": f"MNIST {eval_split}"}
    return (x, y, xe, ye), [str(k) for k in range(10)], info


def _image_split(y: np.ndarray, data: str, eval_fraction: float, split_seed: int, train_size: int | None,
                 eval_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into a user's labelled images: split by ``split_seed``, then cut."""
    tr, te = split(y, eval_fraction, split_seed)
    if len(te) == 0:
        raise DataError(f"data {data!r}: no held-out images; every class needs at least 2 images")
    return _subset(tr, train_size, split_seed), _subset(te, eval_size, split_seed + 1)


def held_out_indices(params: dict[str, Any]) -> np.ndarray:
    """Which inputs the held-out metrics and the prediction artifacts are about, in their order:
    indices into MNIST's ``eval_split`` (``data = "mnist"``), or into the user's labelled images as
    ``devicediff.data.images`` orders them (sorted files / the .npz's rows). ``params``: the study's
    workload parameters (defaults as the workload's). Row i of ``predictions.npy`` is input
    ``held_out_indices(params)[i]``; the report's "input #" is that i."""
    p = {k: v for k, v in params.items() if k != "name"}
    data = str(p.get("data", "mnist"))
    eval_size = p.get("eval_size", 10000)
    if data == "mnist":
        _, ye = load_mnist(p.get("eval_split", "valid"), p.get("mnist_root"))
        return np.arange(len(ye[:eval_size]))
    imgs = load_labelled_images(data, p.get("image_size"))
    return _image_split(imgs.y, data, p.get("eval_fraction", 0.2), p.get("split_seed", 0), p.get("train_size"),
                        eval_size)[1]


def _load_image_data(data: str, image_size: int | None, eval_fraction: float, split_seed: int,
                     train_size: int | None, eval_size: int | None):
    """((x, y, x_eval, y_eval), classes, data info) from a user's labelled images, split
    deterministically by ``split_seed`` and cut to ``train_size`` / ``eval_size``."""
    imgs = load_labelled_images(data, image_size)
    tr, te = _image_split(imgs.y, data, eval_fraction, split_seed, train_size, eval_size)
    info = dict(imgs.info, eval_fraction=float(eval_fraction), split_seed=int(split_seed))
    return (imgs.x[tr], imgs.y[tr], imgs.x[te], imgs.y[te]), imgs.classes, info


class Classifier(Workload):
    name = "classifier"
    primary_metrics = ("eval_accuracy",)

    def __init__(
        self,
        *,
        arch: str = "cnn",
        data: str = "mnist",
        channels: list[int] | tuple[int, ...] = (16, 32),
        hidden: int = 128,
        blocks: int = 1,
        dropout: float = 0.0,
        batch_size: int = 64,
        lr: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        train_size: int | None = None,
        eval_size: int | None = 10000,
        eval_split: str = "valid",
        eval_fraction: float = 0.2,
        split_seed: int = 0,
        image_size: int | None = None,
        eval_batch_size: int = 1000,
        mnist_root: str | None = None,
    ):
        channels = _check_params(
            arch=arch, optimizer=optimizer, channels=channels, hidden=hidden, blocks=blocks, dropout=dropout,
            batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, train_size=train_size,
            eval_size=eval_size, eval_split=eval_split, eval_fraction=eval_fraction, image_size=image_size,
            eval_batch_size=eval_batch_size, data=data)

        self.arch, self.data, self.channels = arch, str(data), channels
        self.hidden, self.blocks, self.dropout = int(hidden), int(blocks), float(dropout)
        self.batch_size, self.lr, self.optimizer = int(batch_size), float(lr), optimizer
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.eval_batch_size = int(eval_batch_size)
        self.data_info: dict[str, Any] = {"source": self.data}

        if self.data == "mnist":
            (x, y, xe, ye), self.classes, info = _load_mnist_data(train_size, eval_size, eval_split, mnist_root)
        else:
            if image_size is not None and (self.arch == "cnn" and image_size < 2 ** len(channels)):
                raise ParamError(f"classifier.image_size {image_size} is too small for {len(channels)} pooling stages")
            (x, y, xe, ye), self.classes, info = _load_image_data(self.data, image_size, eval_fraction, split_seed,
                                                                  train_size, eval_size)
        self.data_info.update(info)
        self.eval_split = eval_split if self.data == "mnist" else None
        self.train_x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.train_y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        self.eval_x = torch.from_numpy(np.ascontiguousarray(xe, dtype=np.float32))
        self.eval_y = np.ascontiguousarray(ye, dtype=np.int64)
        _, self.in_channels, self.height, self.width = self.train_x.shape
        self._check_data_fits()
        self.feature_dim = self.hidden if self.arch == "cnn" else self.channels[-1]

    def _check_data_fits(self) -> None:
        """DataError unless the training set fills a batch and the images survive the CNN's pooling."""
        if len(self.train_x) < self.batch_size:
            raise DataError(f"classifier: {len(self.train_x)} training images, fewer than batch_size {self.batch_size}; "
                            "lower batch_size or give more data")
        if self.arch == "cnn" and min(self.height, self.width) < 2 ** len(self.channels):
            raise DataError(f"classifier: {self.height}x{self.width} images are too small for {len(self.channels)} "
                            "pooling stages; use fewer channels entries or set image_size")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "arch": self.arch, "data": self.data_info, "classes": self.classes, "num_classes": self.num_classes,
            "input_shape": [self.in_channels, self.height, self.width], "channels": self.channels,
            "dropout": self.dropout, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
            "weight_decay": self.weight_decay, "train_size": len(self.train_x), "eval_size": len(self.eval_x),
            "eval_split": self.eval_split, "eval_batch_size": self.eval_batch_size,
        }
        if self.arch == "cnn":
            d["hidden"] = self.hidden
        else:
            d["blocks"] = self.blocks
        if self.optimizer == "sgd":
            d["momentum"] = self.momentum
        if self.dropout > 0:
            d["dropout_masks"] = "drawn on CPU from (data_seed, epoch, step); the same on every config"
        return d

    # -- model and optimisation -----------------------------------------------------------------

    def build_model(self, init_seed: int) -> torch.nn.Module:
        return build(self.arch, in_channels=self.in_channels, num_classes=self.num_classes, height=self.height,
                     width=self.width, channels=self.channels, hidden=self.hidden, blocks=self.blocks,
                     dropout=self.dropout, init_seed=init_seed)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # -- data -----------------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size  # drop the last partial batch

    def _mask(self, data_seed: int, epoch: int, i: int) -> torch.Tensor | None:
        if self.dropout == 0.0:
            return None
        rng = np.random.default_rng([int(data_seed), int(epoch), int(i), _DROPOUT_STREAM])
        keep = rng.random((self.batch_size, self.feature_dim)) >= self.dropout
        return torch.from_numpy((keep / (1.0 - self.dropout)).astype(np.float32))

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        order = torch.from_numpy(epoch_order(data_seed, epoch, len(self.train_x)))
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch((self.train_x[idx], self.train_y[idx], self._mask(data_seed, epoch, i)))

    # -- loss and evaluation --------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y, mask = batch.data
        logp = torch.log_softmax(model(x, mask), dim=1)
        one_hot = (y[:, None] == torch.arange(logp.shape[1], device=y.device)[None, :]).to(logp.dtype)
        return -(logp * one_hot).sum(dim=1).mean()

    def logits(self, model: torch.nn.Module, device) -> np.ndarray:
        """Held-out logits (float32, N x K, on the CPU), model in eval mode, no gradients."""
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(self.eval_x), self.eval_batch_size):
                out.append(model(self.eval_x[i : i + self.eval_batch_size].to(device)).float().cpu())
        model.train(was_training)
        return torch.cat(out).numpy()

    def evaluate(self, model: torch.nn.Module, device) -> dict[str, float]:
        logits = self.logits(model, device)
        probs, logp = _softmax64(logits)
        y = self.eval_y
        pred = logits.argmax(axis=1)
        correct = pred == y
        out = {
            "eval_loss": float(-logp[np.arange(len(y)), y].mean()),
            "eval_accuracy": float(correct.mean()),
            "eval_ece": expected_calibration_error(probs, y),
        }
        for k in range(self.num_classes):
            sel = y == k
            if sel.any():  # a class absent from the held-out set has no accuracy (not NaN: NaN means diverged)
                out[f"eval_acc_class_{k}"] = float(correct[sel].mean())
        return out

    def artifacts(self, model: torch.nn.Module, device, outdir: Path) -> dict[str, Path]:
        logits = self.logits(model, device)
        probs, _ = _softmax64(logits)
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        files = {
            "predictions": (outdir / "predictions.npy", logits.argmax(axis=1).astype(np.int16)),
            "probs": (outdir / "probs.npy", probs.astype(np.float16)),
            "labels": (outdir / "labels.npy", self.eval_y.astype(np.int16)),
        }
        for path, arr in files.values():
            np.save(path, arr)
        return {name: path for name, (path, _) in files.items()}


WORKLOAD_CLASS = Classifier


def make(**params: Any) -> Classifier:
    return Classifier(**params)
