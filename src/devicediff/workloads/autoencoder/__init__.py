"""The MNIST autoencoder, the original study's control network: ``workload.py`` (PyTorch) and
``chainer.py`` (its Chainer twin). Importing this package loads neither framework."""

from __future__ import annotations

from typing import Any


def make(**params: Any):
    """The PyTorch workload (``Autoencoder(**params)``)."""
    from devicediff.workloads.autoencoder.workload import Autoencoder

    return Autoencoder(**params)
