"""Executors: ``local`` (this machine, ``--jobs N``) and ``ray`` (a Ray cluster)."""

from devicediff.executors.base import Executor, Task
from devicediff.executors.local import LocalExecutor

__all__ = ["Executor", "Task", "LocalExecutor", "make_executor"]


def make_executor(kind: str = "local", **kw) -> Executor:
    if kind == "local":
        return LocalExecutor(**{k: v for k, v in kw.items() if k in ("jobs", "slots_per_gpu", "isolate", "prestart")})
    if kind == "ray":
        from devicediff.executors.ray import RayExecutor

        return RayExecutor(**{k: v for k, v in kw.items() if k in ("address", "slots_per_gpu")})
    raise ValueError(f"unknown executor {kind!r}; use 'local' or 'ray'")
