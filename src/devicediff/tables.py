"""Terminal tables: what a person reads at the end of ``devicediff run`` and in ``status``.

Every table draws from one ``devicediff.analysis.load.Results`` (the read side the report
uses too); this module only lays numbers out.
"""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table

from devicediff.analysis.frames import bitwise_table, metric_columns, per_seed_table
from devicediff.analysis.load import Results, load_results
from devicediff.store import Store
from devicediff.study import Study

__all__ = ["print_study", "print_per_seed", "config_table", "failures_table", "verdicts_table", "per_seed_tables"]

CONFIG_METRICS = ("final_eval_loss", "final_eval_mse", "final_eval_ssim", "tail_train_loss")


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.3e}"


def _labels(r: Results) -> list[str]:
    """Config labels in definition order, configs without runs yet included."""
    return r.order + [c for c in r.pending if c not in r.order]


def config_table(r: Results) -> Table:
    """Per config: runs by state, mean ± sd of the headline metrics, bits against the reference."""
    pr, runs, reference = r.per_run, r.runs, r.reference
    metrics = [m for m in metric_columns(pr) if m in CONFIG_METRICS]
    bits = bitwise_table(runs, reference).set_index("config") if len(runs) else pd.DataFrame()
    title = f"{r.name}: per config (mean ± sd over seeds)"
    if r.by_machine:
        title += "; runs of different machines kept apart (CONFIG@MACHINE)"
    t = Table(title=title, title_justify="left")
    t.add_column("config")
    t.add_column("runs", justify="right")
    for m in metrics:
        t.add_column(m, justify="right")
    t.add_column("bits = ref", justify="right")
    t.add_column("repeatable", justify="right")
    fin = r.finished
    for label in _labels(r):
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
    for _, row in bad.iterrows():
        t.add_row(row["config"], str(row["seed"]), row["state"], str(row["error"] or "")[:150])
    return t


def verdicts_table(r: Results) -> Table | None:
    """The verdict of every config against the reference, as the loader computed it."""
    v = r.verdicts
    if v is None or v.empty:
        return None
    t = Table(title=f"verdicts vs {r.reference} (Holm-corrected over {len(v)} comparisons)", title_justify="left")
    for c in ("config", "metric", "n", "diff", "95% CI", "p (Holm)", "margin", "verdict"):
        t.add_column(c, justify="right" if c not in ("config", "metric", "verdict") else "left")
    for _, row in v.iterrows():
        t.add_row(
            row["config"], row["metric"], str(row["n"]), _fmt(row["diff"]), f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]",
            _fmt(row["p_holm"]), "±" + _fmt(row["margin"]), row["verdict"],
        )
    return t


def per_seed_tables(r: Results) -> list[Table]:
    """One table per primary metric: config × seed → the metric's final value (first runs)."""
    out = []
    for metric in r.primary:
        grid = per_seed_table(r.per_run, metric, _labels(r))
        t = Table(title=f"{r.name}: {metric} per seed", title_justify="left")
        t.add_column("config")
        for seed in grid.columns:
            t.add_column(f"seed {seed}", justify="right")
        for label, values in grid.iterrows():
            t.add_row(label + (" (ref)" if label == r.reference else ""), *[_fmt(float(x)) for x in values])
        out.append(t)
    return out


def print_study(console: Console, study: Study | str, store: Store, *, verdicts: bool = True) -> None:
    """The per-config table, the runs that did not finish and (``verdicts``) the verdicts."""
    r = load_results(store, study, verdicts=verdicts)
    if r.runs.empty:
        console.print(f"{r.name}: no runs in the store yet")
        return
    console.print(config_table(r))
    ft = failures_table(r.runs)
    if ft is not None:
        console.print(ft)
    vt = verdicts_table(r) if verdicts else None
    if vt is not None:
        console.print(vt)


def print_per_seed(console: Console, study: Study | str, store: Store) -> None:
    """``status --per-seed``: config × seed → final value of each primary metric."""
    r = load_results(store, study, verdicts=False)
    if r.runs.empty:
        console.print(f"{r.name}: no runs in the store yet")
        return
    tables = per_seed_tables(r)
    if not tables:
        console.print(f"{r.name}: no finished run has a metric yet")
    for t in tables:
        console.print(t)
