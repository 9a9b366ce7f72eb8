"""Study efficiency for the report (issue #17): Σ(runs' train + eval time) / (wall × slots), and
where the rest went, from :func:`devicediff.analysis.efficiency.efficiency` when that module is
present and the runs carry their timing.

Wall time and slots come from what ``run`` stored about its sessions (analyses of kind
``session`` / ``efficiency`` with ``wall`` and ``slots``); without them they are estimated from
the runs' own intervals ``[finished_at - wall_time, finished_at]``: wall = the length of their
union (gaps between resumed sessions do not count), slots = the most runs at once.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def estimate_wall_slots(runs: pd.DataFrame) -> tuple[float, int]:
    """(wall seconds, slots) from the runs' intervals; (nan, 0) without timestamps."""
    if runs is None or runs.empty or not {"finished_at", "wall_time"} <= set(runs.columns):
        return math.nan, 0
    iv = sorted((e - w, e) for e, w in zip(runs["finished_at"].map(_num), runs["wall_time"].map(_num))
                if math.isfinite(e) and math.isfinite(w) and w >= 0)
    if not iv:
        return math.nan, 0
    wall, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > cur_e:
            wall += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    wall += cur_e - cur_s
    events = sorted([(s, 1) for s, _ in iv] + [(e, -1) for _, e in iv], key=lambda t: (t[0], t[1]))
    slots = now = 0
    for _, step in events:
        now += step
        slots = max(slots, now)
    return wall, slots


def _session_wall_slots(sessions: pd.DataFrame) -> tuple[float, int] | None:
    if sessions is None or sessions.empty:
        return None
    wall, slots = 0.0, 0
    for p in sessions["payload"]:
        if not isinstance(p, dict):
            continue
        w = _num(p.get("wall", p.get("wall_s", p.get("wall_time"))))
        k = _num(p.get("slots"))
        if math.isfinite(w) and math.isfinite(k):
            wall += w
            slots = max(slots, int(k))
    return (wall, slots) if slots else None


def study_efficiency(runs: pd.DataFrame, sessions: pd.DataFrame | None) -> tuple[dict | None, str | None]:
    """``({"result": efficiency(...) dict, "wall": s, "slots": k, "source": text}, None)``, or
    ``(None, reason)`` when the module or the timing is missing."""
    try:
        from devicediff.analysis.efficiency import efficiency
    except Exception:  # noqa: BLE001 - optional: the section is left out
        return None, None
    fin = runs[runs["state"] == "finished"] if runs is not None and len(runs) else runs
    if fin is None or fin.empty or "train_time" not in fin.columns or not fin["train_time"].map(_num).notna().any():
        return None, "efficiency: the runs carry no timing"
    ws = _session_wall_slots(sessions)
    source = "recorded by run"
    if ws is None:
        ws, source = estimate_wall_slots(runs), "estimated from the runs' start and end times"
    wall, slots = ws
    if not (math.isfinite(wall) and wall > 0 and slots > 0):
        return None, "efficiency: no wall time or slots known"
    try:
        result = efficiency(runs, wall, slots)
    except Exception as e:  # noqa: BLE001
        return None, f"efficiency: {type(e).__name__}: {e}"
    return {"result": result if isinstance(result, dict) else {}, "wall": wall, "slots": slots,
            "source": source}, None
