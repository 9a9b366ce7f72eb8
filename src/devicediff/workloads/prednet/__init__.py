"""PredNet: next-frame video prediction (Lotter et al. 2016), in two variants.

``make(**params)`` is what the workload registry calls with the study file's
``[workload]`` table (minus ``name``); see ``PredNetWorkload`` for the
parameters and docs/prednet.md for the variants, the data and the
``state_dict`` naming table.
"""

from __future__ import annotations

from typing import Any

from devicediff.workloads.prednet.model import PredNet, build_prednet
from devicediff.workloads.prednet.workload import PredNetWorkload, ssim

__all__ = ["PredNet", "PredNetWorkload", "build_prednet", "make", "ssim"]


def make(**params: Any) -> PredNetWorkload:
    return PredNetWorkload(**params)
