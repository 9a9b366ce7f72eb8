"""Data for the report: one study's ``Results`` (the read side ``status`` and ``run`` use,
:func:`devicediff.analysis.load.load_results`) plus what only the report shows: weight
snapshots, artifacts (prediction grids, held-out predictions) and the stored analyses
(``diverge`` results, run sessions' wall time and slots). The looks of ``run --until-decided``,
run warnings, per-class differences and the seeds plan come with ``Results``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pandas as pd

from devicediff.analysis.load import Results, load_results
from devicediff.store import Store

ANALYSIS_COLUMNS = ["study_id", "kind", "key", "created", "payload"]
SESSION_KINDS = ("session", "efficiency")  # what a ``run`` may store about itself: wall time, slots


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=ANALYSIS_COLUMNS)


@dataclass(frozen=True, kw_only=True)
class StudyData(Results):
    weights: pd.DataFrame
    artifacts: pd.DataFrame
    analyses: pd.DataFrame  # ``diverge`` results stored for this study
    sessions: pd.DataFrame = field(default_factory=_empty)  # ``run`` sessions (wall time, slots)


def _analyses(store: Store, study_id: str, kind: str) -> pd.DataFrame:
    try:
        a = store.analyses(study_id, kind)
    except Exception:  # noqa: BLE001 - a store without analyses support still reports
        return _empty()
    return a if a is not None else _empty()


def load_report_data(store: Store, study) -> StudyData:
    """Everything the report needs about one study (a row of ``store.studies()``, a study id or
    name, or a ``Study``)."""
    r = load_results(store, study)
    ids = list(r.runs["run_id"]) if len(r.runs) else []
    sessions = [s for s in (_analyses(store, r.study_id, k) for k in SESSION_KINDS) if len(s)]
    return StudyData(**{f.name: getattr(r, f.name) for f in fields(Results)},
                     weights=store.weights(ids), artifacts=store.artifacts(ids),
                     analyses=_analyses(store, r.study_id, "diverge"),
                     sessions=pd.concat(sessions, ignore_index=True) if sessions else _empty())
