"""The one read side: a study's records in a store, as the frames every reader starts from.

``load_results(store, study)`` feeds ``devicediff status``, the table at the end of
``devicediff run``, ``devicediff plan``, ``devicediff export`` (``verdicts.csv``), the report
(``devicediff.report.data``) and notebooks (``Store.verdicts``): the runs with config identity
applied (``NAME@MACHINE`` once a config ran on several machines,
:func:`devicediff.analysis.frames.config_identity`), their metrics, the final values per run
(:func:`devicediff.analysis.frames.per_run`) and the verdicts
(:func:`devicediff.analysis.stats.verdicts`: primary metrics in the confirmatory family,
the others secondary, data-only metrics as checks; docs/statistics.md).

Which metrics are primary: the study's ``[verdict] primary``, else the workload's declared
``primary_metrics`` (read from its source without importing it, :func:`declared_metrics`), else
the first evaluation metric (said in ``Results.verdict_note``). Checks: the workload's
``check_metrics`` plus any metric that is the same on every run. Per-class accuracies
(``final_eval_acc_class_<k>``) are their own family (:func:`devicediff.analysis.churn.per_class_table`,
``Results.per_class``), never part of the main table.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from devicediff.analysis import frames
from devicediff.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from devicediff.store import Store
    from devicediff.study import Study

__all__ = ["Results", "load_results", "verdicts", "find_study", "declared_metrics", "metric_column",
           "COMPAT_COLUMNS", "PER_CLASS_RE"]

#: per-class accuracy columns: a family of their own (``Results.per_class``)
PER_CLASS_RE = re.compile(r"^final_eval_acc_class_(\d+)$")
#: columns of the old verdict table kept as aliases on ``Results.verdicts`` so that readers written
#: for it keep working: ci_low/ci_high = ci95_*, p_holm = p_adj, tost_p_holm = tost_p_adj, ...
COMPAT_COLUMNS = ["ci_low", "ci_high", "p_holm", "tost_p_holm", "rel_diff", "mean_cfg", "paired", "test",
                  "n_ref", "n_cfg", "n_seeds_needed"]


@dataclass(frozen=True, kw_only=True)
class Results:
    """One study's records. Frames are shared, not copied: treat them as read-only."""

    study_id: str
    name: str
    definition: dict  # as stored (``Study.to_dict()``)
    reference: str  # label of the reference (config, or config@machine)
    reference_config: str  # the study's reference config name
    reference_machine: str | None
    order: list[str]  # config labels with runs: definition order, reference machine first
    pending: list[str]  # configs of the definition without any run yet
    by_machine: bool  # labels carry the machine (a config ran on several machines)
    machines: list[str]
    runs: pd.DataFrame  # every run; ``config`` is the label, ``base_config`` the study's name
    metrics: pd.DataFrame  # run_id, step, name, value
    per_run: pd.DataFrame  # one row per run: keys, final_<metric>, auc_/tail_train_loss
    verdict_metrics: list[str]  # per-run metrics with values in finished runs, primary first (no per-class)
    verdicts: pd.DataFrame | None  # stats.VERDICT_COLUMNS + COMPAT_COLUMNS; None: not asked for / not computable
    verdict_problem: str | None = None
    # -- issue #13 ---------------------------------------------------------------------------
    primary: list[str] = field(default_factory=list)  # per-run columns of the confirmatory question
    primary_source: str = ""  # "study" ([verdict] primary), "workload" (declared), "fallback", "" (none)
    checks: list[str] = field(default_factory=list)  # declared check columns (constant ones are found too)
    verdict_note: str = ""  # how the primary metric was chosen, when it was not declared
    per_class: pd.DataFrame | None = None  # churn.per_class_table (own Holm family); None: no such metrics
    warnings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["config", "seed", "warning"]))
    sequential: pd.DataFrame | None = None  # looks of ``run --until-decided`` (store analyses, kind "sequential")

    @property
    def finished(self) -> pd.DataFrame:
        """``per_run`` of the finished runs."""
        pr = self.per_run
        return pr[pr["state"] == "finished"] if len(pr) else pr

    @property
    def headline(self) -> str | None:
        return self.verdict_metrics[0] if self.verdict_metrics else None

    @functools.cached_property
    def plan(self) -> pd.DataFrame | None:
        """:func:`devicediff.analysis.power.plan_table` of the primary rows (seeds for a decided
        verdict at 80% power); computed on first use (about 0.25 s a row), None without verdicts."""
        if self.verdicts is None or not len(self.verdicts):
            return None
        from devicediff.analysis import power

        return power.plan_table(self.verdicts, roles=("primary",))


# -- which metrics are primary -------------------------------------------------------------------


def _module_source(module: str, study_dir: Path | None) -> Path | None:
    if module.endswith(".py"):
        p = Path(module)
        if not p.is_absolute() and study_dir is not None:
            p = study_dir / p
        return p if p.is_file() else None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _class_attrs(tree: ast.Module, name: str, seen: frozenset = frozenset()) -> dict:
    """Literal ``primary_metrics`` / ``check_metrics`` of class ``name`` (or of the class a function
    ``name`` is annotated to return), following bases defined in the same module."""
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    node = defs.get(name)
    if isinstance(node, ast.FunctionDef):
        ret = node.returns
        ret = ret.value if isinstance(ret, ast.Constant) and isinstance(ret.value, str) else getattr(ret, "id", None)
        return _class_attrs(tree, ret, seen) if ret and ret not in seen else {}
    if not isinstance(node, ast.ClassDef) or name in seen:
        return {}
    out = {}
    for base in node.bases:
        if isinstance(base, ast.Name):
            out.update(_class_attrs(tree, base.id, seen | {name}))
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id in ("primary_metrics", "check_metrics") and stmt.value is not None:
                try:
                    v = ast.literal_eval(stmt.value)
                except ValueError:
                    continue
                out[t.id] = (v,) if isinstance(v, str) else tuple(v)
    return out


def declared_metrics(workload: str, study_dir: Path | None = None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(primary_metrics, check_metrics)`` a workload declares, read from its source with ``ast``
    (nothing is imported, so no framework loads); None when it declares no primary metric or its
    source cannot be found (a plugin built at run time, a moved file)."""
    try:
        from devicediff.workloads import _target

        target = _target(workload)
    except Exception:  # noqa: BLE001 - an unknown workload simply declares nothing
        return None
    module, _, name = target.rpartition(":")
    src = _module_source(module, study_dir)
    if src is None:
        return None
    try:
        attrs = _class_attrs(ast.parse(src.read_text(encoding="utf-8")), name)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    if not attrs.get("primary_metrics"):
        return None
    return tuple(attrs["primary_metrics"]), tuple(attrs.get("check_metrics", ()))


def metric_column(name: str, columns) -> str | None:
    """The per-run column of a metric name: ``eval_mse`` -> ``final_eval_mse``; a column name
    (``final_eval_mse``, ``tail_train_loss``) stays itself; None if the study recorded neither."""
    cols = set(columns)
    for c in (f"final_{name}", name):
        if c in cols:
            return c
    return None


def _roles(d: dict, vmetrics: list[str]) -> tuple[list[str], list[str], str, str]:
    """``(primary columns, declared check columns, source, note)`` for a study definition."""
    declared = declared_metrics(str(d.get("workload", "")))
    checks = [c for c in (metric_column(m, vmetrics) for m in (declared[1] if declared else ())) if c]
    notes = []
    for source, names in (("study", d.get("primary") or ()), ("workload", declared[0] if declared else ())):
        if not names:
            continue
        cols = [metric_column(m, vmetrics) for m in names]
        missing = [m for m, c in zip(names, cols) if c is None]
        if missing:
            notes.append(f"primary metric(s) {', '.join(missing)} ({source}) not recorded by any finished run")
        cols = [c for c in cols if c]
        if cols:
            return list(dict.fromkeys(cols)), [c for c in checks if c not in cols], source, "; ".join(notes)
    evals = [m for m in vmetrics if m.startswith("final_eval")] or [m for m in vmetrics if m not in checks]
    if not evals:
        return [], checks, "", "; ".join(notes)
    notes.append(f"primary metric: {evals[0]} (the workload declares none: its first evaluation metric)")
    return [evals[0]], checks, "fallback", "; ".join(notes)


def find_study(store: Store, study) -> tuple[str, str, dict]:
    """``(study_id, name, definition)`` of ``study``: a ``Study``, a row of ``store.studies()``,
    or a study id or name (a name that several stored studies share is an error naming their ids)."""
    if isinstance(study, pd.Series):
        d = study["definition"]
        return str(study["study_id"]), str(study["name"]), d if isinstance(d, dict) else {}
    studies = store.studies()
    if not isinstance(study, str):  # a Study: the stored definition (merged seed lists), else its own
        hit = studies[studies["study_id"] == study.study_id]
        d = hit["definition"].iloc[0] if len(hit) else study.to_dict()
        return study.study_id, study.name, d if isinstance(d, dict) else {}
    for col in ("study_id", "name"):
        hit = studies[studies[col] == study]
        if len(hit) == 1:
            return find_study(store, hit.iloc[0])
        if len(hit) > 1:
            raise UsageError(f"study name {study!r} names {len(hit)} studies in {store.where}; "
                             f"give one of their ids: {', '.join(hit['study_id'])}")
    names = ", ".join(sorted(map(str, pd.unique(studies["name"])))) or "no studies"
    raise UsageError(f"no study {study!r} in {store.where}; it holds: {names}")


def load_results(store: Store, study, *, verdicts: bool = True) -> Results:
    """Everything the tables, the report and notebooks read about one study.

    ``study``: a ``Study``, a row of ``store.studies()``, or a study id or name.
    ``verdicts=False`` skips the statistics (``status`` shows none; they take a moment).
    """
    study_id, name, d = find_study(store, study)
    reference = d.get("reference", "") or ""
    config_order = [c.get("name") for c in d.get("configs", []) if isinstance(c, dict)]
    runs = store.runs(study_id)
    metrics = store.metrics(list(runs["run_id"]) if len(runs) else [])
    runs, ref_label, ref_machine, by_machine, order = frames.config_identity(runs, reference, config_order)
    if len(runs):
        pr = frames.per_run(runs, metrics)
        pr = pr.merge(runs[["run_id", "base_config"]], on="run_id", how="left")
    else:
        pr = pd.DataFrame(columns=[*frames.RUN_KEYS, "base_config"])
    ran = set(runs["base_config"]) if len(runs) else set()
    fin = pr[pr["state"] == "finished"] if len(pr) else pr
    vmetrics = [m for m in frames.metric_columns(fin) if fin[m].notna().any() and not PER_CLASS_RE.match(m)] \
        if len(fin) else []
    primary, checks, source, note = _roles(d, vmetrics)
    vmetrics = primary + [m for m in vmetrics if m not in primary]
    table, problem, per_class = None, None, None
    sequential = _looks(store, study_id)
    last = _last_look(sequential, fin, ref_label)
    if verdicts:
        frozen = {m: v for m, v in (last or {}).get("margins", {}).items() if m in primary}
        table, problem = _verdicts(fin, vmetrics, ref_label, d, primary, checks, frozen or None)
        table = _sequential_decisions(table, last)
        per_class = _per_class(fin, ref_label)
    return Results(
        study_id=study_id, name=name, definition=d, reference=ref_label, reference_config=reference,
        reference_machine=ref_machine, order=order, pending=[c for c in config_order if c not in ran],
        by_machine=by_machine, machines=list(pd.unique(runs["machine"])) if len(runs) else [],
        runs=runs, metrics=metrics, per_run=pr, verdict_metrics=vmetrics, verdicts=table, verdict_problem=problem,
        primary=primary, primary_source=source, checks=checks, verdict_note=note, per_class=per_class,
        warnings=run_warnings(runs), sequential=sequential,
    )


def _verdicts(fin: pd.DataFrame, metrics: list[str], reference: str, d: dict, primary: list[str],
              checks: list[str], frozen: dict | None = None) -> tuple[pd.DataFrame | None, str | None]:
    try:
        from devicediff.analysis import stats
    except Exception:  # noqa: BLE001 - the rest of the read side works without the statistics
        return None, "statistics unavailable: devicediff.analysis.stats could not be imported"
    if not metrics:
        return None, None
    if fin["config"].nunique() < 2:
        return None, "verdicts: fewer than two configs have finished runs"
    if reference not in set(fin["config"]):
        return None, f"verdicts: the reference {reference} has no finished runs"
    # A study's fixed margin is in the primary metric's units: it applies to the primary metrics,
    # the others take the seed-sd margin (an absolute number cannot fit MSE and SSIM at once).
    margin = {m: d["margin"] for m in primary} if d.get("margin") is not None else frozen
    try:
        table = stats.verdicts(fin, primary, reference, metrics=metrics, checks=checks, margin=margin,
                               margin_fraction=d.get("margin_fraction") or 0.5)
    except Exception as e:  # noqa: BLE001 - reported, not raised: tables and report go on
        return None, f"verdicts could not be computed: {type(e).__name__}: {e}"
    return with_compat_columns(table), None


def _last_look(seq: pd.DataFrame | None, fin: pd.DataFrame, reference: str) -> dict | None:
    """The last look of ``run --until-decided`` when it saw every seed the reference has now;
    None when there was none, or when seeds were added afterwards (its decisions are then stale
    and the fixed-sample verdicts stand, said in their note)."""
    if seq is None or not len(seq) or "seeds" not in seq or not len(fin):
        return None
    last = seq.sort_values(["seeds", "look"]).iloc[-1].to_dict()
    n_ref = int(fin.loc[fin["config"] == reference, "seed"].nunique())
    return last if int(last.get("seeds") or 0) == n_ref else None


def _sequential_decisions(table: pd.DataFrame | None, last: dict | None) -> pd.DataFrame | None:
    """Primary verdicts of a study run with ``--until-decided`` are the group-sequential decisions
    (``devicediff.decide``): a fixed-sample test repeated after each batch of seeds would not hold
    its error rates, and its seed-sd margin would move with every batch, whereas the sequential
    margin was frozen at the first look (``_verdicts`` is given it, so the intervals and TOST p
    shown are at the same margin). "continue" at the last look reads "inconclusive"."""
    if table is None or not last:
        return table
    table = table.copy()
    for c in last.get("comparisons") or []:
        hit = (table["config"] == c.get("config")) & (table["metric"] == c.get("metric")) & (table["role"] == "primary")
        if not hit.any():
            continue
        decision = c.get("decision")
        decision = "inconclusive" if decision == "continue" else decision
        where = (f"group-sequential (run --until-decided): {decision} at look {c.get('look')} of "
                 f"{c.get('n_looks')}, {c.get('n')} seeds; margin frozen at the first look")
        table.loc[hit, "verdict"] = decision
        table.loc[hit, "note"] = [f"{where}; {n}" if n else where for n in table.loc[hit, "note"]]
    return table


def with_compat_columns(v: pd.DataFrame) -> pd.DataFrame:
    """``v`` plus the old verdict table's column names (COMPAT_COLUMNS), as aliases: readers
    written for ``stats.verdict_table`` keep working. ``n_seeds_needed`` is left empty here
    (``Results.plan`` has the counts)."""
    v = v.copy()
    mean_ref = v["mean_ref"].astype(float)
    v["ci_low"], v["ci_high"] = v["ci95_low"], v["ci95_high"]
    v["p_holm"], v["tost_p_holm"] = v["p_adj"], v["tost_p_adj"]
    v["rel_diff"] = [d / abs(m) if m and not math.isnan(m) else math.nan for d, m in zip(v["diff"], mean_ref)]
    v["mean_cfg"] = mean_ref + v["diff"].astype(float)
    v["paired"], v["test"] = True, "paired t"
    v["n_ref"] = v["n_cfg"] = v["n"]
    v["n_seeds_needed"] = pd.array([pd.NA] * len(v), dtype="Int64")
    return v


def _per_class(fin: pd.DataFrame, reference: str) -> pd.DataFrame | None:
    """Per-class accuracy differences, their own Holm family; None when the runs recorded none."""
    if not len(fin) or not any(PER_CLASS_RE.match(str(c)) for c in fin.columns):
        return None
    if fin["config"].nunique() < 2 or reference not in set(fin["config"]):
        return None
    from devicediff.analysis.churn import per_class_table

    try:
        return per_class_table(fin, reference, pattern=PER_CLASS_RE.pattern)
    except Exception:  # noqa: BLE001 - a side table: its absence must not stop the main one
        return None


def run_warnings(runs: pd.DataFrame) -> pd.DataFrame:
    """``config, seed, warning``: each run's ``effective["warnings"]`` (what the worker found
    about its own run, e.g. randomness that is not the same on every device)."""
    rows = []
    if len(runs) and "effective" in runs.columns:
        for cfg, seed, eff in zip(runs["config"], runs["seed"], runs["effective"]):
            ws = eff.get("warnings") if isinstance(eff, dict) else None
            for w in ws or []:
                text = w.get("message", w) if isinstance(w, dict) else w
                rows.append({"config": cfg, "seed": seed, "warning": str(text)})
    return pd.DataFrame(rows, columns=["config", "seed", "warning"])


def _looks(store: Store, study_id: str) -> pd.DataFrame | None:
    """The looks ``run --until-decided`` took (``devicediff.decide``), one row each; None if none."""
    try:
        a = store.analyses(study_id, "sequential")
    except Exception:  # noqa: BLE001 - a store without analyses support
        return None
    if a is None or a.empty:
        return None
    rows = [{"key": k, **(p if isinstance(p, dict) else {})} for k, p in zip(a["key"], a["payload"])]
    return pd.DataFrame(rows)


def verdicts(store: Store, study: str | None = None) -> pd.DataFrame:
    """The verdicts of one study (id or name) or of every study in the store, one frame:
    ``study, study_id`` and the columns of ``Results.verdicts`` (``stats.VERDICT_COLUMNS``, then
    the old names in ``COMPAT_COLUMNS``)."""
    rows = store.studies()
    if study is not None:
        sid, _, _ = find_study(store, study)
        rows = rows[rows["study_id"] == sid]
    parts = []
    for _, row in rows.iterrows():
        r = load_results(store, row)
        if r.verdicts is not None and len(r.verdicts):
            parts.append(r.verdicts.assign(study=r.name, study_id=r.study_id))
    if not parts:
        try:
            from devicediff.analysis.stats import VERDICT_COLUMNS
        except Exception:  # noqa: BLE001
            VERDICT_COLUMNS = []
        return pd.DataFrame(columns=["study", "study_id", *VERDICT_COLUMNS, *COMPAT_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    return out[["study", "study_id", *[c for c in out.columns if c not in ("study", "study_id")]]]


class StoreView:
    """A store as a notebook sees it (``devicediff.open_store``): everything the store has
    (``runs()``, ``metrics()``, ``weights()``, ...), plus ``verdicts()`` and ``results()``,
    the same frames the CLI tables and the report use."""

    def __init__(self, store: Store):
        self.store = store

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def results(self, study, *, verdicts: bool = True) -> Results:
        """One study's frames; ``study``: a ``Study``, a study id or a name."""
        return load_results(self.store, study, verdicts=verdicts)

    def verdicts(self, study: str | None = None) -> pd.DataFrame:
        """Every config's verdict against its study's reference, for one study (name or id) or all."""
        return verdicts(self.store, study)

    def __enter__(self) -> "StoreView":
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def run_arrays(runs: pd.DataFrame, artifacts: pd.DataFrame, name: str) -> dict:
    """``{(config, seed): array}`` of the ``.npy`` artifact ``name`` (e.g. a classifier's held-out
    ``predictions``) over the finished first runs (repeat 0); unreadable files are left out."""
    import numpy as np

    if artifacts is None or artifacts.empty or runs is None or runs.empty:
        return {}
    fin = runs[(runs["state"] == "finished") & (runs["repeat"] == 0)]
    a = artifacts[artifacts["name"] == name].merge(fin[["run_id", "config", "seed"]], on="run_id")
    out = {}
    for cfg, seed, path in zip(a["config"], a["seed"], a["path"]):
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, TypeError):
            continue
        out.setdefault((str(cfg), int(seed)), arr)
    return out


def churn(store: Store) -> pd.DataFrame:
    """Every study's prediction churn against its reference (``analysis.churn.churn_table``), from
    the runs' ``predictions`` artifacts; empty when no run saved predictions."""
    parts = []
    for _, s in store.studies().iterrows():
        runs = store.runs(s["study_id"])
        t = runs_churn(store, runs, (s["definition"] or {}).get("reference"))
        if not t.empty:
            t.insert(0, "study_id", s["study_id"])
            t.insert(0, "study", s["name"])
            parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def runs_churn(store: Store, runs: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """``analysis.churn.churn_table`` of these runs (``config`` as labelled, e.g. ``Results.runs``
    with ``reference=Results.reference``) from their ``predictions`` files; empty when none saved
    predictions or the reference has none."""
    from devicediff.analysis.churn import churn_table

    if runs is None or runs.empty or not reference:
        return pd.DataFrame()
    preds = run_arrays(runs, store.artifacts(list(runs["run_id"])), "predictions")
    if not any(c == reference for c, _ in preds):
        return pd.DataFrame()
    return churn_table(preds, reference)
