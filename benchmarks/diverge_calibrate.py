"""Calibrate `devicediff diverge`'s suspect factor: how far below its own rounding bound does a
correct side stay? (docs/diverge.md, "The rounding model").

For every benign pair (two configs that compute the same mathematics) it runs ``diverge`` and
collects, for every tensor a side's rounding model covers, ``own = ‖X − replay‖ / bound`` (the
tensor's own error, its operation replayed in float64 on the side's own inputs, over
``k·u·‖|A|·|B|‖``). A side is ``suspect`` when ``own > SUSPECT_FACTOR``; the factor is right when
the benign pairs give (far) fewer than 1% of tensors above it. It also prints the planted faults'
ratios, so the sensitivity is in the same table.

    python benchmarks/diverge_calibrate.py                  # CPU: autoencoder, tiny PredNet (both
                                                            # variants), the planted-fault MLP;
                                                            # threads 1 vs 2
    python benchmarks/diverge_calibrate.py --gpu            # the GPU machine: CPU vs GPU with cuDNN
                                                            # on/off, deterministic, TF32, bf16, fp16
    python benchmarks/diverge_calibrate.py --faults         # the planted faults of tests/diverge/faults.py:
                                                            # where each is found, its ratio and margin

One JSON line per pair (``pair``, ``tensors``, ``own_p50``, ``own_p99``, ``own_max``, ``above``,
``verdict``, ``max_ratio``), then a summary line (``all``). Each pair's studies are written to a
temporary folder from the TOML below (no file of the repository changes).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

AE = """
name = "calib-autoencoder"
reference = "cpu-1t"
[workload]
name = "autoencoder"
sizes = [64, 16]
batch_size = 64
train_size = 1024
eval_size = 256
[seeds]
count = 1
[budget]
steps = 20
"""

PREDNET = """
name = "calib-prednet-{variant}"
reference = "cpu-1t"
[workload]
name = "prednet"
variant = "{variant}"
layers = 3
channels = [1, 4, 8]
height = 16
width = 16
window = 5
sequence_length = {seq}
sequences = 4
test_sequences = 1
eval_batch_size = 1
[seeds]
count = 1
[budget]
steps = 4
"""

MLP = (ROOT / "tests" / "diverge" / "faults.toml").read_text().replace('"faults.py:make"', '"{faults}:make"')

CPU_CONFIGS = """
[[configs]]
name = "cpu-1t"
threads = 1
[[configs]]
name = "cpu-2t"
threads = 2
"""

GPU_CONFIGS = CPU_CONFIGS + """
[[configs]]
name = "cuda"
device = "cuda"
tf32 = false
[[configs]]
name = "cuda-nocudnn"
device = "cuda"
cudnn = false
tf32 = false
[[configs]]
name = "cuda-det"
device = "cuda"
deterministic = true
tf32 = false
[[configs]]
name = "cuda-tf32"
device = "cuda"
tf32 = true
[[configs]]
name = "cuda-bf16"
device = "cuda"
precision = "bf16-autocast"
[[configs]]
name = "cuda-fp16"
device = "cuda"
precision = "fp16-autocast"
"""


def studies(tmp: Path, gpu: bool) -> list[tuple[str, Path, list[tuple[str, str]], int]]:
    """(label, study file, pairs, steps)."""
    configs = GPU_CONFIGS if gpu else CPU_CONFIGS
    pairs = [("cpu-1t", "cpu-2t")]
    if gpu:
        pairs = [("cpu-1t", b) for b in ("cuda", "cuda-nocudnn", "cuda-det", "cuda-tf32", "cuda-bf16", "cuda-fp16")]
    out = []
    (tmp / "ae.toml").write_text(AE + configs)
    out.append(("autoencoder", tmp / "ae.toml", pairs, 20))
    for variant in ("chainer-lineage", "lotter"):
        f = tmp / f"prednet-{variant}.toml"
        seq = 11 if variant == "chainer-lineage" else 5  # lotter: one window is one sequence
        f.write_text(PREDNET.format(variant=variant, seq=seq) + configs)
        out.append((f"prednet-{variant}", f, pairs, 4))
    f = tmp / "mlp.toml"
    faults = ROOT / "tests" / "diverge" / "faults.py"
    text = MLP.replace("{faults}", str(faults))
    if gpu:  # the MLP's own configs, plus the GPU ones
        text += "\n".join(GPU_CONFIGS.split("\n")[7:])
    f.write_text(text)
    mlp_pairs = [("clean", "clean-2t")] + ([("clean", b) for b in ("cuda", "cuda-tf32", "cuda-bf16")] if gpu else [])
    out.append(("mlp", f, mlp_pairs, 8))
    return out


def own_ratios(payload: dict) -> list[float]:
    vals = []
    for r in payload["rows"]:
        for k in ("own_a", "own_b"):
            v = r.get(k)
            if v is not None and math.isfinite(v):
                vals.append(v)
    return vals


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.nan


FAULT_PAIRS = [("clean-2t", 3), ("tiny-eps", 3), ("tensor-hook", 2), ("forward-hook", 2), ("backward-hook", 2),
               ("global-flag", 2), ("weight-decay", 2), ("bn-momentum", 2), ("adam-beta2", 2), ("late-scale", 4),
               ("dropout-2t", 2)]


def faults() -> None:
    """Each planted fault of tests/diverge/faults.toml against the clean config (CPU, 1 thread)."""
    from devicediff.diverge.lockstep import diverge
    from devicediff.study import load_study

    study = load_study(ROOT / "tests" / "diverge" / "faults.toml")
    with tempfile.TemporaryDirectory() as tmp:
        for b, steps in FAULT_PAIRS:
            a = "dropout" if b.startswith("dropout") else "clean"
            p = diverge(study, a, b, steps=steps, workdir=Path(tmp) / b)
            s = p["summary"]
            fb = s["first_beyond"] or {}
            print(json.dumps({"pair": f"{a} vs {b}", "steps": steps, "verdict": s["verdict"],
                              "first_beyond": f"step {fb['step']}, {fb['kind']} {fb['name']}" if fb else None,
                              "ratio": fb.get("ratio"), "margin": fb.get("margin"),
                              "suspect": s.get("suspect"), "sensitivity": s.get("sensitivity")}), flush=True)
        gate(Path(tmp))


def gate(tmp: Path) -> None:
    """The single perturbed ConvLSTM gate operation (tests/diverge/faults.py:prednet_gate)."""
    from devicediff.diverge.lockstep import diverge
    from devicediff.study import load_study

    here = ROOT / "tests" / "diverge"
    text = (here / "prednet_tiny.toml").read_text().replace('name = "prednet"',
                                                            f'name = "{here / "faults.py"}:prednet_gate"')
    text += '\n[[configs]]\nname = "gate"\ndevice = "cpu"\nthreads = 1\nparams = { fault = "gate_slope" }\n'
    (tmp / "gate.toml").write_text(text)
    p = diverge(load_study(tmp / "gate.toml"), "cpu-1t", "gate", steps=1, workdir=tmp / "gate")
    s = p["summary"]
    fb = s["first_beyond"] or {}
    fwd = [r["ratio"] for r in p["rows"] if r["kind"] == "fwd" and r["cls"] != "identical"]
    loss = [r["cls"] for r in p["rows"] if r["kind"] == "loss"]
    print(json.dumps({"pair": "prednet tiny: cpu-1t vs gate", "verdict": s["verdict"],
                      "first_beyond": f"step {fb['step']}, {fb['kind']} {fb['name']}" if fb else None,
                      "ratio": fb.get("ratio"), "margin": fb.get("margin"),
                      "fwd_ratio_range": [min(fwd), max(fwd)] if fwd else None, "loss": loss}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CPU vs GPU pairs (the GPU machine)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every pair's steps")
    ap.add_argument("--only", nargs="*", help="workloads to run (autoencoder, prednet-chainer-lineage, "
                                                 "prednet-lotter, mlp); default all")
    ap.add_argument("--pairs", nargs="*", help="only these B configs (e.g. cuda-tf32 cuda-fp16); default all")
    ap.add_argument("--faults", action="store_true", help="the planted faults instead (CPU)")
    args = ap.parse_args()
    if args.faults:
        faults()
        return 0
    from devicediff.diverge.compare import SUSPECT_FACTOR
    from devicediff.diverge.lockstep import diverge
    from devicediff.study import load_study

    every: list[float] = []
    print(json.dumps({"machine": platform.processor() or platform.machine(), "suspect_factor": SUSPECT_FACTOR}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, path, pairs, steps in studies(tmp, args.gpu):
            if args.only and label not in args.only:
                continue
            study = load_study(path)
            for a, b in pairs:
                if args.pairs and b not in args.pairs:
                    continue
                n = max(1, int(steps * args.steps_scale))
                t = time.perf_counter()
                p = diverge(study, a, b, steps=n, workdir=tmp / f"w-{label}-{b}")
                own = own_ratios(p)
                every += own
                worst = max((r for r in p["rows"] if r.get("own_a") is not None or r.get("own_b") is not None),
                            key=lambda r: max(r.get("own_a") or 0, r.get("own_b") or 0), default=None)
                print(json.dumps({
                    "pair": f"{label}: {a} vs {b}", "steps": n, "tensors": len(own),
                    "own_p50": quantile(own, 0.5), "own_p99": quantile(own, 0.99), "own_max": max(own, default=None),
                    "worst": f"{worst['kind']} {worst['name']} step {worst['step']}" if worst else None,
                    "above": sum(v > SUSPECT_FACTOR for v in own), "verdict": p["summary"]["verdict"],
                    "max_ratio": max((r["ratio"] or 0 for r in p["rows"]), default=0),
                    "sensitivity_median": (p["summary"].get("sensitivity") or {}).get("median"),
                    "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    above = sum(v > SUSPECT_FACTOR for v in every)
    print(json.dumps({"all": True, "tensors": len(every), "own_p50": quantile(every, 0.5),
                      "own_p99": quantile(every, 0.99), "own_max": max(every, default=None), "above": above,
                      "false_suspect_rate": above / len(every) if every else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
