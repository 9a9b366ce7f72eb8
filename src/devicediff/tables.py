"""Terminal tables: what a person reads at the end of ``devicediff run`` and in ``status``.

Every table draws from one ``devicediff.analysis.load.Results`` (the read side the report
uses too); this module only lays numbers out.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from devicediff.analysis.churn import MAX_PLAN
from devicediff.analysis.frames import bitwise_table, metric_columns, per_seed_table
from devicediff.analysis.load import Results, load_results, runs_churn
from devicediff.analysis.stats import seeds_phrase  # noqa: F401 - re-exported
from devicediff.store import Store
from devicediff.study import Study

__all__ = ["print_study", "print_per_seed", "print_plan", "config_table", "failures_table", "verdicts_table",
           "churn_table", "per_seed_tables", "check_lines", "note_lines", "plan_table", "sequential_line",
           "sequential_table"]

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
    have = metric_columns(pr)
    metrics = [m for m in r.primary if m in have] + [m for m in have if m in CONFIG_METRICS and m not in r.primary]
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
    bad = runs[runs["state"].isin(["failed", "skipped", "interrupted", "running"])]
    if bad.empty:
        return None
    t = Table(title="runs that did not finish", title_justify="left")
    for c in ("config", "seed", "state", "reason"):
        t.add_column(c)
    for _, row in bad.iterrows():
        t.add_row(row["config"], str(row["seed"]), row["state"], str(row["error"] or "")[:150])
    return t


def _pval(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return "<1e-4" if p < 1e-4 else f"{p:.2g}"


def _ci(low, high) -> str:
    if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in (low, high)):
        return "–"
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _margin(row) -> str:
    """``±abs (pct%, fixed|seed-sd)``."""
    m = row["margin"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    pct = row.get("margin_pct")
    pct_txt = f"{pct:.2g}%, " if pct is not None and np.isfinite(pct) else ""
    return f"±{_fmt(m)} ({pct_txt}{row.get('margin_source', '')})"


def _seeds_needed(r: Results) -> dict[tuple[str, str], str]:
    """{(config, metric): text} for the inconclusive primary rows: seeds for 80% power (plan_table)."""
    v = r.verdicts
    if v is None or not ((v["role"] == "primary") & (v["verdict"] == "inconclusive")).any():
        return {}
    plan = r.plan
    out = {}
    for _, p in plan[plan["verdict"] == "inconclusive"].iterrows():
        n = p["seeds_needed"]
        out[(p["config"], p["metric"])] = f"{n} for {p['goal']}" if not pd.isna(n) else (p["note"] or "–")
    return out


def verdicts_table(r: Results) -> Table | None:
    """The verdict of every config against the reference on the primary metric(s) (confirmatory)
    and the secondary ones (exploratory), as the loader computed them. Checks and identical
    configs are rows too; ``check_lines`` says the checks in one line each."""
    v = r.verdicts
    if v is None or v.empty:
        return None
    tested = v[v["role"] != "check"]
    if tested.empty:
        return None
    fam = {role: int(((v["role"] == role) & v["in_family"]).sum()) for role in ("primary", "secondary")}
    title = (f"verdicts vs {r.reference}: primary {', '.join(r.primary) or '–'} (confirmatory, Holm over "
             f"{fam['primary']}); secondary (exploratory, Holm over {fam['secondary']})")
    t = Table(title=title, title_justify="left")
    for c in ("config", "metric", "role", "n", "diff", "95% CI", "p_adj", "TOST p_adj", "margin", "verdict",
              "seeds needed"):
        t.add_column(c, justify="left" if c in ("config", "metric", "role", "verdict", "margin") else "right")
    needed = _seeds_needed(r)
    for _, row in tested.iterrows():
        t.add_row(
            row["config"], row["metric"], row["role"], str(row["n"]), _fmt(row["diff"]),
            _ci(row["ci95_low"], row["ci95_high"]), _pval(row["p_adj"]), _pval(row["tost_p_adj"]), _margin(row),
            row["verdict"], needed.get((row["config"], row["metric"]), ""),
        )
    return t


CHURN_WORDS = {"more": "more than a seed change", "less": "less than a seed change", "inconclusive": "inconclusive"}


def churn_table(r: Results, churn: pd.DataFrame) -> Table | None:
    """Does a config change what the network predicts more than a change of seed does? Per config,
    its churn against the reference at the same seed, the seed churn, and the sign-flip verdict
    (``analysis.churn.churn_table``, as the report shows it)."""
    if churn is None or churn.empty:
        return None
    t = Table(title=f"predictions vs {r.reference} at the same seed (churn: share of held-out inputs "
                    f"predicted as another class; seed churn: {r.reference} against itself at another seed)",
              title_justify="left")
    for c in ("config", "n", "churn", "seed churn", "ratio", "p more (Holm)", "p less (Holm)", "verdict",
              "seeds needed"):
        t.add_column(c, justify="left" if c in ("config", "verdict") else "right")
    rank = {c: i for i, c in enumerate(r.order)}
    for _, row in churn.sort_values("config", key=lambda c: c.map(lambda x: rank.get(x, len(rank)))).iterrows():
        t.add_row(row["config"], str(int(row["n"])), f"{100 * row['churn_mean']:.3g}%",
                  f"{100 * row['floor_mean']:.3g}%", f"{row['ratio']:.2g}", _pval(row["p_more_holm"]),
                  _pval(row["p_less_holm"]), CHURN_WORDS.get(row["verdict"], str(row["verdict"])),
                  _churn_need(row))
    return t


def _churn_need(row) -> str:
    if not row.get("seeds_for"):
        return ""
    n = row["seeds_needed"]
    return f"{'> ' + str(MAX_PLAN) if math.isnan(n) else f'{n:.0f}'} for {row['seeds_for']}"


def check_lines(r: Results) -> list[str]:
    """One line per check metric: "final_baseline_mse: same data on every run: yes"."""
    v = r.verdicts
    if v is None or v.empty:
        return []
    out = []
    for metric, g in v[v["role"] == "check"].groupby("metric", sort=False):
        bad = list(g.loc[~g["verdict"].str.endswith("yes"), "config"])
        out.append(f"check {metric}: same data on every run: " + ("yes" if not bad else f"no ({', '.join(bad)})"))
    return out


def note_lines(r: Results) -> list[str]:
    """What a reader must know beside the numbers: how the primary metric was chosen, the primary
    rows' notes (constant offsets, small n, identical configs), the runs' own warnings."""
    out = [r.verdict_note] if r.verdict_note else []
    v = r.verdicts
    if v is not None and len(v):
        for _, row in v[v["role"] == "primary"].iterrows():
            parts = [p for p in (row["note"] or "").split("; ") if p and not p.startswith("confirmatory:")]
            if parts:
                out.append(f"{row['config']} {row['metric']}: {'; '.join(parts)}")
    w = r.warnings
    if len(w):
        for (cfg, text), g in w.groupby(["config", "warning"], sort=False):
            seeds = sorted(g["seed"].unique())
            out.append(f"warning, {cfg} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}): {text}")
    return out


def plan_rows(r: Results) -> pd.DataFrame:
    """``devicediff plan``: per config and primary metric, the verdict now and the seeds needed for a
    decided verdict at 80% power (``power.plan_table``)."""
    plan = r.plan
    return plan if plan is not None else pd.DataFrame()


def plan_table(r: Results) -> Table | None:
    p = plan_rows(r)
    if p.empty:
        return None
    t = Table(title=f"{r.name}: seeds for a decided primary verdict vs {r.reference} (80% power)", title_justify="left")
    for c in ("config", "metric", "n now", "verdict now", "diff", "sd of diffs", "margin", "power now",
              "goal", "seeds needed", "note"):
        t.add_column(c, justify="right" if c in ("n now", "diff", "sd of diffs", "margin", "power now",
                                                 "seeds needed") else "left")
    for _, row in p.iterrows():
        pw = row["power_equivalent"] if row["goal"] == "equivalent" else row["power_differs"]
        need = row["seeds_needed"]
        t.add_row(row["config"], row["metric"], str(row["n"]), row["verdict"], _fmt(row["diff"]), _fmt(row["sd_diff"]),
                  "±" + _fmt(row["margin"]), _pval(pw) if row["goal"] else "–", row["goal"] or "–",
                  "–" if pd.isna(need) else str(need), row["note"] or "")
    return t


def print_plan(console: Console, study: Study | str, store: Store) -> None:
    """``devicediff plan STUDY --store PILOT``: from the pilot's runs, how many seeds each config
    needs for a decided verdict (differs or equivalent) on each primary metric at 80% power. The
    family level alpha/m (m = configs x primary metrics) is used, so the counts hold for the study
    as a whole; the sd and effect are estimates from the pilot (rough with 3-5 seeds)."""
    r = load_results(store, study)
    if r.runs.empty:
        console.print(f"{r.name}: no runs in the store yet; run a pilot first (e.g. 3-5 seeds)")
        return
    if r.verdicts is None:
        console.print(f"{r.name}: no verdicts to plan from ({r.verdict_problem or 'no metrics'})")
        return
    t = plan_table(r)
    if t is None:
        console.print(f"{r.name}: no primary metric to plan for")
        return
    console.print(t)
    p = plan_rows(r)
    need = p["seeds_needed"].dropna()
    if len(need) and (p["goal"] != "").all():
        console.print(f"most seeds any config needs: {int(need.max())} (the pilot has {int(p['n'].max())}); "
                      f"or let the run stop when decided: devicediff run STUDY --until-decided "
                      f"--max-seeds {max(int(need.max()), int(p['n'].max()) + 1)}", highlight=False)
    for line in note_lines(r):
        console.print(line, highlight=False)


def per_seed_tables(r: Results) -> list[Table]:
    """One table per primary metric: config × seed → the metric's final value (first runs); seeds
    as columns, or as rows when there are more than 8 and more seeds than configs (20 seeds do not
    fit across a terminal)."""
    out = []
    for metric in r.primary:
        grid = per_seed_table(r.per_run, metric, _labels(r))
        grid.index = [label + (" (ref)" if label == r.reference else "") for label in grid.index]
        t = Table(title=f"{r.name}: {metric} per seed", title_justify="left")
        if len(grid.columns) > max(8, len(grid.index)):
            grid, corner, head = grid.T, "seed", str
        else:
            corner, head = "config", lambda seed: f"seed {seed}"
        t.add_column(corner)
        for col in grid.columns:
            t.add_column(head(col), justify="right")
        for label, values in grid.iterrows():
            t.add_row(str(label), *[_fmt(float(x)) for x in values])
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
        for line in check_lines(r) + note_lines(r):
            console.print(line, highlight=False)
    elif verdicts and r.verdict_problem:
        console.print(r.verdict_problem, highlight=False)
    ct = churn_table(r, runs_churn(store, r.runs, r.reference)) if verdicts else None
    if ct is not None:
        console.print(ct)
    st = sequential_table(r) if verdicts else None
    if st is not None:
        console.print(st)
        console.print(sequential_line(r), highlight=False)


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


def last_looks(r: Results) -> pd.DataFrame:
    """The looks of the latest ``--until-decided`` design (same max seeds and batch as the last
    look recorded), in order; empty when none."""
    looks = r.sequential
    if looks is None or looks.empty:
        return pd.DataFrame()
    last = looks.iloc[-1]
    same = looks[(looks.get("max_seeds") == last.get("max_seeds")) & (looks.get("batch") == last.get("batch"))]
    return same.sort_values("look")


def sequential_line(r: Results) -> str:
    """How many looks ``run --until-decided`` took, and where it stopped."""
    looks = last_looks(r)
    last = looks.iloc[-1]
    n = int(last["look"])
    return (f"until decided (group-sequential, alpha spent over looks; max {last['max_seeds']} seeds, batch "
            f"{last['batch']}): {n} look{'s' if n != 1 else ''} taken, {last['seeds']} seeds at the last; "
            f"{last['status']}")


def sequential_table(r: Results) -> Table | None:
    """The sequential decision of every (config, primary metric) at its deciding look (or the last):
    the verdict of an ``--until-decided`` study (the fixed-n table above re-tests the pooled seeds
    and is not corrected for the looks)."""
    looks = last_looks(r)
    if looks.empty:
        return None
    comps = looks.iloc[-1]["comparisons"] or []
    t = Table(title=f"{r.name}: until-decided decisions vs {r.reference}", title_justify="left")
    for c in ("config", "metric", "decision", "at look", "n", "diff", "p", "level", "TOST p", "level (each side)",
              "margin"):
        t.add_column(c, justify="left" if c in ("config", "metric", "decision") else "right")
    for c in comps:
        tost = max(c.get("p_low", math.nan), c.get("p_high", math.nan))
        t.add_row(str(c["config"]), str(c["metric"]), str(c["decision"]), str(c.get("look", "")), str(c.get("n", "")),
                  _fmt(c.get("diff")), _pval(c.get("p")), _pval(c.get("level_two")), _pval(tost),
                  _pval(c.get("level_one")), "±" + _fmt(c.get("margin")))
    return t
