"""A synthetic study written through the Store API: no training, runs in well under a second.

Configs (reference ``cpu-1t``):

- ``cpu-4t``: other bits, numbers within ~1e-6 relative noise of the reference (equivalent);
- ``gpu-tf32``: +3% on every loss (differs); weights 1e-3 away;
- ``<script>alert(1)</script>``: bitwise identical to the reference (hostile name, must be escaped);
- ``cuda-broken``: every run failed or skipped, with a hostile error message.

The reference has a bitwise-equal repeat for two seeds. Weight snapshots at steps 0, 50, 100
(``.npy``, flat float64), PredNet-style ``prediction_grid`` PNGs for every config and seed, and
one ``diverge`` analysis with a hostile payload.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from devicediff.store import RunInfo, SQLiteStore

XSS = "<script>alert(1)</script>"
ERR = "RuntimeError: <b>CUDA</b> device not found & no fallback"
DIVERGE_XSS = "<img src=x onerror=alert(2)>"
STEPS = list(range(10, 101, 10))
EVAL_STEPS = [0, 50, 100]
FP = {
    "cpu_model": "Test CPU 9000", "cpu_isa": ["avx2", "fma"], "cpu_count": 8, "cpu_affinity": 8,
    "machine": "x86_64", "os": "Linux 6.1", "python": "3.11.7", "libraries": {"numpy": "2.0", "torch": "2.13.0"},
    "blas": [{"internal_api": "openblas", "version": "0.3", "architecture": "Haswell", "user_api": "blas"}],
    "hostname": "secret-host-name", "node": "secret-node",
}
GPU_FP = {**FP, "gpus": ["NVIDIA H100 80GB HBM3"], "gpu_memory_gib": [79.2], "gpu_capability": ["9.0"],
          "driver": "580.1", "cuda_runtime": "13.0", "cudnn": 91900}

CONFIGS = [
    # name, loss factor, weight offset scale (None: bitwise equal to reference), state, fingerprint
    ("cpu-1t", 1.0, None, "finished", FP),
    ("cpu-4t", 1.0, 1e-7, "finished", FP),  # rounding-level noise around the reference (below)
    ("gpu-tf32", 1.03, 1e-3, "finished", GPU_FP),
    (XSS, 1.0, None, "finished", FP),
    ("cuda-broken", 1.0, None, "failed", GPU_FP),
]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _png(path: Path, seed: int, shift: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 1.2), dpi=50)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.imshow(np.random.default_rng(seed).random((8, 24)) + shift, cmap="gray")
    ax.axis("off")
    fig.savefig(path)


def make_store(db: Path, files: Path, *, seeds: int = 6, study_name: str = "synth", machines: tuple[str, ...] = ("aaaaaa1111",),
               description: str = "A synthetic study <em>not</em> from training.", with_files: bool = True,
               configs=CONFIGS) -> SQLiteStore:
    files.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(db)
    definition = {
        "workload": "autoencoder", "workload_params": {"sizes": [8, 4]}, "reference": "cpu-1t",
        "configs": [{"name": c[0], "device": "cuda" if c[4] is GPU_FP else "cpu", "threads": 4 if c[0] == "cpu-4t" else 1,
                     "params": {}} for c in configs],
        "vary": ["init", "data"], "base_seed": 0, "budget": {"epochs": None, "steps": 100, "metric_every": 10},
        "seeds": list(range(seeds)), "repeats": 1, "margin": None, "margin_fraction": 0.5, "description": description,
        "name": study_name,
    }
    sid = hashlib.sha256(repr((study_name, seeds, machines, len(configs))).encode()).hexdigest()[:16]
    store.put_study(sid, study_name, definition)
    n_w = 50
    for m_i, machine in enumerate(machines):
        for seed in range(seeds):
            seed_level = 1.0 + 0.05 * np.random.default_rng(seed).standard_normal()
            w0 = np.random.default_rng(100 + seed).standard_normal(n_w)
            for ci, (name, factor, wscale, state, fp) in enumerate(configs):
                reps = 2 if name == "cpu-1t" and seed < 2 and m_i == 0 else 1
                for rep in range(reps):
                    rid = hashlib.sha256(f"{sid}{machine}{name}{seed}{rep}".encode()).hexdigest()[:16]
                    cj = {"name": name, "device": definition["configs"][ci]["device"],
                          "threads": definition["configs"][ci]["threads"], "note": f"note of {name}", "params": {}}
                    store.begin_run(RunInfo(rid, sid, f"{name}|seed={seed}|rep={rep}", name, seed, seed, seed, rep,
                                            "autoencoder", cj, machine))
                    if state != "finished":
                        st = "failed" if seed % 2 == 0 else "skipped"
                        store.update_run(rid, state=st, error=ERR if st == "failed" else "no GPU here: skipped",
                                         fingerprint=fp)
                        continue
                    rows = []
                    mfac = factor * (1.0 + 0.01 * m_i)  # another machine: 1% off
                    if name == "cpu-4t":  # rounding-level noise, unlike the reference's
                        mfac *= 1.0 + 1e-6 * np.random.default_rng(50 + seed).standard_normal()
                    for s in STEPS:
                        rows.append([s, "train_loss", float(seed_level * mfac * (0.05 + 0.5 * np.exp(-s / 30)))])
                    for s in EVAL_STEPS:
                        rows.append([s, "eval_loss", float(seed_level * mfac * (0.04 + 0.5 * np.exp(-s / 40)))])
                    store.add_metrics(rid, rows)
                    init_sha = None
                    final_sha = None
                    for s in EVAL_STEPS:
                        w = w0 * (1 - s / 400)
                        if wscale is not None and s > 0:
                            w = w + wscale * (s / 100) * np.random.default_rng(7 + seed).standard_normal(n_w)
                        if m_i > 0 and s > 0:
                            w = w + 1e-5 * (s / 100)
                        sha = _sha(w)
                        path = None
                        if with_files:
                            path = files / f"{rid}_w{s}.npy"
                            np.save(path, w)
                        store.add_weights(rid, s, sha, str(path) if path else None)
                        init_sha = sha if s == 0 else init_sha
                        final_sha = sha
                    if with_files:
                        gp = files / f"{rid}_grid.png"
                        _png(gp, seed, ci)
                        store.add_artifact(rid, "prediction_grid", str(gp))
                    else:
                        store.add_artifact(rid, "prediction_grid", str(files / "gone" / f"{rid}_grid.png"))
                    store.update_run(rid, state="finished", fingerprint=fp, init_sha256=init_sha, final_sha256=final_sha,
                                     effective={"device": cj["device"], "torch_threads": cj["threads"], "tf32_conv": name == "gpu-tf32"},
                                     wall_time=1.0, train_time=0.5 + ci)
    store.put_analysis(sid, "diverge", "cpu-1t~gpu-tf32", {
        "study": study_name, "a": "cpu-1t", "b": DIVERGE_XSS, "seed": 0, "steps": 2, "threshold": 100.0,
        "workdir": "/home/someone/private",
        "summary": {"verdict": "beyond rounding", "line": "first difference: step 1; verdict: beyond rounding",
                    "first_difference": {"step": 1, "kind": "fwd", "name": "enc.0", "ratio": 3.5, "rel_l2": 1e-7},
                    "first_beyond": {"step": 1, "kind": "grad", "name": "enc.0.weight", "ratio": 250.0, "rel_l2": 1e-3}},
        "rows": [{"step": st, "kind": "grad", "name": "enc.0.weight", "module": "enc.0", "rel_l2": 1e-3 * st,
                  "err_a": 1e-7, "err_b": 2e-7, "cls": "beyond rounding", "ratio": 250.0} for st in (1, 2)],
        "free": [],
    })
    return store
