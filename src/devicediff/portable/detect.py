"""Finding out that a training step drew random numbers from torch's generators, and who drew them.

Two complementary tools:

* :func:`rng_snapshot` / :func:`drew`: compare the states of torch's global generators (CPU, each
  CUDA device) before and after a step. Cheap, catches every draw on a global generator, says
  nothing about who drew.
* :class:`RandomOpWatch`: a dispatcher-level watch (``TorchDispatchMode``) that records every random
  aten op that runs (``bernoulli_``, ``native_dropout``, ``rand``, ``normal_``, ``randperm``, ...),
  on which device, and, through forward hooks on a model, which module issued it (qualified name and
  type). It costs a Python call per op while active, so use it on one step, not every step.

Portable draws (:mod:`devicediff.portable`) use integer arithmetic only and are invisible to both, as
they should be: they are the same on every device.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from devicediff.portable._hooks import ModuleStack

# -- generator states ------------------------------------------------------------------------------


def rng_snapshot(devices: Iterable[str | torch.device] | None = None) -> dict[str, torch.Tensor]:
    """States of torch's global generators: ``{"cpu": state, "cuda:0": state, ...}``.

    ``devices``: names like ``"cpu"``, ``"cuda"`` (every CUDA device) or ``"cuda:1"``; by default the
    CPU and, if CUDA is already initialised, every CUDA device (so a CPU-only run never initialises
    CUDA). States are copies (CPU byte tensors)."""
    if devices is None:
        devices = ["cpu"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.append("cuda")
    snap: dict[str, torch.Tensor] = {}
    for d in devices:
        d = torch.device(d)
        if d.type == "cpu":
            snap["cpu"] = torch.get_rng_state().clone()
        elif d.type == "cuda":
            if not torch.cuda.is_available():
                continue
            if d.index is None:
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    snap[f"cuda:{i}"] = s.clone()
            else:
                snap[f"cuda:{d.index}"] = torch.cuda.get_rng_state(d.index).clone()
        elif d.type == "mps" and hasattr(torch, "mps"):
            snap["mps"] = torch.mps.get_rng_state().clone()
        else:
            raise ValueError(f"no generator state for device {d}")
    return snap


def drew(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    """The generators (``"cpu"``, ``"cuda:0"``, ...) whose state changed between two snapshots, in
    ``after``'s order; a generator in only one snapshot counts as changed."""
    out = []
    for name in list(after) + [n for n in before if n not in after]:
        a, b = before.get(name), after.get(name)
        if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
            out.append(name)
    return out


# -- random ops ----------------------------------------------------------------------------------------

#: aten ops that draw on a generator (by overload packet name); others tagged
#: ``torch.Tag.nondeterministic_seeded`` count too, with their dropout argument checked.
RANDOM_OPS = frozenset({
    "bernoulli", "bernoulli_", "dropout", "native_dropout", "_fused_dropout", "feature_dropout",
    "alpha_dropout", "feature_alpha_dropout", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform", "uniform_", "multinomial", "poisson",
    "binomial", "exponential", "exponential_", "geometric", "geometric_", "cauchy", "cauchy_",
    "log_normal", "log_normal_", "random", "random_", "rrelu_with_noise", "rrelu_with_noise_",
    "rrelu_with_noise_functional", "_standard_gamma", "_sample_dirichlet",
})


@dataclass(frozen=True)
class RandomDraw:
    """One kind of random op seen: the aten op, the innermost running module (qualified name, ""
    for the root, None outside any hooked module), its type, the device, whether an explicit
    generator was passed, and how many times it ran."""

    op: str
    module: str | None
    module_type: str | None
    device: str
    private_generator: bool
    count: int

    def describe(self) -> str:
        who = f"module {self.module or '<root>'} ({self.module_type})" if self.module is not None else "outside any module"
        gen = ", own generator" if self.private_generator else ""
        times = f" x{self.count}" if self.count > 1 else ""
        return f"{self.device}: {self.op} in {who}{gen}{times}"


def _arg_values(func, args, kwargs) -> dict:
    vals = {}
    try:
        for i, a in enumerate(func._schema.arguments):
            if i < len(args):
                vals[a.name] = args[i]
            elif a.name in kwargs:
                vals[a.name] = kwargs[a.name]
    except Exception:
        pass
    return vals


def _draws(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name.endswith("_backward"):  # replays the forward's generator offsets, draws nothing new
        return False
    if name not in RANDOM_OPS and torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    vals = _arg_values(func, args, kwargs)
    for flag in ("train", "training"):
        if vals.get(flag) is False:
            return False
    for p in ("dropout_p", "dropout") + (("p",) if "dropout" in name else ()):
        v = vals.get(p)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            return False
    return True


def _device_of(args, kwargs, out) -> str:
    for x in list(args) + list(kwargs.values()) + ([out] if not isinstance(out, (tuple, list)) else list(out)):
        if isinstance(x, torch.Tensor):
            return str(x.device)
    d = kwargs.get("device")
    return str(torch.device(d)) if d is not None else "cpu"


class RandomOpWatch(TorchDispatchMode):
    """Records the random aten ops that run while active::

        with RandomOpWatch(model) as watch:
            loss = workload.loss(model, batch); loss.backward()
        watch.draws     # [RandomDraw(op='bernoulli_', module='net.2', module_type='Dropout', ...)]
        watch.modules   # [('net.2', 'Dropout')]

    ``model`` (optional) gets forward pre/post hooks for the duration, so that each draw is booked to
    the innermost running module; without it, ``module`` is None. Ops that only consume a generator
    passed explicitly (``generator=``) are recorded with ``private_generator=True``: they do not
    move the global generators, but they are still draws a config may not reproduce if the generator
    lives on the device."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self._stack = ModuleStack()
        self._counts: Counter = Counter()

    def __enter__(self):
        if self.model is not None:
            self._stack.install(self.model)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _draws(func, args, kwargs):
            cur = self._stack.current
            gen = kwargs.get("generator")
            if gen is None:
                gen = _arg_values(func, args, kwargs).get("generator")
            self._counts[(func.overloadpacket.__name__, cur[0] if cur else None, cur[1] if cur else None,
                          _device_of(args, kwargs, out), gen is not None)] += 1
        return out

    @property
    def draws(self) -> list[RandomDraw]:
        return [RandomDraw(*k, count=n) for k, n in self._counts.items()]

    @property
    def modules(self) -> list[tuple[str, str]]:
        """Distinct (qualified name, type) of modules that drew, in first-seen order."""
        seen: dict[tuple[str, str], None] = {}
        for d in self.draws:
            if d.module is not None:
                seen.setdefault((d.module, d.module_type), None)
        return list(seen)

    @property
    def devices(self) -> list[str]:
        return sorted({d.device for d in self.draws})

    @property
    def any(self) -> bool:
        """True if any random op ran."""
        return bool(self._counts)

    def summary(self) -> str:
        """One line per kind of draw, e.g. ``cpu: bernoulli_ in module net.2 (Dropout)``; "" if none."""
        return "\n".join(d.describe() for d in self.draws)
