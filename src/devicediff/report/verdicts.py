"""The report's reading of the verdicts of :func:`devicediff.analysis.stats.verdicts` (issue #13):
role-aware frames, plain-language sentences, seeds needed, run warnings and sequential looks.

Pure functions on the frames of ``devicediff.report.data.StudyData``; nothing here draws or
formats HTML. Columns used: ``config, metric, role, n, diff, ci95_*, ci90_*, p, p_adj,
tost_p_adj, margin, margin_pct, margin_source, verdict, note, reference, mean_ref``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

ROLES = ("primary", "secondary", "check")
PER_CLASS_PATTERN = r"^final_eval_acc_class_(\d+)$"


def role_verdicts(data) -> tuple[pd.DataFrame | None, str | None]:
    """The study's verdicts with roles, as the one read-side loader gives them
    (``analysis.load``), or ``(None, why)`` when it could not compute them."""
    v = data.verdicts
    if v is not None and "role" in v.columns:
        return v, None
    return None, getattr(data, "verdict_problem", None)


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def rel(x: Any, mean_ref: Any) -> float:
    """``x`` as a fraction of |mean_ref| (NaN when the reference mean is 0 or unknown)."""
    m = _f(mean_ref)
    return _f(x) / abs(m) if m and math.isfinite(m) else math.nan


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "?"
    v = 100 * x
    return f"{v:+.2g}%" if abs(v) < 100 else f"{v:+.0f}%"


def _p(p: Any) -> str:
    v = _f(p)
    if math.isnan(v):
        return "p n/a"
    return "p < 0.001" if v < 0.001 else f"p = {v:.2g}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def sentence(v: pd.DataFrame, metric: str) -> str:
    """One plain-language line for one metric, e.g. "cpu-2t is equivalent to cpu-1t within ±0.5%
    of final_eval_loss; gpu differs: +3%, p = 0.002 (n = 5, Holm-adjusted)"."""
    rows = v[v["metric"] == metric]
    if rows.empty:
        return f"no comparisons for {metric}"
    ref = rows["reference"].iloc[0] if "reference" in rows else "the reference"
    parts = []
    same = rows[rows["verdict"] == "identical"]
    if len(same):
        verb = "is" if len(same) == 1 else "are"
        parts.append(f"{_join(list(same['config']))} {verb} bitwise identical to {ref} on {metric}")
    eq = rows[rows["verdict"] == "equivalent"]
    if len(eq):
        r0 = eq.iloc[0]
        m = rel(r0["margin"], r0["mean_ref"])
        width = f"±{abs(100 * m):.2g}%" if math.isfinite(m) else f"±{_f(r0['margin']):.3g}"
        verb = "is" if len(eq) == 1 else "are"
        parts.append(f"{_join(list(eq['config']))} {verb} equivalent to {ref} within {width} of {metric}")
    for _, r in rows[rows["verdict"].isin(["differs", "inconclusive"])].iterrows():
        size = _pct(rel(r["diff"], r["mean_ref"]))
        if size == "?":
            size = f"{_f(r['diff']):+.3g}"
        how = f"n = {r['n']}, Holm-adjusted" if not pd.isna(r.get("p_adj")) else f"n = {r['n']}"
        word = "differs:" if r["verdict"] == "differs" else "is inconclusive:"
        parts.append(f"{r['config']} {word} {size}, {_p(r.get('p_adj'))} ({how})")
    for _, r in rows[rows["verdict"].astype(str).str.startswith("same on every run")].iterrows():
        parts.append(f"{r['config']}: {r['verdict']}")
    return "; ".join(parts) or f"no verdict for {metric}"


def seeds_needed(data, v: pd.DataFrame) -> tuple[dict[tuple[str, str], Any], str | None]:
    """{(config, metric): (seeds, goal, note)} for the inconclusive primary rows: seeds for a decided
    verdict at 80% power (:func:`devicediff.analysis.power.plan_table`, the loader's ``plan``
    when it has one), and a problem or None."""
    if v is None or v.empty or "in_family" not in v.columns or not (v["verdict"] == "inconclusive").any():
        return {}, None
    try:
        plan = getattr(data, "plan", None)
        if plan is None:
            from devicediff.analysis.power import plan_table

            plan = plan_table(v, roles=("primary",))
    except Exception as e:  # noqa: BLE001 - planning is an extra column
        return {}, f"seeds needed: {type(e).__name__}: {e}"
    out = {}
    for _, r in plan.iterrows():
        if r["verdict"] == "inconclusive":
            out[(r["config"], r["metric"])] = (r["seeds_needed"], r["goal"], r["note"])
    return out, None


def _warning_text(w: Any) -> str:
    return str(w.get("message", w)) if isinstance(w, dict) else str(w)


def run_warnings(data) -> dict[str, list[str]]:
    """{config: the distinct warnings its runs recorded in ``effective["warnings"]``}, in order;
    from the loader's ``warnings`` frame (config, seed, warning) when it has one."""
    out: dict[str, list[str]] = {}
    w = getattr(data, "warnings", None)
    if isinstance(w, pd.DataFrame):
        pairs = zip(w["config"], w["warning"])
    else:
        runs = data.runs
        pairs = [] if runs is None or runs.empty or "effective" not in runs.columns else (
            (c, x) for c, eff in zip(runs["config"], runs["effective"]) if isinstance(eff, dict)
            for x in (eff.get("warnings") or []))
    for cfg, text in pairs:
        t = _warning_text(text)
        seen = out.setdefault(str(cfg), [])
        if t and t not in seen:
            seen.append(t)
    return {c: ws for c, ws in out.items() if ws}


def _entries(seq: pd.DataFrame) -> list[dict]:
    """Look records: the loader's frame (one row per look, payload fields as columns) or raw
    analyses (a ``payload`` column, one look each or a ``looks`` list)."""
    if "payload" not in seq.columns:
        return [{k: x for k, x in r.items() if not (isinstance(x, float) and math.isnan(x))}
                for r in seq.to_dict("records")]
    out = []
    for p in seq["payload"]:
        if isinstance(p, dict) and isinstance(p.get("looks"), list):
            out.extend(e for e in p["looks"] if isinstance(e, dict))
        elif isinstance(p, dict):
            out.append(p)
    return out


def looks_summary(seq: pd.DataFrame | None) -> dict | None:
    """What ``run --until-decided`` recorded: the looks taken, the seeds at each, the planned
    number of looks, and each look's decisions. Tolerant of the record's shape."""
    if seq is None or not isinstance(seq, pd.DataFrame) or seq.empty:
        return None
    entries = _entries(seq)
    looks = []
    for i, e in enumerate(entries):
        dec = e.get("decisions") if isinstance(e.get("decisions"), dict) else {}
        if not dec and "decision" in e:
            dec = {str(e.get("config", "")) or "all": e["decision"]}
        dec = {str(k): (x.get("decision", "") if isinstance(x, dict) else x) for k, x in dec.items()}
        looks.append({"look": e.get("look", i + 1), "seeds": e.get("n", e.get("seeds")),
                      "decisions": {k: str(x) for k, x in dec.items()}})
    looks.sort(key=lambda x: (_f(x["look"]) if math.isfinite(_f(x["look"])) else 0))
    planned = next((e.get("n_looks") for e in reversed(entries) if e.get("n_looks") is not None), None)
    max_seeds = next((e.get("max_seeds") for e in reversed(entries) if e.get("max_seeds") is not None), None)
    n = len({str(x["look"]) for x in looks}) if looks else len(seq)
    return {"n_looks": n, "looks": looks, "planned": planned, "max_seeds": max_seeds}


def plot_frame(v: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Rows of ``metrics`` in % of the reference mean (x, ci90/ci95 ends, margin), NaN-safe; ±inf
    CI ends stay ±inf (the plot clips them)."""
    g = v[v["metric"].isin(metrics)].copy()
    if g.empty:
        return g
    mean = g["mean_ref"].astype(float).abs()
    scale = np.where((mean > 0) & np.isfinite(mean), 100.0 / mean.where(mean > 0, 1.0), np.nan)
    for src, dst in (("diff", "x"), ("ci90_low", "lo90"), ("ci90_high", "hi90"), ("ci95_low", "lo95"),
                     ("ci95_high", "hi95"), ("margin", "m")):
        with np.errstate(invalid="ignore"):
            g[dst] = g[src].astype(float) * scale
    return g[np.isfinite(scale)]
