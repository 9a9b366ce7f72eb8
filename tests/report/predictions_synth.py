"""A synthetic classifier study written through the Store API (no training): held-out
predictions, labels and probabilities as ``.npy`` artifacts, per-class accuracies, and a run
warning, as the classifier workload and the runner record them.

Configs (reference ``cpu-1t``), on the first ``N`` MNIST validation digits (their true labels,
so the report can load the images and check them against ``labels.npy``):

- ``cpu-1t``: per seed, the true labels with a seed-dependent 4-5% of inputs wrong;
- ``cpu-2t``: the reference's predictions of the same seed, 3 inputs changed (less churn than
  a seed change);
- ``gpu-dropout``: the reference's predictions with 90% of class 3 predicted as 5 and 60% of
  class 4 as 9 (churn above the seed floor; classes 3 and 4 lose accuracy), and a recorded
  warning: dropout drawn on the device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from devicediff.store import RunInfo, SQLiteStore

N = 200
K = 10
WARNING = "cuda: draws random numbers on the device during training (module 2: Dropout); configs on other devices are not paired"
CONFIGS = ("cpu-1t", "cpu-2t", "gpu-dropout")


def true_labels(n: int = N) -> np.ndarray:
    try:
        from devicediff.data.mnist import load_mnist

        return load_mnist("valid")[1][:n].astype(np.int64)
    except Exception:  # noqa: BLE001 - without MNIST the report shows indices only
        return np.random.default_rng(0).integers(0, K, n)


def predictions(config: str, seed: int, y: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    ref = y.copy()
    wrong = rng.choice(len(y), size=len(y) // 25 + seed % 3, replace=False)  # 4-5% wrong
    ref[wrong] = (ref[wrong] + 1 + rng.integers(0, K - 1, len(wrong))) % K
    if config in ("cpu-1t", "cpu-4t"):  # cpu-4t: the reference's predictions (tests give it an offset)
        return ref
    out = ref.copy()
    r2 = np.random.default_rng(2000 + seed)
    if config == "cpu-2t":
        idx = r2.choice(len(y), size=3, replace=False)
        out[idx] = (out[idx] + 1) % K
        return out
    for k, to, share in ((3, 5, 0.9), (4, 9, 0.6)):
        idx = np.flatnonzero(y == k)
        out[idx[r2.random(len(idx)) < share]] = to
    return out


def make_store(db: Path, files: Path, *, seeds: int = 6, configs=CONFIGS, with_predictions: bool = True,
               offset: dict | None = None, params: dict | None = None, workload: str = "classifier") -> SQLiteStore:
    """``offset``: {config: constant added to eval_accuracy in every seed} (zero-variance differences)."""
    files.mkdir(parents=True, exist_ok=True)
    y = true_labels()
    store = SQLiteStore(db)
    definition = {
        "workload": workload, "workload_params": params or {"data": "mnist", "eval_size": N},
        "reference": configs[0], "configs": [{"name": c, "device": "cuda" if "gpu" in c else "cpu"} for c in configs],
        "vary": ["init", "data"], "base_seed": 0, "budget": {"epochs": 1, "steps": None, "metric_every": 10},
        "seeds": list(range(seeds)), "repeats": 1, "margin": None, "margin_fraction": 0.5, "primary": [],
        "name": "classify",
    }
    sid = hashlib.sha256(repr(("classify", seeds, configs, with_predictions, db.name)).encode()).hexdigest()[:16]
    store.put_study(sid, "classify", definition)
    for seed in range(seeds):
        for name in configs:
            rid = hashlib.sha256(f"{sid}{name}{seed}".encode()).hexdigest()[:16]
            store.begin_run(RunInfo(rid, sid, f"{name}|seed={seed}|rep=0", name, seed, seed, seed, 0, "classifier",
                                    {"name": name}, "m1"))
            pred = predictions(name, seed, y)
            acc = float((pred == y).mean()) + (offset or {}).get(name, 0.0)
            rows = [[s, "train_loss", 2.0 / s + seed / 100] for s in (10, 20, 30)]
            rows += [[0, "eval_accuracy", 0.1], [30, "eval_accuracy", acc],
                     [30, "eval_loss", 0.3 + (1 - acc) + seed / 1000]]
            for k in range(K):
                sel = y == k
                rows.append([30, f"eval_acc_class_{k}", float((pred[sel] == k).mean()) if sel.any() else 0.0])
            store.add_metrics(rid, rows)
            if with_predictions:
                for art, arr in (("predictions", pred.astype(np.int16)), ("labels", y.astype(np.int16)),
                                 ("probs", np.eye(K, dtype=np.float16)[pred])):
                    path = files / f"{rid}_{art}.npy"
                    np.save(path, arr)
                    store.add_artifact(rid, art, str(path))
            eff = {"device": "cuda" if "gpu" in name else "cpu", "precision": "fp32"}
            if name == "gpu-dropout":
                eff["warnings"] = [WARNING]
            fp = {"libraries": {"numpy": "2.0.1", "torch": "2.13.0" if "gpu" not in name else "2.11.0+cu130"}}
            store.update_run(rid, state="finished", fingerprint=fp, effective=eff, init_sha256=f"i{seed}",
                             final_sha256=f"f{name}{seed}", wall_time=2.0, train_time=1.0,
                             finished_at=1000.0 + 2.0 * (seed * len(configs) + configs.index(name)))
    return store
