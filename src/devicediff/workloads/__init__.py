"""Workload registry: one name map, parameter checking, and each workload's framework twins.

A study names its workload as one of:

- a built-in name: ``autoencoder``, ``prednet``, ``classifier``;
- an entry point in the ``devicediff.workloads`` group (a package's own plugin);
- ``package.module:function`` or ``path/to/file.py:function`` (a path relative to the study
  file), where ``function(**params)`` returns a ``Workload`` (a class works too).

Parameters are checked against the target's typed signature before anything runs
(:func:`check_params`): unknown names, wrong types (an ``int`` parameter given ``2.5`` or
``"abc"``), non-finite numbers and malformed lists fail with one line naming the key, the
value and what is allowed. Ranges (``lr > 0``...) are the workload's own constructor's to
check, with ``devicediff.errors.ParamError``.

A built-in workload is a package ``workloads/<name>/`` holding its PyTorch workload and, where
one exists, its twin in another framework (``chainer.py``). Importing this module loads no
framework (the Chainer environment imports it too).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from devicediff.errors import ParamError, StudyError, did_you_mean


@dataclass(frozen=True)
class Builtin:
    torch: str  # "module:Class" of the PyTorch workload
    twins: dict = field(default_factory=dict)  # framework -> "module:Class" of its twin


BUILTIN = {
    "autoencoder": Builtin("devicediff.workloads.autoencoder.workload:Autoencoder",
                           {"chainer": "devicediff.workloads.autoencoder.chainer:ChainerAutoencoder"}),
    "prednet": Builtin("devicediff.workloads.prednet.workload:PredNetWorkload",
                       {"chainer": "devicediff.workloads.prednet.chainer:ChainerPredNet"}),
    "classifier": Builtin("devicediff.workloads.classifier:make"),
}
# Names that older studies and entry points use for the built-ins.
_ALIASES = {"devicediff.workloads.autoencoder:make": "autoencoder", "devicediff.workloads.prednet:make": "prednet"}


def _plugins() -> dict[str, str]:
    eps = entry_points(group="devicediff.workloads")
    return {ep.name: ep.value for ep in eps if ep.name not in BUILTIN}


def builtin_name(name: str) -> str | None:
    """The built-in a workload name refers to, if any."""
    name = _ALIASES.get(name, name)
    return name if name in BUILTIN else None


def _target(name: str) -> str:
    b = builtin_name(name)
    if b:
        return BUILTIN[b].torch
    plugins = _plugins()
    if name in plugins:
        return plugins[name]
    if ":" in name:
        return name
    known = sorted(set(BUILTIN) | set(plugins))
    raise StudyError(f"workload.name: unknown workload {name!r}{did_you_mean(name, known)}; use one of {known} "
                     f"or module:function")


def _import_target(target: str) -> Callable[..., Any]:
    mod_name, _, func = target.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise StudyError(f"workload.name: file {mod_name!r} not found")
        spec = importlib.util.spec_from_file_location(f"devicediff_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise StudyError(f"workload.name: cannot import module {mod_name!r} ({e}); is it installed or on PYTHONPATH?") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise StudyError(f"workload.name: {mod_name!r} has no callable {func!r}")
    return fn


def resolve_workload_name(name: str, study_dir: Path | None = None) -> str:
    """Make ``file.py:func`` names absolute so a worker in any cwd finds them."""
    mod, sep, func = name.rpartition(":")
    if sep and mod.endswith(".py") and not Path(mod).is_absolute():
        base = study_dir or Path.cwd()
        return f"{(base / mod).resolve()}:{func}"
    return name


def check_workload_name(name: str) -> None:
    """Fail early (as a StudyError) if ``name`` does not resolve."""
    target = _target(name)
    if target.split(":")[0].startswith("devicediff."):
        return  # built-in: importing it would load torch in the parent
    _import_target(target)


def twin(name: str, framework: str) -> str | None:
    """``module:Class`` of the workload's twin in ``framework`` (None: it has none)."""
    b = builtin_name(name)
    return BUILTIN[b].twins.get(framework) if b else None


def twin_frameworks(name: str) -> list[str]:
    b = builtin_name(name)
    return sorted(BUILTIN[b].twins) if b else []


def make_twin(name: str, framework: str, *args: Any):
    """Build the ``framework`` twin of workload ``name`` (inside that framework's environment)."""
    target = twin(name, framework)
    if target is None:
        raise ParamError(f"workload {name!r} has no {framework} version; {framework} runs {sorted(w for w in BUILTIN if twin(w, framework))}")
    return _import_target(target)(*args)


# -- parameters --------------------------------------------------------------------------------------


def _parameter_target(fn: Callable) -> Callable:
    """What names the parameters: a class's ``__init__``; for a ``make(**params)`` factory, its
    module's ``WORKLOAD_CLASS.__init__`` when it has one; else the function itself."""
    if inspect.isclass(fn):
        return fn.__init__
    try:
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn
    cls = getattr(inspect.getmodule(fn), "WORKLOAD_CLASS", None) if takes_any else None
    return cls.__init__ if cls is not None else fn


def _signature_of(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(_parameter_target(fn))
    except (TypeError, ValueError):
        return None


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_parameter_target(fn))
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        return {}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in args else "")
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text", dict: "a table"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args else Any
        return all(_fits(v, inner) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # a type we do not check (a user's own class)


def check_params(name: str, fn: Callable, params: dict[str, Any]) -> None:
    """Unknown parameter names and values that do not fit the typed signature fail with one line."""
    sig = _signature_of(fn)
    if sig is None:
        return
    ps = [p for p in sig.parameters.values() if p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return  # takes anything: nothing to check
    known = [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    hints = _hints(fn)
    for k, v in params.items():
        if k not in known:
            raise ParamError(f"workload.{k}: unknown parameter for workload {name!r}{did_you_mean(k, known)}; "
                             f"known parameters are {known}")
        hint = hints.get(k, Any)
        if not _fits(v, hint):
            if isinstance(v, float) and not math.isfinite(v):
                problem = f"{v!r} is not a finite number"
            else:
                problem = f"expected {_describe(hint)}, got {v!r}"
            raise ParamError(f"workload.{k}: {problem} (set in [workload], a config's params or --set {k}=...)")


def make_workload(name: str, params: dict[str, Any]):
    """The PyTorch workload ``name`` with ``params``, checked."""
    from devicediff.spec import Workload

    fn = _import_target(_target(name))
    check_params(name, fn, params)
    wl = fn(**params)
    if not isinstance(wl, Workload):
        raise StudyError(f"workload {name!r}: {getattr(fn, '__name__', fn)}() returned {type(wl).__name__}, "
                         "not a devicediff.spec.Workload")
    return wl
