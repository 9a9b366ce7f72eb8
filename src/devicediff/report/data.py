"""Data for the report: one study's ``Results`` (the read side ``status`` and ``run`` use,
:func:`devicediff.analysis.load.load_results`) plus what only the report shows: weight
snapshots, artifacts (prediction grids) and ``diverge`` analyses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from devicediff.analysis.load import Results, load_results
from devicediff.store import Store

ANALYSIS_COLUMNS = ["study_id", "kind", "key", "created", "payload"]


@dataclass(frozen=True, kw_only=True)
class StudyData(Results):
    weights: pd.DataFrame
    artifacts: pd.DataFrame
    analyses: pd.DataFrame  # ``diverge`` results stored for this study


def load_report_data(store: Store, study) -> StudyData:
    """Everything the report needs about one study (a row of ``store.studies()``, a study id or
    name, or a ``Study``)."""
    r = load_results(store, study)
    ids = list(r.runs["run_id"]) if len(r.runs) else []
    try:
        analyses = store.analyses(r.study_id, "diverge")
    except Exception:  # noqa: BLE001 - a store without analyses support still reports
        analyses = pd.DataFrame(columns=ANALYSIS_COLUMNS)
    return StudyData(**{f.name: getattr(r, f.name) for f in fields(Results)},
                     weights=store.weights(ids), artifacts=store.artifacts(ids), analyses=analyses)
