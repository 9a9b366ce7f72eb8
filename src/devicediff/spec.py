"""The whole workload API in one module.

A *workload* is model + data + loss + optimizer. devicediff's training loop
(``devicediff.frameworks``) is shared by every workload and owns
everything about *how* the arithmetic is done; the workload owns *what* is
computed. To hold every source of randomness equal across execution configs,
a workload must follow three rules:

1. ``build_model(init_seed)`` builds the model **on CPU** from ``init_seed``
   alone (the loop moves it to the device afterwards), so every config starts
   from the same bits.
2. ``train_batches(data_seed, epoch)`` yields CPU tensors whose order comes from
   a CPU generator seeded from ``data_seed`` and ``epoch`` alone (:func:`epoch_order`),
   so every config sees the same batches.
3. Nothing else draws random numbers during training (no dropout on device
   RNGs), or if it does, it says so in ``describe()``.

A user's own workload is a ``module:function`` named in the study file (or an
entry point in the ``devicediff.workloads`` group) returning a ``Workload``;
``examples/linear_regression.py`` is a complete one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


def epoch_order(data_seed: int, epoch: int, n: int):
    """The order of ``n`` training examples in ``epoch``: a permutation (numpy int64 array)
    from numpy's ``default_rng([data_seed, epoch])``, on the CPU. Every built-in workload,
    in PyTorch and in Chainer, takes its batches in this order, so every config (and both
    frameworks) sees the same batches whatever the device; a user's workload should too."""
    import numpy as np  # here, so that this module stays standard library at import

    return np.random.default_rng([int(data_seed), int(epoch)]).permutation(n)


@dataclass(frozen=True)
class Batch:
    """One training step's input. ``data`` is any structure of CPU tensors.

    ``new_sequence`` tells stateful workloads (PredNet's truncated BPTT) that
    carried state must be reset before this batch.
    """

    data: Any
    new_sequence: bool = True


class Workload(ABC):
    """What is trained. One instance serves one run, inside the run's worker
    process, so it may keep per-run state (e.g. recurrent state across
    truncated-BPTT windows)."""

    #: registry name, e.g. "autoencoder"
    name: str = "workload"

    # -- model and optimisation ------------------------------------------------
    @abstractmethod
    def build_model(self, init_seed: int):
        """Return a ``torch.nn.Module`` built on CPU from ``init_seed`` only."""

    @abstractmethod
    def make_optimizer(self, model):
        """Return a ``torch.optim.Optimizer`` for ``model`` (already on device)."""

    def learning_rate(self, step: int, total_steps: int) -> float | None:
        """Learning rate to set before ``step`` (0-based), or None to leave it."""
        return None

    # -- data ----------------------------------------------------------------
    @abstractmethod
    def train_batches(self, data_seed: int, epoch: int) -> Iterable[Batch]:
        """Batches of one epoch, order drawn from a CPU generator seeded by
        ``(data_seed, epoch)``: :func:`epoch_order`."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Number of batches ``train_batches`` yields per epoch."""

    # -- loss and evaluation ---------------------------------------------------
    @abstractmethod
    def loss(self, model, batch: Batch):
        """Scalar loss tensor for one batch whose tensors are on the device."""

    @abstractmethod
    def evaluate(self, model, device) -> Mapping[str, float]:
        """Held-out metrics, e.g. ``{"eval_loss": 0.031}``. Called in no-grad mode."""

    def artifacts(self, model, device, outdir: Path) -> Mapping[str, Path]:
        """Optional files for the report (e.g. a PNG grid of predicted frames), ``{name: path}``,
        written into ``outdir`` after the last evaluation. Two names have a meaning: ``predictions``,
        an ``.npy`` of the held-out predicted classes (or scores), one row per held-out input in the
        same order in every run, makes the churn verdict (do a config's predictions change more than
        a seed change's?) in ``run``, ``status`` and the report; ``labels``, the true classes, lets the
        report check and show the inputs (examples/blobs_classifier.py)."""
        return {}

    def describe(self) -> Mapping[str, Any]:
        """Resolved parameters, stored with every run."""
        return {}

    def reset_state(self) -> None:
        """Forget any state carried between batches (called when a run resumes
        from a checkpoint at a sequence boundary)."""


def move_to(data: Any, device) -> Any:
    """Move a nested structure of tensors to ``device`` (non-tensors untouched)."""
    if hasattr(data, "to") and callable(data.to):
        return data.to(device)
    if isinstance(data, Mapping):
        return {k: move_to(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(move_to(v, device) for v in data)
    return data


def iter_batches(batches: Iterable[Batch]) -> Iterator[Batch]:
    for b in batches:
        yield b if isinstance(b, Batch) else Batch(b)
