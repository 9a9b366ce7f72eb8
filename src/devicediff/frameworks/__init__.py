"""The framework registry: one place names each framework, its backend, its lockstep side,
its environment and the config options it honours.

A framework's *backend* (``frameworks/<name>/backend.py``) implements
``devicediff.frameworks._driver.Backend``: build the run from a ``Job``, one training step,
evaluation, checkpoints, the state hash. Its *lockstep side* implements ``LockstepSide`` for
``devicediff diverge``. The one training driver and the one lockstep driver in ``_driver.py``
run every framework through those two small interfaces.

Standard library only: the worker imports this module in every environment, Chainer's too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

# Config options every framework honours (ExecConfig fields that are not about arithmetic flags).
COMMON_OPTIONS = frozenset({"name", "framework", "device", "threads", "env", "python", "params", "ray_resources",
                            "note", "reference"})

# ExecConfig's arithmetic flags with the value that means "not asked for".
FLAG_DEFAULTS: dict[str, Any] = {
    "cudnn": True,
    "deterministic": False,
    "tf32": None,
    "cudnn_benchmark": False,
    "matmul_precision": None,
    "compile": False,
    "channels_last": False,
    "precision": "fp32",
    "cuda_graphs": False,
    "grad_noise": {},
    "packages": [],
}


@dataclass(frozen=True)
class Framework:
    name: str
    backend: str  # "module:function" returning a Backend for (job, writer)
    lockstep: str  # "module:function" returning a LockstepSide for a Backend
    options: frozenset  # arithmetic flags it honours (FLAG_DEFAULTS keys)
    environment: str | None = None  # "module:function" returning its interpreter; None: this one
    accepts: tuple = ()  # (flag, value) pairs it accepts although the flag is not in ``options``
    checkpoint_file: str = "checkpoint"
    # Workload parameters only this framework reads (set in a config's params), with their values.
    parameters: dict = field(default_factory=dict)

    def python(self) -> str:
        """The interpreter its workers run in (making its environment if needed)."""
        return _call(self.environment) if self.environment else sys.executable

    def make_backend(self, job, writer):
        return _call(self.backend, job, writer)

    def make_lockstep(self, backend):
        return _call(self.lockstep, backend)

    def unsupported(self, config: dict) -> list[str]:
        """The config's flags this framework cannot honour (asked for, not its default)."""
        bad = []
        for flag, default in FLAG_DEFAULTS.items():
            value = config.get(flag, default)
            if flag in self.options or value == default or (flag, value) in self.accepts:
                continue
            bad.append(flag)
        return bad


def _call(target: str, *args):
    module, _, func = target.partition(":")
    return getattr(import_module(module), func)(*args)


FRAMEWORKS: dict[str, Framework] = {
    "torch": Framework(
        name="torch",
        backend="devicediff.frameworks.torch.backend:TorchBackend",
        lockstep="devicediff.frameworks.torch.lockstep:TorchLockstep",
        options=frozenset(FLAG_DEFAULTS),
        checkpoint_file="checkpoint.pt",
    ),
    "chainer": Framework(
        name="chainer",
        backend="devicediff.frameworks.chainer.backend:ChainerBackend",
        lockstep="devicediff.frameworks.chainer.lockstep:ChainerLockstep",
        options=frozenset({"cudnn", "deterministic", "cudnn_benchmark"}),
        environment="devicediff.frameworks.chainer.env:chainer_python",
        accepts=(("tf32", False),),  # Chainer never uses TF32: asking for it off is what it does
        checkpoint_file="checkpoint.npz",
        parameters={"frame_buffers": ("reused", "fresh"), "adam": ("chainer", "pytorch")},
    ),
}


def get(name: str) -> Framework:
    """The framework called ``name``; the caller has validated it (``study`` does)."""
    return FRAMEWORKS[name]


def workload_params(params: dict) -> dict:
    """``params`` without those only some frameworks' backends read: what a workload takes."""
    return {k: v for k, v in params.items() if not any(k in fw.parameters for fw in FRAMEWORKS.values())}
