"""Stores for the verdict readers (loader, tables, export, until-decided): a real ``Study``
written through the Store API with final metric values chosen by the test (no training)."""

from __future__ import annotations

import hashlib

import numpy as np

from devicediff.store import RunInfo
from devicediff.study import parse_study


def prednet_like(store, *, primary=None, seeds=5, margin=None, shift=0.01):
    """A PredNet study (the workload declares eval_mse primary, baseline_* checks) with made-up
    finals: cpu-2t shifts eval_mse by ``shift`` (+0.01) with noise, eval_loss = 20 x eval_mse, eval_ssim
    noisy, baseline_* the same on every run; cpu-3t is bitwise the reference."""
    doc = {"name": "pn", "reference": "cpu-1t", "workload": {"name": "prednet"}, "seeds": {"count": seeds},
           "budget": {"epochs": 1}, "configs": [{"name": f"cpu-{i}t", "threads": i} for i in (1, 2, 3)]}
    verdict = {k: v for k, v in (("primary", primary), ("margin", margin)) if v is not None}
    if verdict:
        doc["verdict"] = verdict
    st = parse_study(doc)
    rng = np.random.default_rng(3)
    noise = {(c, s): rng.normal(0, 1e-3) for c in ("cpu-1t", "cpu-2t") for s in range(seeds)}
    noise.update({("cpu-3t", s): noise[("cpu-1t", s)] for s in range(seeds)})

    def metrics(cfg, seed):
        mse = 0.02 + seed * 1e-3 + noise[(cfg, seed)] + (shift if cfg == "cpu-2t" else 0.0)
        return {"eval_mse": mse, "eval_loss": 20 * mse, "eval_ssim": 0.7 + 3 * noise[(cfg, seed)] + 0.01 * seed,
                "baseline_mse": 0.0356, "baseline_ssim": 0.506}

    fill_metrics(store, st, metrics)
    return st


def fill_metrics(store, study, metrics, *, machine="m1"):
    """One finished run per cell with the final values ``metrics(config, seed)`` (a dict)."""
    store.put_study(study.study_id, study.name, study.to_dict())
    for cell in study.cells():
        cfg, seed = cell.config.name, cell.seed
        rid = hashlib.sha256(f"{study.study_id}|{cell.key}|{machine}".encode()).hexdigest()[:16]
        store.begin_run(RunInfo(rid, study.study_id, cell.key, cfg, seed, cell.init_seed, cell.data_seed,
                                cell.repeat, study.workload, cell.config.to_dict(), machine))
        rows = [[10, k, float(v)] for k, v in metrics(cfg, seed).items()]
        store.record(rid, {"kind": "metrics", "rows": rows})
        store.record(rid, {"kind": "done", "state": "finished", "final_sha256": f"{cfg}-{seed}"})
