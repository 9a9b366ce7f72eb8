"""The job handed to a run's worker: built once in the parent, serialised once, read once.

A ``Job`` is everything a worker needs to train one cell (or step it in lockstep),
in any framework and any Python environment: standard library only, JSON on the
wire. Changes go through :meth:`Job.with_` (a new frozen job), never by editing a
dict, so what the worker sees is what the parent built.

Fields
------
run_id            the store's id of the run (``diverge-A-...`` for a lockstep side)
study             the study's name (for logs)
workload          resolved workload name (built-in, entry point, or absolute ``file.py:func``)
workload_params   the study's ``[workload]`` table (per-config ``params`` are in ``config``)
config            the execution config as a plain dict (``ExecConfig.to_dict``)
seed, init_seed, data_seed, dropout_seed, noise_seed, repeat   the cell's seeds (``Study.cell``)
budget            ``Budget`` as a dict (epochs/steps, cadences)
artifact_dir      the run's folder for snapshots, artifacts, logs
checkpoint_path   where the framework writes its checkpoint (None: no checkpoints)
snapshots         write weight snapshots at evaluations
lockstep          ``Lockstep`` for ``devicediff diverge``, else None
torch_python      interpreter with torch, for frameworks that export initial weights from it
portable_random   swap the model's dropout for devicediff.portable's, seeded by dropout_seed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Lockstep:
    """How a lockstep side runs: ``steps`` steps, step files in ``dir``; ``repeat`` each step
    ("auto": step 1, later on a GPU or once a repeat varied; "always"; "never"); ``free``: also
    train a free-running copy. ``ops_at``: the operation pass (docs/diverge.md): teacher-forced
    steps up to ``ops_at``, no step files, and that step's operations recorded into ``dir``."""

    steps: int
    dir: str
    repeat: str = "auto"
    free: bool = True
    ops_at: int | None = None

    def __post_init__(self):
        if self.repeat not in ("auto", "always", "never"):
            raise ValueError(f"lockstep.repeat {self.repeat!r}: use auto, always or never")
        if self.ops_at is not None and not 1 <= self.ops_at <= self.steps:
            raise ValueError(f"lockstep.ops_at {self.ops_at}: a step from 1 to {self.steps}")


@dataclass(frozen=True)
class Job:
    run_id: str
    workload: str
    config: dict
    init_seed: int
    data_seed: int
    budget: dict
    study: str = ""
    workload_params: dict = field(default_factory=dict)
    seed: int = 0
    repeat: int = 0
    dropout_seed: int = 0
    noise_seed: int = 0
    portable_random: bool = False
    artifact_dir: str = "."
    checkpoint_path: str | None = None
    snapshots: bool = True
    lockstep: Lockstep | None = None
    torch_python: str | None = None

    # -- derived -----------------------------------------------------------------------------------
    @property
    def framework(self) -> str:
        return self.config.get("framework", "torch")

    @property
    def device(self) -> str:
        return str(self.config.get("device", "cpu"))

    @property
    def params(self) -> dict:
        """The workload's parameters for this run: the study's, then the config's overrides."""
        return {**self.workload_params, **self.config.get("params", {})}

    def with_(self, **changes: Any) -> "Job":
        return replace(self, **changes)

    def with_device(self, device: str) -> "Job":
        return replace(self, config={**self.config, "device": device})

    # -- wire format ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        d = dict(d)
        if d.get("lockstep") is not None:
            d["lockstep"] = Lockstep(**d["lockstep"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls.from_dict(json.loads(text))
