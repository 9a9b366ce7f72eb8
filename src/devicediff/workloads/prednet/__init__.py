"""PredNet: next-frame video prediction (Lotter et al. 2016), in two variants.

``model.py`` (the networks), ``workload.py`` (the PyTorch workload: losses, SSIM, evaluation),
``data.py`` (the one numpy data recipe) and ``chainer.py`` (the Chainer twin of
``chainer-lineage``). See ``PredNetWorkload`` for the parameters and docs/prednet.md for the
variants, the data and the ``state_dict`` naming table. Importing this package loads no framework.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredNet", "PredNetWorkload", "build_prednet", "make", "ssim"]


def make(**params: Any):
    """The PyTorch workload (``PredNetWorkload(**params)``)."""
    from devicediff.workloads.prednet.workload import PredNetWorkload

    return PredNetWorkload(**params)


def __getattr__(name: str):
    if name in ("PredNet", "build_prednet"):
        from devicediff.workloads.prednet import model

        return getattr(model, name)
    if name in ("PredNetWorkload", "ssim"):
        from devicediff.workloads.prednet import workload

        return getattr(workload, name)
    raise AttributeError(name)
