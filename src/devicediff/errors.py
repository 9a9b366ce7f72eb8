"""Every error a user can cause, in one family.

``DevicediffError`` is the base: the CLI catches it, prints its message as one line
(``devicediff: error: ...``) and exits with code 2. Each subclass names the room it
comes from; all messages name what is wrong and how to fix it. Standard library only:
worker processes in other environments (Chainer's) import this module too.

Anything *not* derived from ``DevicediffError`` is a bug in devicediff (or in a user's
workload, inside a worker, where it becomes a ``failed`` run) and keeps its traceback.
"""

from __future__ import annotations


class DevicediffError(Exception):
    """Base of every user-caused error. The message is one line."""


class UsageError(DevicediffError):
    """A command-line argument or combination of them is wrong."""


class StudyError(DevicediffError, ValueError):
    """A study file is malformed or inconsistent."""


class ParamError(StudyError):
    """A workload parameter has the wrong type or is out of its range."""


class DataError(DevicediffError, ValueError):
    """Data is missing, unreadable or inconsistent with the workload's parameters."""


class StoreError(DevicediffError, RuntimeError):
    """A store cannot be opened, read or written."""


class EnvironmentBuildError(DevicediffError, RuntimeError):
    """An environment a config needs (Chainer's, a package set) cannot be built or used."""


class DivergeError(DevicediffError, RuntimeError):
    """A side of ``devicediff diverge`` failed, was skipped or stopped early."""


def did_you_mean(name: str, known) -> str:
    """``" (did you mean 'threads'?)"`` for a near miss of ``name`` among ``known``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
