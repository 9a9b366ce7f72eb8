"""Tables a person reads at the end of ``devicediff run`` and in ``status``."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table

from devicediff.analysis.frames import bitwise_table, config_identity, metric_columns, per_run
from devicediff.store import Store
from devicediff.study import Study


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.3e}"


def study_frames(store: Store, study: Study) -> tuple[pd.DataFrame, pd.DataFrame, str, list[str], bool]:
    """``(runs, per_run, reference_label, labels, by_machine)``: configs labelled as the report
    labels them (``NAME@MACHINE`` once a config has runs from several machines, never pooled);
    ``labels`` in definition order, configs without runs yet included."""
    runs = store.runs(study.study_id)
    metrics = store.metrics(list(runs["run_id"])) if len(runs) else store.metrics([])
    names = [c.name for c in study.configs]
    runs, ref, _, by_machine, labels = config_identity(runs, study.reference, names)
    ran = set(runs["base_config"]) if len(runs) else set()
    labels += [n for n in names if n not in ran]
    return runs, per_run(runs, metrics), ref, labels, by_machine


def config_table(study: Study, runs: pd.DataFrame, pr: pd.DataFrame, reference: str, labels: list[str],
                 by_machine: bool = False) -> Table:
    metrics = [m for m in metric_columns(pr) if m in ("final_eval_loss", "final_eval_mse", "final_eval_ssim", "tail_train_loss")]
    bits = bitwise_table(runs, reference).set_index("config") if len(runs) else pd.DataFrame()
    title = f"{study.name}: per config (mean ± sd over seeds)"
    if by_machine:
        title += "; runs of different machines kept apart (CONFIG@MACHINE)"
    t = Table(title=title, title_justify="left")
    t.add_column("config")
    t.add_column("runs", justify="right")
    for m in metrics:
        t.add_column(m, justify="right")
    t.add_column("bits = ref", justify="right")
    t.add_column("repeatable", justify="right")
    fin = pr[pr["state"] == "finished"] if len(pr) else pr
    for label in labels:
        g = runs[runs["config"] == label] if len(runs) else runs
        counts = g["state"].value_counts().to_dict() if len(g) else {}
        runs_txt = f"{counts.get('finished', 0)}" + "".join(
            f" +{counts[s]} {s}" for s in ("failed", "skipped", "running") if counts.get(s)
        )
        row = [label + (" (ref)" if label == reference else ""), runs_txt]
        fg = fin[fin["config"] == label] if len(fin) else fin
        for m in metrics:
            v = fg[m].dropna() if m in fg else pd.Series(dtype=float)
            row.append(f"{_fmt(v.mean())} ± {_fmt(v.std(ddof=1) if len(v) > 1 else float('nan'))}" if len(v) else "–")
        b = bits.loc[label] if label in bits.index else None
        row.append(str(b["matches_reference"]) if b is not None else "–")
        rep = b["repeatable"] if b is not None else None
        row.append("–" if rep is None or (isinstance(rep, float) and math.isnan(rep)) else ("yes" if rep else "no"))
        t.add_row(*row)
    return t


def failures_table(runs: pd.DataFrame) -> Table | None:
    bad = runs[runs["state"].isin(["failed", "skipped"])]
    if bad.empty:
        return None
    t = Table(title="runs that did not finish", title_justify="left")
    for c in ("config", "seed", "state", "reason"):
        t.add_column(c)
    for _, r in bad.iterrows():
        t.add_row(r["config"], str(r["seed"]), r["state"], str(r["error"] or "")[:150])
    return t


def verdicts_table(study: Study, pr: pd.DataFrame, reference: str) -> Table | None:
    """The verdict of every config against the reference (devicediff.analysis.stats)."""
    try:
        from devicediff.analysis.stats import verdict_table
    except ImportError:  # pragma: no cover
        return None
    fin = pr[pr["state"] == "finished"]
    metrics = [m for m in metric_columns(fin) if fin[m].notna().any()]
    if fin.empty or not metrics or fin["config"].nunique() < 2 or reference not in set(fin["config"]):
        return None
    v = verdict_table(fin, metrics, reference, margin=study.margin, margin_fraction=study.margin_fraction)
    t = Table(title=f"verdicts vs {reference} (Holm-corrected over {len(v)} comparisons)", title_justify="left")
    for c in ("config", "metric", "n", "diff", "95% CI", "p (Holm)", "margin", "verdict"):
        t.add_column(c, justify="right" if c not in ("config", "metric", "verdict") else "left")
    for _, r in v.iterrows():
        t.add_row(
            r["config"], r["metric"], str(r["n"]), _fmt(r["diff"]), f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            _fmt(r["p_holm"]), "±" + _fmt(r["margin"]), r["verdict"],
        )
    return t


def print_study(console: Console, study: Study, store: Store, *, verdicts: bool = True) -> None:
    runs, pr, reference, labels, by_machine = study_frames(store, study)
    if runs.empty:
        console.print(f"{study.name}: no runs in the store yet")
        return
    console.print(config_table(study, runs, pr, reference, labels, by_machine))
    ft = failures_table(runs)
    if ft is not None:
        console.print(ft)
    if verdicts:
        vt = verdicts_table(study, pr, reference)
        if vt is not None:
            console.print(vt)
