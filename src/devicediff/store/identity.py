"""What makes two stored studies the same study, and where two definitions part.

A stored definition is ``Study.to_dict()``. Its identity is the part that changes what is
computed: ``IDENTITY_KEYS`` (the keys of ``Study.definition()``). Seeds, repeats, the margin
and the description are not part of it: a study rerun with more seeds is the same study.

Pure functions on dicts (no SQL, no pandas): the store's ``put_study`` check, ``merge`` and
``export`` all read identity through them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

IDENTITY_KEYS = ("workload", "workload_params", "configs", "reference", "vary", "base_seed", "budget")
_MISSING = object()


def identity(definition: dict) -> dict:
    """The identity part of a stored definition (absent keys left out)."""
    return {k: definition[k] for k in IDENTITY_KEYS if k in definition}


def definition_hash(definition: dict) -> str:
    """16 hex digits of SHA-256 over the identity part: equal for the same study parameters."""
    blob = json.dumps(identity(definition), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _key(k: Any) -> str:
    return str(k)


def _walk(a: Any, b: Any, path: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=_key):
            _walk(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else _MISSING
            y = b[i] if i < len(b) else _MISSING
            # configs are named: configs.cpu-2t.threads reads better than configs[1].threads
            named = isinstance(x, dict) and isinstance(y, dict) and x.get("name") is not None and x.get("name") == y.get("name")
            _walk(x, y, f"{path}.{x['name']}" if named else f"{path}[{i}]", out)
        return
    if a != b:
        out.append((path, a, b))


def differences(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """``[(field, value in a, value in b)]`` over the identity keys, in ``IDENTITY_KEYS`` order,
    nested fields dotted (``workload_params.train_size``, ``configs.cpu-2t.threads``).
    A key absent on one side reads as None."""
    out: list[tuple[str, Any, Any]] = []
    for k in IDENTITY_KEYS:
        _walk(a.get(k, _MISSING), b.get(k, _MISSING), k, out)
    return [(p, None if x is _MISSING else x, None if y is _MISSING else y) for p, x, y in out]


def show(v: Any, n: int = 40) -> str:
    """A value as a message shows it: short, one line."""
    s = repr(v) if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True, default=str)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def conflict_message(name: str, where: str, diffs: list[tuple[str, Any, Any]]) -> str:
    """One line: which study, the first field that differs (this one's value vs the stored one),
    and the way out."""
    field, mine, theirs = diffs[0]
    more = f" (and {len(diffs) - 1} more field(s))" if len(diffs) > 1 else ""
    return (
        f"study {name!r} is already in {where} with another definition: {field}: {show(mine)} vs {show(theirs)} "
        f"(this study vs the stored one){more}; run this one under another name with --name NEW, "
        "or use another --store"
    )
