"""``devicediff export --format mlflow``: every run of a store as an MLflow run.

One MLflow experiment per study (``<study name> (<first 8 of the study id>)``), or the one
the caller names; one MLflow run per devicediff run, named ``<config> seed=<seed>`` (plus
`` rep=<r>`` in studies with repeats). What maps to what:

- params: the config's fields (``config.threads``, ``config.env.MY_VAR``, ...), the seeds
  (``seed``, ``init_seed``, ``data_seed``, ``repeat``), the workload and its parameters
  (``workload``, ``workload.batch_size``, ...) and the budget (``budget.epochs``, ...);
- metrics: every stored ``(step, name, value)`` row, one MLflow history row each;
- tags: ``devicediff.run_id``, ``devicediff.study_id``, ``config``, ``seed``, ``state``,
  ``machine``, ``reference`` (yes/no), ``error`` for runs that did not finish, and, given a
  verdicts table, ``verdict.<metric>`` plus ``verdict`` (the strongest of them);
- artifacts: every file the store lists for the run (e.g. PredNet's prediction grids), the
  worker log and ``devicediff/run.json`` (fingerprint, what took effect, weight hashes);
- status: finished → FINISHED, failed → FAILED, skipped/interrupted → KILLED.

Re-exporting is idempotent: an MLflow run is found again by its ``devicediff.run_id`` tag and
skipped when its ``devicediff.content_hash`` tag (written last) still matches; a run whose
content changed (it finished since, or was resumed) is brought up to date in place, adding
only the metric rows MLflow lacks, and rebuilt only if MLflow holds rows the store does not.

MLflow is imported lazily: it is an optional dependency (``pip install "devicediff[mlflow]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from devicediff.errors import UsageError
from devicediff.store import Store

INSTALL_HINT = 'pip install mlflow-skinny` or `pip install "devicediff[mlflow]"'
EXPORT_VERSION = "1"  # part of the content hash: a changed mapping re-exports every run

TAG_RUN_ID = "devicediff.run_id"
TAG_STUDY_ID = "devicediff.study_id"
TAG_HASH = "devicediff.content_hash"

# MLflow's log_batch limits (mlflow.utils.validation); module constants so tests can shrink them.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

STATUS = {"finished": "FINISHED", "failed": "FAILED", "skipped": "KILLED", "interrupted": "KILLED",
          "running": "RUNNING"}
VERDICT_ORDER = ("differs", "inconclusive", "equivalent")
_FLOAT_MAX = 1.7976931348623157e308  # MLflow's SQL stores keep ±inf as ±this


@dataclass
class MlflowExportSummary:
    """What one export did. ``str()`` is one line for the command line."""

    tracking_uri: str
    experiments: dict[str, str] = field(default_factory=dict)  # name -> MLflow experiment id
    created: int = 0
    updated: int = 0
    skipped: int = 0
    rebuilt: int = 0  # of ``updated``: runs deleted and written again (MLflow held rows the store lacks)
    missing_artifacts: list[str] = field(default_factory=list)  # "run_id: path" of files not on disk

    def __str__(self) -> str:
        s = (f"mlflow: {self.created} run(s) created, {self.updated} updated, {self.skipped} unchanged, "
             f"in {len(self.experiments)} experiment(s) at {self.tracking_uri}")
        if self.missing_artifacts:
            s += f"; {len(self.missing_artifacts)} artifact file(s) not found, left out"
        return s

    def as_dict(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiments": dict(self.experiments), "created": self.created,
                "updated": self.updated, "skipped": self.skipped, "rebuilt": self.rebuilt,
                "missing_artifacts": list(self.missing_artifacts)}


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def export_mlflow(store: Store, tracking_uri: str, *, experiment: str | None = None, study: str | None = None,
                  verdicts: pd.DataFrame | None = None) -> MlflowExportSummary:
    """Write every run of ``store`` (or of one ``study``: a name, an id or an id prefix) to
    the MLflow tracking store at ``tracking_uri`` (``sqlite:///mlflow.db``, ``http://host:5000``,
    ``file:///path/mlruns``; a bare ``*.db`` path means a SQLite store). ``experiment`` puts all
    runs into that one experiment instead of one per study. ``verdicts``: a table with columns
    ``config``, ``metric``, ``verdict`` (and optionally ``study_id``) whose verdicts become tags.
    """
    ml = _Mlflow.load()
    uri = normalise_uri(tracking_uri)
    client = ml.connect(uri)
    verdicts = _check_verdicts(verdicts)

    studies = store.studies()
    runs = store.runs()
    chosen = _select_studies(studies, study)
    summary = MlflowExportSummary(tracking_uri=uri)
    for _, st in chosen.iterrows():
        sid, name, definition = st["study_id"], st["name"], st["definition"] or {}
        srun = runs[runs["study_id"] == sid]
        if srun.empty:
            continue
        exp_name = experiment or f"{name} ({sid[:8]})"
        try:
            eid = summary.experiments.get(exp_name) or _experiment(ml, client, exp_name, name, sid, definition,
                                                                   single_study=experiment is None)
            existing = _existing_runs(ml, client, eid)
        except ml.errors as e:
            raise UsageError(f"mlflow: cannot use experiment {exp_name!r} at {uri} ({_one_line(e)})") from None
        summary.experiments[exp_name] = eid
        metrics = store.metrics(list(srun["run_id"]))
        by_run = dict(tuple(metrics.groupby("run_id"))) if len(metrics) else {}
        arts = store.artifacts(list(srun["run_id"]))
        arts_by_run = dict(tuple(arts.groupby("run_id"))) if len(arts) else {}
        v = _study_verdicts(verdicts, sid, name)
        for _, run in srun.iterrows():
            rid = run["run_id"]
            try:
                _export_run(ml, client, eid, name, definition, run, by_run.get(rid), arts_by_run.get(rid), v,
                            existing.get(rid), summary)
            except ml.errors as e:
                raise UsageError(
                    f"mlflow: export stopped at run {rid} ({run['config']} seed={run['seed']}): {_one_line(e)}; "
                    f"so far {summary.created} created, {summary.updated} updated, {summary.skipped} unchanged; "
                    "export again to go on (exported runs are kept)") from None
    return summary


# --------------------------------------------------------------------------------------
# MLflow, lazily
# --------------------------------------------------------------------------------------

class _Mlflow:
    """The few MLflow names used here, imported on first use."""

    def __init__(self, mlflow, client_cls, metric, param, tag, exc):
        self.version = getattr(mlflow, "__version__", "?")
        self.Client, self.Metric, self.Param, self.RunTag = client_cls, metric, param, tag
        self.errors = (exc, OSError)  # requests' errors are OSErrors

    @classmethod
    def load(cls) -> "_Mlflow":
        try:
            import mlflow
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UsageError(f"--format mlflow needs MLflow: run `{INSTALL_HINT}`") from None
        self = cls(mlflow, MlflowClient, Metric, Param, RunTag, MlflowException)
        try:
            from mlflow.utils import validation as v

            self.max_param = int(getattr(v, "MAX_PARAM_VAL_LENGTH", 500))
            self.max_tag = int(getattr(v, "MAX_TAG_VAL_LENGTH", 5000))
        except ImportError:  # pragma: no cover - older layouts
            self.max_param, self.max_tag = 500, 5000
        return self

    def connect(self, uri: str):
        scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
        if scheme in ("sqlite", "postgresql", "mysql", "mssql") and importlib.util.find_spec("sqlalchemy") is None:
            raise UsageError(f"--tracking-uri {uri!r}: MLflow's database stores need SQLAlchemy and Alembic, which "
                             "mlflow-skinny leaves out; run `pip install sqlalchemy alembic` (or "
                             "`pip install \"devicediff[mlflow]\"`), or give an http(s) tracking server")
        try:
            client = self.Client(tracking_uri=uri)
            with _quick_http_probe(scheme):
                client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure to open the store is the URI's
            msg = _one_line(e)
            hint = "give sqlite:///PATH.db, http(s)://HOST:PORT or file:///DIR"
            if "MLFLOW_ALLOW_FILE_STORE" in str(e):
                msg = f"MLflow {self.version} refuses file stores, which it keeps in maintenance mode"
                hint = "use sqlite:///PATH.db, or set MLFLOW_ALLOW_FILE_STORE=true to use the file store anyway"
            elif scheme in ("http", "https") and ("Max retries exceeded" in str(e) or "onnection" in str(e)):
                msg = "no MLflow tracking server answered there"
                hint = "start one (`mlflow server`) or check the host and port"
            elif "unsupported URI" in str(e):
                msg = f"MLflow has no store for the scheme {uri.split(':', 1)[0]!r}"
            raise UsageError(f"--tracking-uri {uri!r}: MLflow cannot use it ({msg}); {hint}") from None
        return client


@contextlib.contextmanager
def _quick_http_probe(scheme: str):
    """The first request to a tracking server fails within seconds, not after MLflow's default
    retries (about 4 minutes for a server that is not there); the export itself keeps MLflow's
    policy. Settings the user made in the environment win."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    quick = {k: v for k, v in quick.items() if k not in os.environ} if scheme in ("http", "https") else {}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k in quick:
            os.environ.pop(k, None)


def normalise_uri(uri: str) -> str:
    """A bare path ending in .db/.sqlite is a SQLite store; everything else goes to MLflow as given."""
    uri = str(uri).strip()
    if not uri:
        raise UsageError("--tracking-uri is empty; give sqlite:///PATH.db, http(s)://HOST:PORT or file:///DIR")
    if "://" not in uri and not uri.startswith("file:") and Path(uri).suffix in (".db", ".sqlite"):
        return "sqlite:///" + str(Path(uri).resolve())
    return uri


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------
# Selection and verdicts
# --------------------------------------------------------------------------------------

def _select_studies(studies: pd.DataFrame, study: str | None) -> pd.DataFrame:
    if study is None:
        return studies
    hit = studies[(studies["study_id"] == study) | (studies["name"] == study)]
    if hit.empty and len(study) >= 4:
        hit = studies[studies["study_id"].str.startswith(study)]
    if hit.empty:
        known = ", ".join(f"{n} ({i[:8]})" for i, n in zip(studies["study_id"], studies["name"])) or "none"
        raise UsageError(f"--study {study!r} is not in the store; it holds: {known}")
    return hit


def _check_verdicts(verdicts: pd.DataFrame | None) -> pd.DataFrame | None:
    if verdicts is None:
        return None
    missing = {"config", "metric", "verdict"} - set(verdicts.columns)
    if missing:
        raise UsageError(f"verdicts: columns {sorted(missing)} missing; need config, metric, verdict")
    return verdicts


def _study_verdicts(verdicts: pd.DataFrame | None, sid: str, name: str) -> dict[str, dict[str, str]]:
    """{config: {metric: verdict}} for one study."""
    if verdicts is None or verdicts.empty:
        return {}
    v = verdicts
    if "study_id" in v.columns:
        v = v[v["study_id"] == sid]
    elif "study" in v.columns:
        v = v[v["study"] == name]
    out: dict[str, dict[str, str]] = {}
    for c, m, verdict in zip(v["config"], v["metric"], v["verdict"]):
        out.setdefault(str(c), {})[str(m)] = str(verdict)
    return out


def _rollup(per_metric: dict[str, str]) -> str:
    """The strongest verdict over a config's metrics: differs > inconclusive > equivalent."""
    values = set(per_metric.values())
    for v in VERDICT_ORDER:
        if v in values:
            return v
    return ",".join(sorted(values))


# --------------------------------------------------------------------------------------
# Mapping one run
# --------------------------------------------------------------------------------------

_BAD_KEY = re.compile(r"[^\w./\- ]")


def _key(k: str) -> str:
    """A name MLflow accepts: alphanumerics, _ - . / and spaces, no path tricks, at most 250 chars."""
    k = _BAD_KEY.sub("_", str(k))[:250] or "_"
    if posixpath.normpath(k) != k or k.startswith(("/", ".")):
        k = k.replace("/", "_").lstrip(".") or "_"
    return k


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _flatten(prefix: str, d: dict, out: dict[str, str]) -> None:
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            _flatten(key, v, out)
        else:
            out[_key(key)] = _value(v)


def run_params(run: pd.Series, definition: dict) -> dict[str, str]:
    p: dict[str, str] = {}
    _flatten("config", dict(run["config_json"] or {}), p)
    for k in ("seed", "init_seed", "data_seed", "repeat"):
        p[k] = str(int(run[k]))
    p["workload"] = str(run["workload"])
    _flatten("workload", dict(definition.get("workload_params") or {}), p)
    _flatten("budget", dict(definition.get("budget") or {}), p)
    return p


def run_name(run: pd.Series, definition: dict) -> str:
    name = f"{run['config']} seed={int(run['seed'])}"
    if int(definition.get("repeats") or 1) > 1:
        name += f" rep={int(run['repeat'])}"
    return name


def run_tags(run: pd.Series, study_name: str, definition: dict, verdicts: dict[str, dict[str, str]]) -> dict[str, str]:
    t = {
        TAG_RUN_ID: str(run["run_id"]),
        TAG_STUDY_ID: str(run["study_id"]),
        "devicediff.study": str(study_name),
        "devicediff.cell_key": str(run["cell_key"]),
        "config": str(run["config"]),
        "seed": str(int(run["seed"])),
        "repeat": str(int(run["repeat"])),
        "state": str(run["state"]),
        "machine": str(run["machine"]),
        "workload": str(run["workload"]),
        "reference": "yes" if definition.get("reference") == run["config"] else "no",
    }
    if _present(run.get("error")):
        t["error"] = str(run["error"])
    for k in ("init_sha256", "final_sha256"):
        if _present(run.get(k)):
            t[f"devicediff.{k}"] = str(run[k])
    for k in ("wall_time", "train_time"):
        v = run.get(k)
        if _present(v):
            t[f"devicediff.{k}"] = f"{float(v):.3f}"
    fp = run.get("fingerprint") or {}
    if isinstance(fp, dict) and fp.get("cpu_model"):
        t["devicediff.cpu_model"] = str(fp["cpu_model"])
    mine = verdicts.get(str(run["config"]), {})
    for metric, verdict in mine.items():
        t[_key(f"verdict.{metric}")] = verdict
    if mine:
        t["verdict"] = _rollup(mine)
    return t


def _present(v: Any) -> bool:
    """Not None, not NaN, not empty (pandas turns missing values into either)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return v != ""


def _ms(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else int(f * 1000)


def _cmp(v: float) -> float:
    """A metric value as MLflow stores it (SQL stores turn ±inf into ±max float)."""
    v = float(v)
    return math.copysign(_FLOAT_MAX, v) if math.isinf(v) else v


def _same(a: float, b: float) -> bool:
    a, b = _cmp(a), _cmp(b)
    return a == b or (math.isnan(a) and math.isnan(b))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _artifact_files(run: pd.Series, arts: pd.DataFrame | None,
                    summary: MlflowExportSummary) -> list[tuple[Path, str | None, str]]:
    """``(local file, MLflow artifact folder or None, sha256)`` for every file to upload."""
    out: list[tuple[Path, str | None, str]] = []
    used: set[str] = set()
    if arts is not None:
        for name, path in zip(arts["name"], arts["path"]):
            p = Path(str(path))
            if not p.is_file():
                summary.missing_artifacts.append(f"{run['run_id']}: {path}")
                continue
            folder = None if p.name not in used else _key(str(name)).replace("/", "_")
            used.add(p.name)
            out.append((p, folder, _sha256(p)))
    log = run.get("log_path")
    if _present(log) and Path(str(log)).is_file() and Path(str(log)).stat().st_size > 0:
        out.append((Path(str(log)), "devicediff", _sha256(Path(str(log)))))
    return out


def _run_json(run: pd.Series) -> dict:
    keep = ("run_id", "study_id", "cell_key", "config", "seed", "init_seed", "data_seed", "repeat", "workload",
            "config_json", "machine", "state", "error", "fingerprint", "effective", "init_sha256", "final_sha256",
            "wall_time", "train_time", "threads_used", "attempts", "created", "finished_at")
    return {k: _plain(run.get(k)) for k in keep}


def _plain(v: Any) -> Any:
    """numpy scalars as Python ones, so run.json keeps numbers as numbers; missing is None
    (pandas shows a missing value as None or NaN depending on the rest of the column)."""
    v = v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes, list, dict)) else v
    return None if isinstance(v, float) and math.isnan(v) else v


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def _experiment(ml: _Mlflow, client, exp_name: str, study_name: str, sid: str, definition: dict, *,
                single_study: bool) -> str:
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        tags = {"devicediff": "yes"}
        if single_study:
            desc = (definition.get("description") or "").strip()
            note = f"devicediff study {study_name} ({sid})" + (f"\n\n{desc}" if desc else "")
            tags.update({TAG_STUDY_ID: sid, "devicediff.study": study_name, "mlflow.note.content": note})
        where = _artifact_location(client.tracking_uri, exp_name)
        return client.create_experiment(exp_name, artifact_location=where, tags=tags)
    if getattr(exp, "lifecycle_stage", "active") == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _artifact_location(uri: str, exp_name: str) -> str | None:
    """Beside a local SQLite store (``<its folder>/mlartifacts/<experiment>``) rather than MLflow's
    default, ``./mlruns`` under whatever folder the export ran in; None (MLflow's choice) elsewhere."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return str(db.resolve().parent / "mlartifacts" / _key(exp_name).replace("/", "_").replace(" ", "_"))


def _existing_runs(ml: _Mlflow, client, eid: str) -> dict[str, Any]:
    """{devicediff run id: MLflow run} for the active runs of an experiment; our own duplicates
    (two MLflow runs for one devicediff run, e.g. from two exports at once) are deleted."""
    found: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([eid], max_results=1000, page_token=token)
        for r in page:
            rid = r.data.tags.get(TAG_RUN_ID)
            if rid:
                found.setdefault(rid, []).append(r)
        token = page.token
        if not token:
            break
    out = {}
    for rid, rs in found.items():
        rs.sort(key=lambda r: (TAG_HASH not in r.data.tags, r.info.start_time or 0))
        out[rid] = rs[0]
        for extra in rs[1:]:
            client.delete_run(extra.info.run_id)
    return out


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _log(ml: _Mlflow, client, mlrun_id: str, *, metrics=(), params=(), tags=()) -> None:
    for chunk in _chunks(list(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(mlrun_id, params=chunk)
    for chunk in _chunks(list(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(mlrun_id, tags=chunk)
    for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(mlrun_id, metrics=chunk)


def _metric_plan(client, mlrun, want: dict[str, dict[int, float]]) -> list[tuple[str, int, float]] | None:
    """The metric rows MLflow lacks, or None when MLflow holds a row the store does not
    (then only a rebuild gives equal histories)."""
    todo: list[tuple[str, int, float]] = []
    for key in sorted(set(want) | set(mlrun.data.metrics)):
        have: dict[int, float] = {}
        if key in mlrun.data.metrics:
            for m in client.get_metric_history(mlrun.info.run_id, key):
                if m.step in have:
                    return None
                have[m.step] = m.value
        w = want.get(key, {})
        for step, value in have.items():
            if step not in w or not _same(value, w[step]):
                return None
        todo.extend((key, step, value) for step, value in sorted(w.items()) if step not in have)
    return todo


def _export_run(ml: _Mlflow, client, eid: str, study_name: str, definition: dict, run: pd.Series,
                metrics: pd.DataFrame | None, arts: pd.DataFrame | None, verdicts: dict, mlrun,
                summary: MlflowExportSummary) -> None:
    params = {k: v[: ml.max_param] for k, v in run_params(run, definition).items()}
    tags = {k: v[: ml.max_tag] for k, v in run_tags(run, study_name, definition, verdicts).items()}
    want = _wanted_metrics(metrics)
    files = _artifact_files(run, arts, summary)
    status = STATUS.get(str(run["state"]), "FAILED")
    start, end = _ms(run.get("created")), _ms(run.get("finished_at"))
    digest = _content_hash(run, params, tags, status, start, end, want, files)

    if mlrun is not None and mlrun.data.tags.get(TAG_HASH) == digest:
        summary.skipped += 1
        return

    was_there = mlrun is not None
    if mlrun is not None:
        mlrun, params, todo_metrics = _update_plan(client, mlrun, params, want, summary)
    if mlrun is None:
        mlrun = client.create_run(eid, start_time=start, tags={TAG_RUN_ID: tags[TAG_RUN_ID]},
                                  run_name=run_name(run, definition))
        todo_metrics = [(k, s, v) for k, d in sorted(want.items()) for s, v in sorted(d.items())]
        stale: list[str] = []
    else:
        stale = [k for k in mlrun.data.tags if (k.startswith("verdict") or k == "error") and k not in tags]
    mid = mlrun.info.run_id
    ts = end or start or 0
    _log(ml, client, mid,
         params=[ml.Param(k, v) for k, v in sorted(params.items())],
         tags=[ml.RunTag(k, v) for k, v in sorted(tags.items())],
         metrics=[ml.Metric(k, v, ts, s) for k, s, v in todo_metrics])
    for k in stale:
        client.delete_tag(mid, k)
    _upload_and_close(client, mid, run, files, status, end, digest)
    if was_there:
        summary.updated += 1
    else:
        summary.created += 1


def _wanted_metrics(metrics: pd.DataFrame | None) -> dict[str, dict[int, float]]:
    """{MLflow metric key: {step: value}} of a run's stored metric rows."""
    want: dict[str, dict[int, float]] = {}
    if metrics is not None:
        for step, name, value in zip(metrics["step"], metrics["name"], metrics["value"]):
            want.setdefault(_key(name), {})[int(step)] = float(value)
    return want


def _content_hash(run: pd.Series, params: dict[str, str], tags: dict[str, str], status: str, start: int | None,
                  end: int | None, want: dict[str, dict[int, float]],
                  files: list[tuple[Path, str | None, str]]) -> str:
    """sha256 of everything an export writes for a run (the ``devicediff.content_hash`` tag)."""
    content = {
        "v": EXPORT_VERSION, "params": params, "tags": tags, "status": status, "start": start, "end": end,
        "metrics": {k: sorted((s, repr(_cmp(v))) for s, v in d.items()) for k, d in want.items()},
        "files": [(str(folder), p.name, sha) for p, folder, sha in files], "run": _run_json(run),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _update_plan(client, mlrun, params: dict[str, str], want: dict[str, dict[int, float]],
                 summary: MlflowExportSummary):
    """How to bring an existing, out-of-date MLflow run up to date: (mlrun, params to log, metric rows
    to log). MLflow cannot edit params or drop metric rows: when that would be needed the run is
    deleted and ``(None, params, None)`` returned, for the caller to write it again."""
    old_params = mlrun.data.params
    clash = any(k in old_params and old_params[k] != v for k, v in params.items())
    todo_metrics = None if clash else _metric_plan(client, mlrun, want)
    if todo_metrics is None:
        client.delete_run(mlrun.info.run_id)
        summary.rebuilt += 1
        return None, params, None
    return mlrun, {k: v for k, v in params.items() if k not in old_params}, todo_metrics


def _upload_and_close(client, mid: str, run: pd.Series, files: list[tuple[Path, str | None, str]], status: str,
                      end: int | None, digest: str) -> None:
    """Upload the run's files and ``devicediff/run.json``, set its status, and last the content hash
    (a run cut short is then brought up to date next time)."""
    for p, folder, _ in files:
        client.log_artifact(mid, str(p), folder)
    with tempfile.TemporaryDirectory(prefix="devicediff_mlflow_") as d:
        rj = Path(d) / "run.json"
        rj.write_text(json.dumps(_run_json(run), indent=1, sort_keys=True, default=str))
        client.log_artifact(mid, str(rj), "devicediff")
    if status == "RUNNING":
        client.update_run(mid, status="RUNNING")
    else:
        client.set_terminated(mid, status=status, end_time=end)
    client.set_tag(mid, TAG_HASH, digest)
