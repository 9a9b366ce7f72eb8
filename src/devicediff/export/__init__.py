"""``devicediff export``: the store as flat tables (CSV or Parquet).

``runs``: one row per run, keyed by ``run_id``; ``study_id`` and ``definition_hash`` (the study's
parameters, :func:`devicediff.store.identity.definition_hash`) tell apart two studies that share
a name, so rows never collide on (study, config, seed); ``final_<metric>`` is the last value of
each evaluation metric of the run (every metric but the training loss). ``metrics``: every
recorded ``(run_id, step, name, value)``. ``verdicts``: every study's verdicts
(:func:`devicediff.analysis.load.verdicts`, the function ``status``, ``run``'s table and the report
read), columns ``VERDICT_EXPORT``: ``diff = config - reference``, t-based 95% and 90% intervals
(the 90% one is what TOST uses), ``p`` (paired t), ``p_adj`` and ``tost_p_adj`` (Holm within the
row's family: primary or secondary), ``role`` (primary / secondary / check), ``margin`` (absolute,
with ``margin_pct`` of the reference mean and ``margin_source`` "fixed" or "seed-sd").

Everything is read before anything is written; the files are written under a temporary name and
renamed. An ``--out`` that is a file, or a folder that cannot be made, is one ``UsageError`` line
and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from devicediff.analysis.frames import per_run
from devicediff.analysis.load import churn as study_churn
from devicediff.analysis.load import verdicts as study_verdicts
from devicediff.errors import UsageError
from devicediff.store import Store
from devicediff.store.identity import definition_hash

RUN_EXPORT = ["run_id", "study_id", "study", "definition_hash", "workload", "workload_params", "config", "seed",
              "init_seed", "data_seed", "repeat", "machine", "state", "error", "init_sha256", "final_sha256",
              "wall_time", "train_time"]
JSON_EXPORT = ["config_json", "fingerprint", "effective", "threads_used"]
TRAIN_METRICS = {"train_loss"}
VERDICT_EXPORT = ["study", "study_id", "config", "machine", "metric", "role", "n", "diff", "ci95_low", "ci95_high",
                  "ci90_low", "ci90_high", "p", "p_adj", "tost_p_adj", "margin", "verdict", "margin_pct",
                  "margin_source", "reference", "note"]


def _json(v) -> str | None:
    return json.dumps(v, sort_keys=True, default=str) if v is not None else None


def run_table(store: Store) -> pd.DataFrame:
    """The ``runs`` table as exported."""
    runs = store.runs()
    metrics = store.metrics()
    studies = store.studies()
    defs = dict(zip(studies["study_id"], studies["definition"]))
    runs["study"] = runs["study_id"].map(dict(zip(studies["study_id"], studies["name"])))
    runs["definition_hash"] = runs["study_id"].map(lambda s: definition_hash(defs.get(s) or {}))
    runs["workload_params"] = runs["study_id"].map(lambda s: _json((defs.get(s) or {}).get("workload_params")))
    for c in JSON_EXPORT:
        runs[c] = runs[c].map(_json)
    evals = sorted(set(metrics["name"]) - TRAIN_METRICS) if len(metrics) else []
    finals = [f"final_{n}" for n in evals]
    if finals and len(runs):
        last = per_run(runs[["run_id"]], metrics)
        runs = runs.merge(last[["run_id", *[c for c in finals if c in last.columns]]], on="run_id", how="left")
    for c in finals:
        if c not in runs.columns:
            runs[c] = pd.Series(dtype=float)
    return runs[RUN_EXPORT + finals + JSON_EXPORT]


def verdict_table(store: Store) -> pd.DataFrame:
    """The ``verdicts`` table as exported: every study's verdicts, columns ``VERDICT_EXPORT``."""
    v = study_verdicts(store)
    for c in VERDICT_EXPORT:
        if c not in v.columns:
            v[c] = pd.Series(dtype=object)
    return v[VERDICT_EXPORT]


def export(store: Store, out: Path, *, fmt: str = "csv") -> list[Path]:
    """Write ``out/runs.<fmt>``, ``out/metrics.<fmt>``, ``out/verdicts.<fmt>`` and, when runs saved
    held-out predictions, ``out/churn.<fmt>``; return their paths."""
    out = Path(out)
    if fmt not in ("csv", "parquet"):
        raise UsageError(f"--format {fmt!r} unknown; use csv or parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--format parquet needs pyarrow; run `pip install pyarrow` or use --format csv") from None
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; give a folder path (the tables are written into it)")
    tables = (("runs", run_table(store)), ("metrics", store.metrics()[["run_id", "step", "name", "value"]]),
              ("verdicts", verdict_table(store)))
    churn = study_churn(store)
    if not churn.empty:  # classifiers: do predictions change more than a seed change would?
        tables += (("churn", churn),)

    made = _make_folder(out)
    paths, tmps = [], []
    try:
        for name, df in tables:
            path = out / f"{name}.{fmt}"
            tmp = path.with_name(f".{path.name}.tmp")
            tmps.append(tmp)
            df.to_csv(tmp, index=False) if fmt == "csv" else df.to_parquet(tmp, index=False)
        for tmp, (name, _) in zip(tmps, tables):  # rename only once every table is written
            path = out / f"{name}.{fmt}"
            tmp.replace(path)
            paths.append(path)
    except OSError as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise UsageError(f"--out {out}: cannot write the tables ({e.strerror or e})") from None
    return paths


def _make_folder(out: Path) -> Path | None:
    """Create ``out``; return the topmost folder this made (to take back on failure), or None."""
    top = None
    for p in [out, *out.parents]:
        if p.exists():
            break
        top = p
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    return top
