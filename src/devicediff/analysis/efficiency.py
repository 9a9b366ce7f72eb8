"""Study efficiency: how much of the machine a study spent training and evaluating, and where the rest went.

``efficiency(runs, wall, slots)`` takes the runs of one invocation (``Store.runs()`` rows: at least
``wall_time`` and ``train_time``; a ``timing`` column, the ``done`` record's ``timing`` dict, gives
the finer split), the invocation's wall time and the slots it had (``--jobs``; the GPU slots for
a GPU study), and answers

    efficiency = Σ (train + evaluation) / (wall × slots)

with the capacity ``wall × slots`` split into parts (seconds, and fractions of the capacity):

=================  ===========================================================================
train              the runs' training steps (``train_time``)
evaluation         held-out evaluation, step 0's included (``timing.eval``)
start-up           worker process start, interpreter, framework import; a warm worker's reset
                   between runs (``timing.startup`` + ``timing.import``)
data               the run's set-up: settings, workload and its data, the initial model
                   (``timing.setup``)
checkpoints        writing and reading checkpoints, artifacts and the final hash
                   (``timing.checkpoint`` + ``timing.finish``)
other in run       the rest of a run's ``wall_time``
store              the parent writing the run's records (``timing.store``)
waiting            what is left: slots with nothing to run (the runner's own start-up and
                   preflight, the last runs finishing alone, cores a config could not use)
=================  ===========================================================================

Without ``timing`` (stores written before it existed), evaluation, start-up, data and checkpoints
are not told apart: ``in run, not training`` is ``wall_time - train_time`` and process start-up
falls into ``waiting``. Pure: no store, no clocks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

PARTS = ("train", "evaluation", "start-up", "data", "checkpoints", "other in run", "store", "waiting")


def _timing(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _run_parts(row: pd.Series) -> tuple[dict[str, float], bool]:
    """One run's seconds per part (waiting excluded), and whether it had a ``timing`` split."""
    t = _timing(row.get("timing"))
    train = _num(row.get("train_time"))
    wall = _num(row.get("wall_time"))
    if not t:
        return {"train": train, "in run, not training": max(wall - train, 0.0)}, False
    parts = {
        "train": train,
        "evaluation": _num(t.get("eval")),
        "start-up": _num(t.get("startup")) + _num(t.get("import")),
        "data": _num(t.get("setup")),
        "checkpoints": _num(t.get("checkpoint")) + _num(t.get("finish")),
        "store": _num(t.get("store")),
    }
    inside = parts["train"] + parts["evaluation"] + _num(t.get("import")) + parts["data"] + parts["checkpoints"]
    parts["other in run"] = max(wall - inside, 0.0)
    return parts, True


def efficiency(runs: pd.DataFrame, wall: float, slots: int) -> dict[str, Any]:
    """Σ(train + evaluation) / (wall × slots) and where the rest of ``wall × slots`` went.

    Returns ``{"efficiency", "wall", "slots", "capacity", "runs", "train", "useful",
    "wall_per_train", "detailed", "parts": {part: seconds}, "fractions": {part: share}}``;
    ``wall_per_train`` is wall ÷ Σ train (the benchmark's "× its training time");
    ``detailed`` is False when no run had a ``timing`` split.
    """
    slots = max(int(slots), 1)
    capacity = max(float(wall), 0.0) * slots
    totals: dict[str, float] = {}
    detailed = False
    for _, row in runs.iterrows():
        parts, split = _run_parts(row)
        detailed = detailed or split
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    order = PARTS if detailed else ("train", "in run, not training", "waiting")
    accounted = sum(totals.values())
    totals["waiting"] = capacity - accounted  # negative only if the inputs disagree
    parts = {k: totals.get(k, 0.0) for k in order}
    train = parts["train"]
    useful = train + parts.get("evaluation", 0.0)
    return {
        "efficiency": useful / capacity if capacity > 0 else float("nan"),
        "wall": float(wall),
        "slots": slots,
        "capacity": capacity,
        "runs": int(len(runs)),
        "train": train,
        "useful": useful,
        "wall_per_train": float(wall) / train if train > 0 else float("inf"),
        "detailed": detailed,
        "parts": parts,
        "fractions": {k: (v / capacity if capacity > 0 else float("nan")) for k, v in parts.items()},
    }


def describe(result: dict[str, Any]) -> str:
    """One line for the end of ``devicediff run``, e.g. ``efficiency 41% of 2 slots × 9.8 s: ...``."""
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["fractions"].items() if v >= 0.005)
    return (f"efficiency {100 * result['efficiency']:.0f}% of {result['slots']} slot(s) × {result['wall']:.1f} s "
            f"(wall = {result['wall_per_train']:.1f}× the training time): {shares}")
