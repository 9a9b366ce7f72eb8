"""Data preparation for the report: one study's records as the frames every section reads.

The one decision made here: **config identity**. In a store merged from several machines the
same config name can have runs from several ``machine`` ids, and those runs must not be pooled
(another CPU or driver is another way of doing the arithmetic). Then every config is labelled
``NAME@MACHINE`` (short machine id), and the reference becomes the reference config on the
machine that holds most of its finished runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from devicediff.analysis import frames
from devicediff.store import Store

SHORT_MACHINE = 6


@dataclass
class StudyData:
    study_id: str
    name: str
    definition: dict
    reference: str  # label of the reference (config, or config@machine)
    reference_config: str  # the study's reference config name
    reference_machine: str | None
    order: list[str]  # config labels: definition order, reference machine first
    by_machine: bool  # labels carry the machine (a config ran on several machines)
    machines: list[str]
    runs: pd.DataFrame  # all runs, ``config`` relabelled, ``base_config`` the study's name
    metrics: pd.DataFrame
    per_run: pd.DataFrame  # all runs
    finished: pd.DataFrame  # per_run of finished runs
    weights: pd.DataFrame
    artifacts: pd.DataFrame
    analyses: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def short_ids(machines: list[str]) -> dict[str, str]:
    """Shortest common prefix length (from 6) that keeps every machine id distinct."""
    k = SHORT_MACHINE
    while len({str(m)[:k] for m in machines}) < len(set(machines)) and k < 64:
        k += 2
    return {m: str(m)[:k] for m in machines}


def config_identity(runs: pd.DataFrame, reference: str, config_order: list[str] | None = None
                    ) -> tuple[pd.DataFrame, str, str | None, bool, list[str]]:
    """``(runs, reference_label, reference_machine, by_machine, order)``.

    ``runs`` gains ``base_config`` (the study's config name); ``config`` becomes
    ``NAME@MACHINE`` for every config when any config has runs from more than one machine.
    """
    runs = runs.copy()
    runs["base_config"] = runs["config"] if len(runs) else pd.Series(dtype=object)
    base_order = list(config_order or [])
    base_order += [c for c in pd.unique(runs["config"]) if c not in base_order] if len(runs) else []
    if runs.empty or "machine" not in runs.columns:
        return runs, reference, None, False, [c for c in base_order if not len(runs) or c in set(runs["config"])]
    machines_per = runs.groupby("config")["machine"].nunique()
    ref_runs = runs[runs["config"] == reference]
    ref_machine = None
    if len(ref_runs):
        fin = ref_runs[ref_runs["state"] == "finished"]
        pool = fin if len(fin) else ref_runs
        counts = pool.groupby("machine", sort=False).size()
        ref_machine = str(counts.idxmax())  # ties: first seen (runs come in creation order)
    if (machines_per <= 1).all():
        order = [c for c in base_order if c in set(runs["config"])]
        return runs, reference, ref_machine, False, order
    short = short_ids(list(pd.unique(runs["machine"])))
    runs["config"] = runs["base_config"] + "@" + runs["machine"].map(short)
    order = []
    for base in base_order:
        ms = list(pd.unique(runs.loc[runs["base_config"] == base, "machine"]))
        if ref_machine in ms:
            ms.remove(ref_machine)
            ms.insert(0, ref_machine)
        order += [f"{base}@{short[m]}" for m in ms]
    ref_label = f"{reference}@{short[ref_machine]}" if ref_machine is not None else reference
    return runs, ref_label, ref_machine, True, order


def load_study(store: Store, study: pd.Series) -> StudyData:
    """Everything the report needs about one study (a row of ``store.studies()``)."""
    d = study["definition"] if isinstance(study["definition"], dict) else {}
    reference = d.get("reference", "")
    config_order = [c.get("name") for c in d.get("configs", []) if isinstance(c, dict)]
    runs = store.runs(study["study_id"])
    ids = list(runs["run_id"]) if len(runs) else []
    metrics = store.metrics(ids)
    weights = store.weights(ids)
    artifacts = store.artifacts(ids)
    try:
        analyses = store.analyses(study["study_id"], "diverge")
    except Exception:  # noqa: BLE001 - a store without analyses support still reports
        analyses = pd.DataFrame(columns=["study_id", "kind", "key", "created", "payload"])
    runs, ref_label, ref_machine, by_machine, order = config_identity(runs, reference, config_order)
    pr = frames.per_run(runs, metrics) if len(runs) else pd.DataFrame(columns=frames.RUN_KEYS)
    if "base_config" not in pr.columns and len(runs):
        pr = pr.merge(runs[["run_id", "base_config"]], on="run_id", how="left")
    fin = pr[pr["state"] == "finished"] if len(pr) else pr
    machines = list(pd.unique(runs["machine"])) if len(runs) and "machine" in runs.columns else []
    return StudyData(
        study_id=study["study_id"], name=str(study["name"]), definition=d, reference=ref_label,
        reference_config=reference, reference_machine=ref_machine, order=order, by_machine=by_machine,
        machines=machines, runs=runs, metrics=metrics, per_run=pr, finished=fin, weights=weights,
        artifacts=artifacts, analyses=analyses,
    )
