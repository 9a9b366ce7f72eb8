"""``devicediff run STUDY --until-decided``: add seeds in batches until every config's primary
verdict is decided, with error rates that hold.

A group-sequential design (:class:`devicediff.analysis.sequential.SequentialDesign`: Lan-DeMets
alpha spending of O'Brien-Fleming type, for the difference test and for each side of TOST) looks
at the paired differences config - reference on each primary metric after each batch of seeds.
A comparison is decided at the first look where it crosses a boundary (``differs`` or
``equivalent``), or when its values equal the reference's bitwise in every seed (``identical``);
decided comparisons keep their decision while the seeds go on for the others. The study stops
when every comparison is decided, or at ``max_seeds`` (the undecided ones are then
``inconclusive``). Each comparison runs at alpha / m, m = configs x primary metrics (Bonferroni
over the family, fixed before the first look).

The margin is frozen at the first look: the study's fixed ``[verdict] margin``, else
``margin_fraction`` x the reference's seed sd over the first look's seeds.

Seeds are the study's own list, then the next integers above its largest. A batch is run by
rebuilding the study with a longer seed list: ``Study.definition()`` leaves the seeds out, so the
study id stays the same and the runs already stored are kept (``runner.run_study`` resumes).

Resume-safe by construction: every look is a function of the stored runs of its seeds only, so
each call replays the looks from the first, running only the seeds the store lacks; a run stopped
at any point (Ctrl-C, a crash, a lost machine) continues where it was, with the same decisions.
Each look is recorded with ``store.put_analysis(study_id, "sequential", key, payload)`` (key
``max=N|batch=K|look=k``), which the report and ``status`` read (``Results.sequential``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from devicediff.analysis.load import load_results
from devicediff.analysis.sequential import SequentialDesign, assess
from devicediff.errors import UsageError
from devicediff.runner import plan, run_study
from devicediff.study import Study

__all__ = ["run_until_decided", "Outcome", "seed_list", "look_line", "KIND"]

KIND = "sequential"


@dataclass
class Outcome:
    """What ``run_until_decided`` did: ``looks`` (each look's payload, as stored), ``decisions``
    ({(config, metric): the comparison's row at its deciding look or the last}), ``seeds`` (seeds
    at the last look), ``status`` ("decided" or "max seeds")."""

    looks: list[dict] = field(default_factory=list)
    decisions: dict = field(default_factory=dict)
    seeds: int = 0
    status: str = ""


def seed_list(study: Study, max_seeds: int) -> list[int]:
    """The study's seeds, then the next integers above its largest, ``max_seeds`` in all."""
    seeds = list(study.seeds)
    nxt = max(seeds) + 1
    while len(seeds) < max_seeds:
        seeds.append(nxt)
        nxt += 1
    return seeds[:max_seeds]


def run_until_decided(study: Study, store, *, max_seeds: int, batch: int, executor=None, progress=None,
                      store_path: str = "devicediff.db", alpha: float = 0.05, retry_failed: bool = False,
                      only_configs: list[str] | None = None, pythons: dict[str, str] | None = None,
                      on_look: Callable[[dict], None] | None = None, n_sim: int = 400_000) -> Outcome:
    """Run ``study`` in batches of ``batch`` seeds until every (config, primary metric) is decided
    or ``max_seeds`` is reached; see the module docstring. ``on_look(payload)`` is called after
    each look (the CLI prints a line). Other arguments go to ``runner.run_study``."""
    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    if max_seeds < max(2, len(study.seeds)):
        raise UsageError(f"--max-seeds {max_seeds}: must be at least 2 and at least the study's "
                         f"{len(study.seeds)} seeds")
    if only_configs and study.reference not in only_configs:
        only_configs = [study.reference, *only_configs]
    seeds = seed_list(study, max_seeds)
    configs = [c.name for c in study.configs if c.name != study.reference
               and (not only_configs or c.name in only_configs)]
    if not configs:
        raise UsageError("--until-decided needs at least one config besides the reference")
    out, design, frozen = Outcome(), None, None
    k = 0
    while True:
        n_target = design.looks[k] if design else min(max(len(study.seeds), 2), max_seeds)
        sub = dataclasses.replace(study, seeds=tuple(seeds[:n_target]))
        machine, todo, _ = plan(sub, store, retry_failed=retry_failed)
        if only_configs:
            todo = [t for t in todo if t[1].config.name in only_configs]
        if todo:
            run_study(sub, store, store_path=store_path, executor=executor, retry_failed=retry_failed,
                      progress=progress, only_configs=only_configs, pythons=pythons)
        else:
            store.put_study(sub.study_id, sub.name, sub.to_dict())
        finals, primary = _finals(store, sub, machine)
        if design is None:  # the first look fixes the family, the design and the margins
            if not primary:
                raise UsageError(f"{study.name}: no primary metric in the first {n_target} seeds' runs")
            first = n_target
            design = SequentialDesign(max_seeds=max_seeds, batch=batch, alpha=alpha, first=first,
                                      n_tests=len(configs) * len(primary), n_sim=n_sim)
            frozen = _margins(study, finals, primary, set(seeds[:n_target]))
        payload = _look(k, design, finals, seeds[:n_target], configs, study.reference, frozen, out.decisions)
        payload.update(max_seeds=max_seeds, batch=batch, alpha=alpha, machine=machine)
        store.put_analysis(study.study_id, KIND, f"max={max_seeds}|batch={batch}|look={k + 1}", payload)
        out.looks.append(payload)
        out.seeds = n_target
        if on_look is not None:
            on_look(payload)
        if payload["status"] != "continue":
            out.status = payload["status"]
            return out
        k += 1


def _finals(store, sub: Study, machine: str) -> tuple[pd.DataFrame, list[str]]:
    """First finished runs of this machine (config = the study's config name) and the primary
    columns, as the loader resolves them."""
    r = load_results(store, sub, verdicts=False)
    fin = r.finished
    if len(fin) and "machine" in fin.columns and r.by_machine:
        fin = fin[fin["machine"] == machine]
    fin = fin[fin["repeat"] == 0].assign(config=lambda f: f["base_config"]) if len(fin) else fin
    return fin, list(r.primary)


def _values(finals: pd.DataFrame, config: str, metric: str, seeds: set) -> pd.Series:
    g = finals[(finals["config"] == config) & finals["seed"].isin(seeds)] if len(finals) else finals
    if metric not in getattr(g, "columns", ()):
        return pd.Series(dtype=float)
    return pd.Series(g[metric].to_numpy(dtype=float), index=g["seed"].to_numpy()).sort_index()


def _margins(study: Study, finals: pd.DataFrame, primary: list[str], seeds: set) -> dict[str, float]:
    """{metric: margin}, frozen at the first look."""
    out = {}
    for m in primary:
        if study.margin is not None:
            out[m] = abs(float(study.margin))
            continue
        ref = _values(finals, study.reference, m, seeds)
        ref = ref[np.isfinite(ref.to_numpy())]
        out[m] = float(study.margin_fraction * ref.std(ddof=1)) if ref.size >= 2 else math.nan
    return out


def _look(k: int, design: SequentialDesign, finals: pd.DataFrame, seeds: list[int], configs: list[str],
          reference: str, margins: dict[str, float], decided: dict) -> dict:
    """Assess every undecided comparison at look ``k``; update ``decided`` in place; the payload."""
    rows, seed_set = [], set(seeds)
    for metric, margin in margins.items():
        ref = _values(finals, reference, metric, seed_set)
        for cfg in configs:
            key = (cfg, metric)
            if key in decided and decided[key]["decision"] != "continue":
                rows.append(decided[key])
                continue
            cv = _values(finals, cfg, metric, seed_set)
            both = ref.index.intersection(cv.index)
            x, y = cv.loc[both].to_numpy(), ref.loc[both].to_numpy()
            ok = np.isfinite(x) & np.isfinite(y)
            scale = float(max(np.abs(x[ok]).max(), np.abs(y[ok]).max())) if ok.any() else None
            a = assess(k, x[ok] - y[ok], margin, design, scale=scale)
            if ok.sum() >= 2 and np.array_equal(x, y) and len(both) == len(seed_set):
                a["decision"] = "identical"  # bitwise, in every seed: a fact, not an inference
            row = {"config": cfg, "metric": metric, "margin": margin, **a}
            decided[key] = row
            rows.append(row)
    last = k == design.n_looks - 1
    undecided = [r for r in rows if r["decision"] in ("continue", "inconclusive")]
    status = "decided" if not undecided else ("max seeds" if last else "continue")
    return {"look": k + 1, "n_looks": design.n_looks, "seeds": len(seeds), "seed_list": list(seeds),
            "looks_planned": list(design.looks), "n_tests": design.n_tests, "margins": margins,
            "status": status, "comparisons": rows}


def look_line(payload: dict) -> str:
    """One line per look for the terminal: "look 2/10 at 6 seeds: cpu-4t differs, ... ; continue"."""
    comps = payload.get("comparisons", [])
    metrics = {c["metric"] for c in comps}
    parts = [f"{c['config']}{'' if len(metrics) == 1 else ' ' + c['metric']} {c['decision']}" for c in comps]
    return (f"look {payload['look']}/{payload['n_looks']} at {payload['seeds']} seeds: {', '.join(parts)}; "
            f"{payload['status']}")
