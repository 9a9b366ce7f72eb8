"""Stores of a real ``Study`` written through the Store API as ``run_study`` writes them, with
numbers chosen by the test (no training: milliseconds). For the read side: ``tests/analysis``,
``tests/export``, ``tests/test_tables.py``. Real training is in ``tests/analysis/test_load.py``.
"""

from __future__ import annotations

import hashlib

from devicediff.store import RunInfo, Store
from devicediff.study import Study, parse_study


def make_study(name: str = "fake", *, seeds: int = 3, train_size: int | None = None, configs=("cpu-1t", "cpu-2t"),
               epochs: int = 1) -> Study:
    workload = {"name": "autoencoder", "sizes": [8, 4]}
    if train_size is not None:
        workload["train_size"] = train_size
    return parse_study({
        "name": name, "reference": configs[0], "workload": workload, "seeds": {"count": seeds},
        "budget": {"epochs": epochs}, "configs": [{"name": c, "threads": i + 1} for i, c in enumerate(configs)],
    })


def eval_loss(config: str, seed: int) -> float:
    """The default final eval loss: ``1 + seed/10``, plus 0.5 on every config but the first."""
    return 1.0 + seed / 10 + (0.0 if config.endswith("1t") else 0.5)


def fill(store: Store, study: Study, *, machine: str = "m1", value=eval_loss, failed: tuple = ()) -> list[str]:
    """One run per cell of ``study`` on ``machine``: train_loss at steps 10..50, eval_loss at 0 and
    50 (the last is ``value(config, seed)``); cells ``(config, seed)`` in ``failed`` fail. Run ids."""
    store.put_study(study.study_id, study.name, study.to_dict())
    ids = []
    for cell in study.cells():
        cfg, seed = cell.config.name, cell.seed
        rid = hashlib.sha256(f"{study.study_id}|{cell.key}|{machine}".encode()).hexdigest()[:16]
        ids.append(rid)
        store.begin_run(RunInfo(rid, study.study_id, cell.key, cfg, seed, cell.init_seed, cell.data_seed, cell.repeat,
                                study.workload, cell.config.to_dict(), machine))
        store.record(rid, {"kind": "init", "sha256": f"init-{seed}"})
        if (cfg, seed) in failed:
            store.record(rid, {"kind": "done", "state": "failed", "error": "boom"})
            continue
        rows = [[s, "train_loss", 2.0 / s + seed / 100] for s in (10, 20, 30, 40, 50)]
        rows += [[0, "eval_loss", 3.0], [50, "eval_loss", float(value(cfg, seed))]]
        store.record(rid, {"kind": "metrics", "rows": rows})
        store.record(rid, {"kind": "done", "state": "finished", "final_sha256": f"final-{cfg}-{seed}",
                           "wall_time": 1.0, "train_time": 0.5})
    return ids
