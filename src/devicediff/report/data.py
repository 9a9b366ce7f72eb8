"""Data preparation for the report: one study's records as the frames every section reads.

Config identity across machines (``NAME@MACHINE`` labels) is decided by
:func:`devicediff.analysis.frames.config_identity`, which ``status`` uses too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from devicediff.analysis import frames
from devicediff.analysis.frames import config_identity
from devicediff.store import Store


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
