"""Portable dropout for PyTorch: the same masks on the CPU and on any GPU, bit for bit.

Every mask comes from :mod:`devicediff.portable.philox`, keyed by

* the **seed**: a :class:`PortableRandom`'s seed (a study's "dropout" seed stream),
* the **stream**: the layer's name (its qualified name in the model, hashed to 32 bits),
* the **counter**: ``step << 16 | call``, the context's training step and the how-many-th call of that
  layer within the step (a layer called several times per step, e.g. in a recurrent loop, draws a
  fresh mask each time).

Usage::

    ctx = PortableRandom(seed=dropout_seed)
    report = make_portable(model, ctx)        # nn.Dropout* -> portable Dropout*, in place
    for batch in batches:
        loss = ...; loss.backward(); opt.step()
        ctx.advance()                         # once per training step
    checkpoint["portable_random"] = ctx.state_dict()

Nothing here touches torch's own generators.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from devicediff.portable import _torch_philox
from devicediff.portable import philox
from devicediff.portable._hooks import ModuleStack

_CALL_BITS = 16
_current: contextvars.ContextVar["PortableRandom | None"] = contextvars.ContextVar(
    "devicediff_portable_random", default=None
)


class Key(NamedTuple):
    """One draw's name: ``(seed, stream, counter)`` as in :mod:`devicediff.portable.philox`."""

    seed: int
    stream: int | str
    counter: int


class PortableRandom:
    """The seed and the step counter behind portable draws, for one model (or one process).

    ``key(name)`` hands out the key of the next draw of ``name`` in the current step; ``advance()``
    moves to the next step. ``state_dict()`` / ``load_state_dict()`` let a checkpoint resume the
    counter, so a resumed run draws the masks an uninterrupted one would have.
    ``with ctx:`` makes it the context of portable layers that have none attached."""

    def __init__(self, seed: int, *, step: int = 0) -> None:
        self.seed = int(seed)
        self.step = int(step)
        self._calls: dict[str, int] = {}
        self._tokens: list = []

    # -- counters -------------------------------------------------------------------------------
    def key(self, name: str, purpose: str = "dropout") -> Key:
        """The key of the next draw of layer ``name`` this step (advances its call count)."""
        stream = f"{purpose}:{name}"
        call = self._calls.get(stream, 0)
        if call >= (1 << _CALL_BITS):
            raise RuntimeError(f"more than {1 << _CALL_BITS} draws of {name!r} in one step")
        self._calls[stream] = call + 1
        return Key(self.seed, stream, (self.step << _CALL_BITS) | call)

    def advance(self, steps: int = 1) -> None:
        """Next training step: call once per optimizer step (after backward)."""
        self.step += int(steps)
        self._calls.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "calls": dict(self._calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self._calls = {str(k): int(v) for k, v in dict(state.get("calls", {})).items()}

    # -- draws ----------------------------------------------------------------------------------
    def uniform(self, shape, name: str, device="cpu") -> torch.Tensor:
        """float32 uniform [0, 1) for layer ``name``'s next draw (e.g. stochastic depth)."""
        k = self.key(name, "uniform")
        return philox.uniform(shape, k.seed, k.stream, k.counter, device=device)

    def normal(self, shape, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """Standard normal for layer ``name``'s next draw (e.g. noise layers)."""
        k = self.key(name, "normal")
        return philox.normal(shape, k.seed, k.stream, k.counter, device=device, dtype=dtype)

    # -- as the current context -----------------------------------------------------------------
    def __enter__(self) -> "PortableRandom":
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return f"PortableRandom(seed={self.seed}, step={self.step})"


def current() -> PortableRandom | None:
    """The context set by ``with ctx:``, if any."""
    return _current.get()


# -- the function -----------------------------------------------------------------------------------


class _FusedDropout(torch.autograd.Function):
    """Triton path: nothing saved; backward recomputes the same mask on the gradient."""

    @staticmethod
    def forward(ctx, x, p, seed, stream, counter):
        ctx.key = (p, seed, stream, counter)
        out, _ = _torch_philox.dropout_apply(x, p, seed, stream, counter, backend="triton")
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: keep the backward differentiable
            return (_FusedDropout.apply(grad, *ctx.key),) + (None,) * 4
        out, _ = _torch_philox.dropout_apply(grad, *ctx.key, backend="triton")
        return (out,) + (None,) * 4


def _trivial(x: torch.Tensor, p: float, training: bool) -> torch.Tensor | None:
    """The result when no mask is needed (eval, p = 0, p = 1), else None; checks ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    return None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, key: Key | tuple | None = None,
            inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` with the portable mask of ``key = (seed, stream, counter)``: each element kept
    with probability ``1 - p`` (to 2**-24) and scaled by ``1 / (1 - p)``; identical on every device.

    ``inplace`` is accepted for compatibility; the result is always a new tensor."""
    trivial = _trivial(x, p, training)
    if trivial is not None:
        return trivial
    if key is None:
        raise ValueError("portable dropout needs a key (seed, stream, counter), e.g. ctx.key(layer_name)")
    seed, stream, counter = key
    if x.device.type == "cuda" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and _torch_philox._use_triton(x.device):
        return _FusedDropout.apply(x, float(p), int(seed), stream, int(counter))
    out, _ = _torch_philox.dropout_apply(x, float(p), seed, stream, counter, backend="eager")
    return out


def feature_dropout(x: torch.Tensor, p: float, training: bool, key, channel_dims: int) -> torch.Tensor:
    """Channel-wise dropout: one draw per entry of ``x.shape[:channel_dims]``, broadcast over the rest
    (``F.dropout1d/2d/3d``)."""
    trivial = _trivial(x, p, training)
    if trivial is not None:
        return trivial
    seed, stream, counter = key
    shape = tuple(x.shape[:channel_dims]) + (1,) * (x.dim() - channel_dims)
    ms = _torch_philox.mask_scale(torch.empty(shape, dtype=x.dtype, device=x.device), float(p), seed, stream,
                                  counter, backend="auto")
    return x * ms


# -- the modules ---------------------------------------------------------------------------------------


class _PortableBase(nn.Module):
    def __init__(self, p: float = 0.5, inplace: bool = False, *, name: str | None = None,
                 ctx: PortableRandom | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.inplace = inplace
        self.portable_name = name
        self.portable_ctx = ctx

    def _key(self) -> Key:
        ctx = self.portable_ctx or current()
        if ctx is None:
            raise RuntimeError(
                f"{type(self).__name__} has no PortableRandom: call make_portable(model, ctx) "
                "(or attach(model, ctx)), or run the forward inside `with ctx:`"
            )
        if self.portable_name is None:
            raise RuntimeError(f"{type(self).__name__} has no name: call make_portable(model, ctx) or pass name=")
        return ctx.key(self.portable_name)

    def extra_repr(self) -> str:
        return f"p={self.p}, name={self.portable_name!r}"

class Dropout(_PortableBase):
    """Drop-in ``nn.Dropout`` with portable masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout(x, self.p, True, self._key())


class _FeatureDropout(_PortableBase):
    spatial_dims = 2

    def _channel_dims(self, x: torch.Tensor) -> int:
        batched = self.spatial_dims + 2
        if x.dim() not in (batched - 1, batched):
            raise ValueError(f"{type(self).__name__} expects {batched - 1}-D or {batched}-D input, got {x.dim()}-D")
        return 2 if x.dim() == batched else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return feature_dropout(x, self.p, True, self._key(), self._channel_dims(x))


class Dropout1d(_FeatureDropout):
    """Drop-in ``nn.Dropout1d``: (N, C, L) or (C, L), whole channels."""

    spatial_dims = 1


class Dropout2d(_FeatureDropout):
    """Drop-in ``nn.Dropout2d``: (N, C, H, W) or (C, H, W)... except that, like torch 2.x, a 3-D input
    is read as (N, C, L) (channel-wise 1-D dropout)."""

    spatial_dims = 2

    def _channel_dims(self, x: torch.Tensor) -> int:
        if x.dim() not in (3, 4):
            raise ValueError(f"Dropout2d expects 3-D or 4-D input, got {x.dim()}-D")
        return 2


class Dropout3d(_FeatureDropout):
    """Drop-in ``nn.Dropout3d``: (N, C, D, H, W) or (C, D, H, W), whole channels."""

    spatial_dims = 3


_SWAPS = {nn.Dropout: Dropout, nn.Dropout1d: Dropout1d, nn.Dropout2d: Dropout2d, nn.Dropout3d: Dropout3d}
_PORTABLE = (Dropout, Dropout1d, Dropout2d, Dropout3d)
#: random modules make_portable leaves alone (they still draw on torch's generators; RandomOpWatch sees them)
NOT_SWAPPED = (nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


@dataclass
class PortableReport:
    """What :func:`make_portable` did: ``swapped`` and ``attached`` as (qualified name, type) pairs,
    ``not_swapped`` as (qualified name, type, why) for random modules it could not replace."""

    swapped: list[tuple[str, str]] = field(default_factory=list)
    attached: list[tuple[str, str]] = field(default_factory=list)
    not_swapped: list[tuple[str, str, str]] = field(default_factory=list)
    functional: bool = False


def _named_children_paths(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute name, child) for every submodule, each path once."""
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent.named_children():
            yield (f"{pname}.{cname}" if pname else cname), parent, cname, child


def make_portable(model: nn.Module, ctx: PortableRandom, *, functional: bool = False) -> PortableReport:
    """Swap, in place, every ``nn.Dropout``, ``nn.Dropout1d/2d/3d`` of ``model`` (at any depth,
    including inside ``nn.Sequential``/``ModuleList``/``ModuleDict``) for the portable version named
    by its qualified name, and attach ``ctx`` to portable layers already there.

    Not swapped (listed in the report): ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``, ``nn.RReLU``
    and subclasses of the dropout classes. ``F.dropout``/``torch.dropout`` calls
    written in a ``forward`` are not modules and are not swapped, unless ``functional=True``: then a
    torch function mode active during ``model``'s forward reroutes ``F.dropout``, ``torch.dropout``,
    ``F.dropout1d/2d/3d`` and ``torch.feature_dropout`` to portable ones keyed by the calling module's
    name (see :class:`PortableFunctional`). Random draws of any other kind (``torch.rand*``,
    ``bernoulli``, ...) are left to torch's generators; :class:`devicediff.portable.detect.RandomOpWatch`
    finds them.

    A module shared at several places keeps its first name (one stream, call counts per use).
    """
    if isinstance(model, tuple(_SWAPS)) and type(model) in _SWAPS:
        raise ValueError("make_portable needs a model that contains the dropout layer, not the layer itself")
    report = PortableReport(functional=functional)
    replaced: dict[int, nn.Module] = {}
    for qname, parent, cname, child in list(_named_children_paths(model)):
        if isinstance(child, _PORTABLE):
            if id(child) not in replaced:
                child.portable_ctx = ctx
                if child.portable_name is None:
                    child.portable_name = qname
                replaced[id(child)] = child
                report.attached.append((qname, type(child).__name__))
            continue
        new_cls = _SWAPS.get(type(child))
        if new_cls is not None:
            if id(child) not in replaced:
                new = new_cls(child.p, child.inplace, name=qname, ctx=ctx)
                new.train(child.training)
                replaced[id(child)] = new
                report.swapped.append((qname, type(child).__name__))
            setattr(parent, cname, replaced[id(child)])
        elif isinstance(child, tuple(_SWAPS)) or isinstance(child, NOT_SWAPPED):
            why = ("a subclass (its forward may differ)" if isinstance(child, tuple(_SWAPS))
                   else "no portable version")
            report.not_swapped.append((qname, type(child).__name__, why))
    if functional:
        PortableFunctional(model, ctx).install()
    return report


def attach(model: nn.Module, ctx: PortableRandom) -> int:
    """Point every portable layer of ``model`` at ``ctx`` (e.g. after loading a pickled model);
    returns how many."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, _PORTABLE):
            m.portable_ctx = ctx
            n += 1
    return n


def contexts(model: nn.Module) -> list[PortableRandom]:
    """The distinct contexts attached to ``model``'s portable layers."""
    seen: dict[int, PortableRandom] = {}
    for _, m in model.named_modules():
        if isinstance(m, _PORTABLE) and m.portable_ctx is not None:
            seen.setdefault(id(m.portable_ctx), m.portable_ctx)
    return list(seen.values())


# -- functional calls ----------------------------------------------------------------------------------


class PortableFunctional(torch.overrides.TorchFunctionMode):
    """Reroutes functional dropout calls made during ``model``'s forward to portable ones.

    ``install()`` adds forward pre/post hooks to every module of ``model``: the outermost forward
    that starts (the root's, or a submodule's called directly) enters this mode and leaves it when it
    ends; the innermost running module's name keys the draw (stream ``"<module name>#dropout"``).
    ``uninstall()`` removes the hooks."""

    def __init__(self, model: nn.Module, ctx: PortableRandom) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.modules = ModuleStack()
        import torch.nn.functional as F

        self._plain = {F.dropout: None, torch.dropout: None, torch.nn.functional.dropout: None}
        self._feature = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3, torch.feature_dropout: None}

    def install(self) -> "PortableFunctional":
        self.modules = ModuleStack(on_enter=self.__enter__, on_exit=lambda: self.__exit__(None, None, None))
        self.modules.install(self.model)
        self.model._devicediff_portable_functional = self
        return self

    def uninstall(self) -> None:
        self.modules.remove()

    def _name(self, fn) -> str:
        cur = self.modules.current
        return f"{cur[0] if cur else ''}#{getattr(fn, '__name__', 'dropout')}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._plain or func in self._feature:
            x = args[0] if args else kwargs["input"]
            rest = list(args[1:])
            p = rest.pop(0) if rest else kwargs.get("p", 0.5)
            training = rest.pop(0) if rest else kwargs.get("training", kwargs.get("train", True))
            if not training or p == 0.0:
                return x
            key = self.ctx.key(self._name(func))
            if func in self._plain:
                return dropout(x, p, True, key)
            dims = self._feature[func]
            if dims is None:  # torch.feature_dropout(input, p, train): channels are (N, C)
                channel_dims = 2 if x.dim() > 2 else 1
            elif x.dim() == dims + 2 or (dims == 2 and x.dim() == 3):  # dropout2d reads 3-D as (N, C, L)
                channel_dims = 2
            else:
                channel_dims = 1
            return feature_dropout(x, p, True, key, channel_dims)
        return func(*args, **kwargs)
