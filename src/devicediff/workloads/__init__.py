"""Workload registry.

A study names its workload as one of:

- a built-in name: ``autoencoder``, ``prednet``;
- an entry point in the ``devicediff.workloads`` group (a package's own plugin);
- ``package.module:function`` or ``path/to/file.py:function`` (a path relative
  to the study file), where ``function(**params)`` returns a ``Workload``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from devicediff.spec import Workload
from devicediff.errors import StudyError

BUILTIN = {
    "autoencoder": "devicediff.workloads.autoencoder:make",
    "prednet": "devicediff.workloads.prednet:make",
}


def _plugins() -> dict[str, str]:
    try:
        eps = entry_points(group="devicediff.workloads")
    except TypeError:  # pragma: no cover - Python 3.9 API
        eps = entry_points().get("devicediff.workloads", [])
    return {ep.name: ep.value for ep in eps}


def _target(name: str) -> str:
    if name in BUILTIN:
        return BUILTIN[name]
    plugins = _plugins()
    if name in plugins:
        return plugins[name]
    if ":" in name:
        return name
    known = sorted(set(BUILTIN) | set(plugins))
    raise StudyError(f"workload.name: unknown workload {name!r}; use one of {known} or module:function")


def _import_target(target: str) -> Callable[..., Workload]:
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


def _check_params(name: str, fn: Callable, params: dict[str, Any]) -> None:
    """Unknown parameter names fail with the list of known ones."""
    import inspect

    target = getattr(fn, "__wrapped_workload__", fn)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    ps = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        cls = getattr(fn, "__self__", None) or getattr(inspect.getmodule(fn), "WORKLOAD_CLASS", None)
        if cls is None:
            return
        ps = inspect.signature(cls).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in ps):
            return
    known = [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for k in params:
        if k not in known:
            raise StudyError(f"workload.{k}: unknown parameter for workload {name!r}; known parameters are {known}")


def make_workload(name: str, params: dict[str, Any]) -> Workload:
    fn = _import_target(_target(name))
    _check_params(name, fn, params)
    wl = fn(**params)
    if not isinstance(wl, Workload):
        raise StudyError(f"workload {name!r}: {fn.__name__}() returned {type(wl).__name__}, not a devicediff.spec.Workload")
    return wl
