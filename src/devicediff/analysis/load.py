"""The one read side: a study's records in a store, as the frames every reader starts from.

``load_results(store, study)`` feeds ``devicediff status``, the table at the end of
``devicediff run``, the report (``devicediff.report.data``) and notebooks (``Store.verdicts``):
the runs with config identity applied (``NAME@MACHINE`` once a config ran on several machines,
:func:`devicediff.analysis.frames.config_identity`), their metrics, the final values per run
(:func:`devicediff.analysis.frames.per_run`) and the verdicts
(:func:`devicediff.analysis.stats.verdict_table`, every per-run metric, headline first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from devicediff.analysis import frames
from devicediff.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from devicediff.store import Store
    from devicediff.study import Study

__all__ = ["Results", "load_results", "verdicts", "find_study"]


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
    verdict_metrics: list[str]  # per-run metrics with values in finished runs, headline first
    verdicts: pd.DataFrame | None  # None: not asked for, or not computable (``verdict_problem``)
    verdict_problem: str | None = None

    @property
    def finished(self) -> pd.DataFrame:
        """``per_run`` of the finished runs."""
        pr = self.per_run
        return pr[pr["state"] == "finished"] if len(pr) else pr

    @property
    def headline(self) -> str | None:
        return self.verdict_metrics[0] if self.verdict_metrics else None

    @property
    def primary(self) -> list[str]:
        """The metrics a verdict answers first. For now: the headline alone."""
        return [self.headline] if self.headline else []


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
    vmetrics = [m for m in frames.metric_columns(fin) if fin[m].notna().any()] if len(fin) else []
    table, problem = (_verdicts(fin, vmetrics, ref_label, d) if verdicts else (None, None))
    return Results(
        study_id=study_id, name=name, definition=d, reference=ref_label, reference_config=reference,
        reference_machine=ref_machine, order=order, pending=[c for c in config_order if c not in ran],
        by_machine=by_machine, machines=list(pd.unique(runs["machine"])) if len(runs) else [],
        runs=runs, metrics=metrics, per_run=pr, verdict_metrics=vmetrics, verdicts=table, verdict_problem=problem,
    )


def _verdicts(fin: pd.DataFrame, metrics: list[str], reference: str, d: dict) -> tuple[pd.DataFrame | None, str | None]:
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
    try:
        table = stats.verdict_table(fin, metrics, reference, margin=d.get("margin"),
                                    margin_fraction=d.get("margin_fraction") or 0.5)
    except Exception as e:  # noqa: BLE001 - reported, not raised: tables and report go on
        return None, f"verdicts could not be computed: {type(e).__name__}: {e}"
    return table, None


def verdicts(store: Store, study: str | None = None) -> pd.DataFrame:
    """The verdicts of one study (id or name) or of every study in the store, one frame:
    ``study, study_id`` and the columns of ``verdict_table``."""
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
            from devicediff.analysis.stats import COLUMNS
        except Exception:  # noqa: BLE001
            COLUMNS = []
        return pd.DataFrame(columns=["study", "study_id", *COLUMNS])
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
