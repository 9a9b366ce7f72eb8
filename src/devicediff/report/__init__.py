"""``devicediff report``: one self-contained HTML page per store, plus the plots as PNG files.

``write_report(store, out_dir, study_name=None) -> Path`` writes ``out_dir/report.html`` (every
plot embedded as a base64 PNG: no external resource, it opens offline and can be mailed) and
the same plots as ``<study>-<id>-<plot>.png`` next to it. Per study: definition and environment,
the plain-language verdict, the verdict table with the numbers behind it, curves (mean with a 95%
band, difference to the reference, weight distance), bitwise table, noise floor, PredNet
prediction grids, divergence analyses, runs that failed, and configs across machines.

Data flow: ``data.load_report_data`` (``analysis.load.load_results``: records -> frames, config
identity, verdicts; plus weights, artifacts, diverge analyses) -> ``analyse`` (statistics,
pure functions of ``devicediff.analysis``) -> ``plots`` (PNG bytes) -> ``html`` (jinja2,
autoescaped). Files are written to a temporary name and renamed, so a reader never sees half a
report.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from devicediff.errors import UsageError
from devicediff.analysis import curves as curve_fns
from devicediff.analysis import frames
from devicediff.report import plots
from devicediff.report import verdicts as vd
from devicediff.report.data import StudyData, load_report_data
from devicediff.report.predictions import Predictions, analyse_predictions
from devicediff.report.timing import study_efficiency
from devicediff.store import Store

__all__ = ["write_report", "analyse", "Analysis"]

REPORT_NAME = "report.html"
MAX_CURVES = 4
GRID_ARTIFACT = "prediction_grid"
PER_CLASS = re.compile(vd.PER_CLASS_PATTERN)  # per-class metrics: the heatmap shows them, not the verdict plot


@dataclass
class Analysis:
    metrics: list[str] = field(default_factory=list)  # verdict metrics: primary, secondary, checks
    headline: str | None = None  # the first primary metric
    roles: dict[str, str] = field(default_factory=dict)  # metric -> primary / secondary / check
    verdicts: pd.DataFrame | None = None  # stats.verdicts: one row per config and metric
    sentences: dict[str, str] = field(default_factory=dict)
    seeds_needed: dict = field(default_factory=dict)  # (config, metric) -> (seeds, goal, note)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # config -> its runs' warnings
    looks: dict | None = None  # run --until-decided: looks taken
    noise: pd.DataFrame | None = None
    describe: dict[str, pd.DataFrame] = field(default_factory=dict)
    bitwise: pd.DataFrame | None = None
    init_check: pd.DataFrame | None = None
    curves: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict)
    wd: pd.DataFrame | None = None
    wd_summary: pd.DataFrame | None = None
    grids: dict = field(default_factory=dict)  # {"seed": s, "entries": [(label, path)]}
    predictions: Predictions | None = None  # held-out predictions: churn, per class, disagreements
    efficiency: dict | None = None  # report.timing.study_efficiency
    diverge: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # sections that could not be computed, and why

    def of_role(self, role: str) -> list[str]:
        return [m for m in self.metrics if self.roles.get(m) == role]


def _stats():
    try:
        from devicediff.analysis import stats
    except Exception:  # noqa: BLE001 - the statistics module is optional for the rest of the report
        return None
    return stats


def _curve_metric_names(metrics: pd.DataFrame) -> list[str]:
    if metrics.empty:
        return []
    steps = metrics.groupby("name")["step"].nunique()
    names = [n for n in steps.index if steps[n] >= 2 and not n.startswith("baseline_")]
    first = ["eval_loss", "train_loss", "eval_mse", "eval_ssim", "eval_accuracy"]
    return sorted(names, key=lambda n: (first.index(n) if n in first else len(first), n))[:MAX_CURVES]


def _verdicts_part(data: StudyData, a: Analysis) -> None:
    """Verdicts with roles, sentences, seeds needed, warnings and sequential looks."""
    a.verdicts, problem = vd.role_verdicts(data)
    if problem:
        a.problems.append(problem)
    elif data.verdict_problem and a.verdicts is None:
        a.problems.append(data.verdict_problem)
    a.warnings = vd.run_warnings(data)
    a.looks = vd.looks_summary(getattr(data, "sequential", None))
    if a.verdicts is None or a.verdicts.empty:
        a.metrics = list(data.verdict_metrics)
        a.headline = data.headline
        return
    v = a.verdicts
    a.roles = dict(zip(v["metric"], v["role"]))
    seen = list(dict.fromkeys(v["metric"]))
    a.metrics = [m for r in vd.ROLES for m in seen if a.roles[m] == r]
    a.headline = next(iter(a.of_role("primary")), a.metrics[0] if a.metrics else None)
    for m in a.metrics:
        a.sentences[m] = vd.sentence(v, m)
    a.seeds_needed, problem = vd.seeds_needed(data, v)
    if problem:
        a.problems.append(problem)


def analyse(data: StudyData) -> Analysis:
    """Every statistic the report shows for one study. A section that fails is noted in
    ``problems`` and left out; the rest of the report is still written."""
    a = Analysis()
    fin = data.finished
    stats = _stats()
    if stats is None:
        a.problems.append("statistics unavailable: devicediff.analysis.stats could not be imported")
    _verdicts_part(data, a)
    # -- noise floor and per-config description -------------------------------------------------
    if stats is not None and a.metrics:
        parts = []
        for m in [m for m in a.metrics if a.roles.get(m) != "check"]:
            try:
                parts.append(stats.noise_floor(fin, m).assign(metric=m))
            except Exception as e:  # noqa: BLE001
                a.problems.append(f"noise floor of {m}: {type(e).__name__}: {e}")
            try:
                a.describe[m] = stats.describe(fin, m)
            except Exception as e:  # noqa: BLE001
                a.problems.append(f"describe {m}: {type(e).__name__}: {e}")
        if parts:
            a.noise = pd.concat(parts, ignore_index=True)
    # -- bits ----------------------------------------------------------------------------------
    if len(data.runs):
        try:
            a.bitwise = frames.bitwise_table(data.runs, data.reference)
            a.init_check = frames.init_hash_check(data.runs[data.runs["state"] == "finished"])
        except Exception as e:  # noqa: BLE001
            a.problems.append(f"bitwise table: {type(e).__name__}: {e}")
    fruns = data.runs[data.runs["state"] == "finished"] if len(data.runs) else data.runs
    if len(fruns):
        _curves_part(data, fruns, a)
        _grids_part(data, fruns, a)
    # -- held-out predictions (classifier): churn, per class, disagreements ----------------------
    try:
        a.predictions = analyse_predictions(data, data.reference)
    except Exception as e:  # noqa: BLE001
        a.problems.append(f"predictions: {type(e).__name__}: {e}")
    if a.predictions is not None:
        a.problems.extend(a.predictions.problems)
    # -- efficiency ------------------------------------------------------------------------------
    a.efficiency, problem = study_efficiency(data.runs, data.sessions)
    if problem:
        a.problems.append(problem)
    # -- divergence analyses ---------------------------------------------------------------------
    for _, r in data.analyses.iterrows():
        a.diverge.append({"key": str(r["key"]), "payload": r["payload"], "created": r.get("created")})
    return a


def _curves_part(data: StudyData, fruns: pd.DataFrame, a: Analysis) -> None:
    fmetrics = data.metrics[data.metrics["run_id"].isin(set(fruns["run_id"]))]
    for name in _curve_metric_names(fmetrics):
        long = frames.curves(fruns, fmetrics, name)
        mean = curve_fns.mean_curves(long, order=data.order)
        diff = curve_fns.difference_curves(long, data.reference, order=data.order)
        a.curves[name] = (mean, diff)
    if len(data.weights):
        try:
            a.wd = curve_fns.weight_distances(fruns, data.weights, data.reference)
            a.wd_summary = curve_fns.weight_distance_summary(a.wd)
        except Exception as e:  # noqa: BLE001
            a.problems.append(f"weight distances: {type(e).__name__}: {e}")


def _grids_part(data: StudyData, fruns: pd.DataFrame, a: Analysis) -> None:
    """PredNet prediction grids: one seed (the one most configs have), every config."""
    if not len(data.artifacts):
        return
    g = data.artifacts[data.artifacts["name"] == GRID_ARTIFACT].merge(
        fruns[["run_id", "config", "seed", "repeat"]], on="run_id")
    g = g[g["repeat"] == 0]
    if len(g):
        per_seed = g.groupby("seed")["config"].nunique()
        seed = sorted(per_seed.index, key=lambda s: (-per_seed[s], s))[0]
        gs = g[g["seed"] == seed].drop_duplicates("config")
        rank = {c: i for i, c in enumerate(data.order)}
        gs = gs.assign(_o=gs["config"].map(lambda c: rank.get(c, len(rank)))).sort_values("_o")
        a.grids = {"seed": seed, "entries": list(zip(gs["config"], gs["path"]))}


# ----------------------------------------------------------------------------------------------
# files


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return (s or "x")[:n]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is for sharing
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_png(path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            b = f.read()
    except (OSError, TypeError):
        return None
    return b if b.startswith(b"\x89PNG\r\n\x1a\n") else None


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Images:
    """Figures of one study: written as PNG files and kept for embedding."""

    def __init__(self, out_dir: Path, prefix: str):
        self.out_dir, self.prefix, self.items = out_dir, prefix, {}

    def add(self, name: str, png: bytes | None) -> dict | None:
        if not png:
            return None
        fname = f"{self.prefix}-{_slug(name, 60)}.png"
        _atomic_write(self.out_dir / fname, png)
        item = {"file": fname, "uri": _data_uri(png)}
        self.items[name] = item
        return item


def _diverge_png(payload: dict, out_dir: Path) -> tuple[bytes | None, str | None]:
    try:
        from devicediff.diverge import plot_divergence
    except Exception:  # noqa: BLE001 - the diverge package is optional
        return None, None
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".diverge.", suffix=".png")
    os.close(fd)
    try:
        plot_divergence(payload, Path(tmp))
        return _read_png(tmp), None
    except Exception as e:  # noqa: BLE001
        return None, f"plot_divergence failed: {type(e).__name__}: {e}"
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _figures(data: StudyData, a: Analysis, images: _Images) -> dict:
    colors = plots.colors_for(data.order, data.reference)
    figs: dict = {"curves": {}, "grids": [], "diverge": []}
    def guarded(name, fn, *args, **kw):
        try:
            return images.add(name, fn(*args, **kw))
        except Exception as e:  # noqa: BLE001 - a figure that fails must not lose the report
            a.problems.append(f"figure {name}: {type(e).__name__}: {e}")
            return None

    if a.verdicts is not None and len(a.verdicts):
        flagged = set(a.warnings)
        for role, name, title in (
                ("primary", "verdicts", f"primary (confirmatory): difference to {data.reference}, "
                                        "mean over seeds, 90% CI (thick) and 95% CI (thin)"),
                ("secondary", "verdicts-secondary", f"secondary (exploratory): difference to {data.reference}")):
            mets = [m for m in a.of_role(role) if not PER_CLASS.match(m)]
            frame = vd.plot_frame(a.verdicts, mets)
            figs[f"verdicts_{role}"] = guarded(name, plots.verdict_plot, frame, mets, data.order,
                                               title=title, flagged=flagged, max_metrics=4 if role == "primary" else 6)
    _prediction_figures(data, a, figs, guarded)
    for name, (mean, diff) in a.curves.items():
        figs["curves"][name] = guarded(f"curve-{name}", plots.curve_plot, mean, diff, name, data.reference,
                                       data.order, colors)
    if a.wd is not None and len(a.wd):
        figs["weights"] = guarded("weight-distance", plots.weight_plot, a.wd, data.reference, data.order, colors)
    for i, (label, path) in enumerate(a.grids.get("entries", [])):
        png = _read_png(path)
        item = images.add(f"prediction-grid-{i}-{label}", png) if png else None
        figs["grids"].append({"config": label, "image": item})
    for i, dv in enumerate(a.diverge):
        png, err = _diverge_png(dv["payload"], images.out_dir) if isinstance(dv["payload"], dict) else (None, None)
        figs["diverge"].append({"image": images.add(f"diverge-{i}-{dv['key']}", png), "error": err})
    return figs


def _prediction_figures(data: StudyData, a: Analysis, figs: dict, guarded) -> None:
    p = a.predictions
    if p is None:
        return
    if p.pairs is not None and len(p.pairs):
        figs["churn"] = guarded("churn", plots.churn_plot, p.pairs, p.churn, data.order, data.reference)
    if p.per_class is not None and len(p.per_class):
        figs["per_class"] = guarded("per-class-accuracy", plots.class_heatmap, p.per_class, data.order)
    if p.images is not None and p.disagree is not None and len(p.disagree):
        figs["disagree"] = guarded("disagreements", plots.disagreement_grid, p.disagree, p.images, data.reference,
                                   data.order)


def write_report(store: Store, out_dir: Path, study_name: str | None = None) -> Path:
    """Write ``out_dir/report.html`` and the plots as PNG files; return the HTML path.

    Raises ``devicediff.errors.UsageError`` (one line) for an empty store, an unknown study name or
    an output path that is not a folder.
    """
    from devicediff.report import html

    out_dir = Path(out_dir)
    studies = store.studies()
    where = getattr(store, "path", None)
    where_txt = f" {where}" if where else ""
    if studies.empty:
        raise UsageError(f"the store{where_txt} holds no studies; run one first (devicediff run quick --store ...)")
    if study_name is not None:
        sel = studies[studies["name"] == study_name]
        if sel.empty:
            names = ", ".join(sorted(map(str, pd.unique(studies["name"]))))
            raise UsageError(f"no study named {study_name!r} in the store{where_txt}; it holds: {names}")
    else:
        sel = studies
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a folder; give a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None

    views = []
    dup_names = sel["name"].duplicated(keep=False)
    for (_, row), dup in zip(sel.iterrows(), dup_names):
        data = load_report_data(store, row)
        prefix = f"{_slug(data.name)}-{data.study_id[:8]}"
        images = _Images(out_dir, prefix)
        try:
            a = analyse(data)
            figs = _figures(data, a, images)
        except Exception as e:  # noqa: BLE001 - one broken study must not lose the others
            a = Analysis(problems=[f"this study could not be analysed: {type(e).__name__}: {e}"])
            figs = {"curves": {}, "grids": [], "diverge": []}
        views.append(html.study_view(data, a, figs, show_id=bool(dup)))
    page = html.render_page(views, store_name=os.path.basename(str(where)) if where else None,
                            generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = out_dir / REPORT_NAME
    _atomic_write(path, page.encode("utf-8"))
    return path
