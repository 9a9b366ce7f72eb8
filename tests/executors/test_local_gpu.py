"""LocalExecutor on a real GPU machine (``pytest -m gpu``, on the device machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devicediff.executors import LocalExecutor
from devicediff.executors.local import visible_gpus

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import study_toml  # noqa: E402


def test_gpu_runs_are_pinned_and_share_slots(tmp_path):
    gpus = visible_gpus()
    if not gpus:
        pytest.skip("no GPU visible (nvidia-smi)")
    last = len(gpus) - 1
    configs = [
        {"name": "cuda-any", "device": "cuda", "deterministic": True},
        {"name": f"cuda-{last}", "device": f"cuda:{last}", "deterministic": True},
        {"name": "cpu-1t", "threads": 1},
    ]
    study = tmp_path / "gpu.toml"
    study.write_text(study_toml("gpu", seeds=2, steps=20, configs=configs))
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    db = tmp_path / "g.db"
    with open_store(str(db)) as s:
        run_study(load_study(study), s, store_path=str(db), executor=LocalExecutor(jobs=4, slots_per_gpu=2))
        runs = s.runs()
    assert set(runs["state"]) == {"finished"}, runs[["config", "state", "error"]]
    for _, r in runs.iterrows():
        place, eff = r["effective"]["placement"], r["effective"]
        if r["config"] == "cpu-1t":
            assert eff["cuda_visible_devices"] == "" and place["device"] == "cpu"
            continue
        assert place["device"] == "cuda:0" and eff["device"] == "cuda:0"
        assert eff["cuda_visible_devices"] == place["gpu"]
        if r["config"] == f"cuda-{last}":
            assert place["requested_device"] == f"cuda:{last}" and place["gpu"] == gpus[last]
    # same deterministic arithmetic on the same kind of GPU: same bits, whichever GPU ran it
    by = runs.pivot(index="seed", columns="config", values="final_sha256")
    if len(set(r["fingerprint"].get("gpus", [""])[0] for _, r in runs.iterrows() if r["config"] != "cpu-1t")) == 1:
        assert (by["cuda-any"] == by[f"cuda-{last}"]).all()
