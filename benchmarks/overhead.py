"""Harness overhead: time per training step under `devicediff run` vs a bare loop.

Both train the same autoencoder on the same MNIST batches on the same device
with the same thread count, each in its own fresh process. The harness figure
is the worker's own ``train_time`` (training steps only: evaluation and
checkpoints are timed separately and excluded, clocks read after device sync);
the bare loop is written here by hand, with no devicediff code in its hot path.
Repeats alternate the two to spread machine noise; the medians give the ratio.

    python benchmarks/overhead.py --device cpu --threads 1 --repeats 3
    python benchmarks/overhead.py --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

BARE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from devicediff.workloads.autoencoder.workload import Autoencoder
    a = json.loads(sys.argv[1])
    torch.set_num_threads(a["threads"])
    wl = Autoencoder(sizes=a["sizes"], batch_size=a["batch"], train_size=a["train_size"])  # same data arrays
    dev = torch.device(a["device"])
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False
    model = wl.build_model(0).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = wl.train_x
    order = torch.from_numpy(np.random.default_rng([0, 0]).permutation(len(x_all)))
    steps = len(x_all) // a["batch"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():  # warm-up, as the harness's step-0 evaluation does (cuBLAS handles, kernels)
        model(wl.eval_x[:1000].to(dev))
    sync(); t0 = time.perf_counter()
    for i in range(steps):
        x = x_all[order[i * a["batch"]:(i + 1) * a["batch"]]].to(dev)
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - x.reshape(x.shape[0], 784)) ** 2)
        loss.backward()
        opt.step()
        if (i + 1) % a["every"] == 0:
            loss.item()  # the harness also reads the loss at this cadence
    sync()
    print(json.dumps({"seconds": time.perf_counter() - t0, "steps": steps}))
    """
)


def bare(args) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    a = {"threads": args.threads, "sizes": args.sizes, "batch": args.batch, "train_size": args.train_size,
         "device": args.device, "every": args.every}
    out = subprocess.run([sys.executable, "-c", BARE, json.dumps(a)], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["seconds"] / r["steps"]


def harness(args, tmp: Path, i: int) -> float:
    study = tmp / f"h{i}.toml"
    gpu = args.device != "cpu"
    study.write_text(textwrap.dedent(f"""
        name = "overhead-{i}"
        reference = "x"
        [workload]
        name = "autoencoder"
        sizes = {json.dumps(args.sizes)}
        batch_size = {args.batch}
        train_size = {args.train_size}
        eval_size = 1000
        [seeds]
        list = [0]
        [budget]
        epochs = 1
        metric_every = {args.every}
        [[configs]]
        name = "x"
        device = "{args.device}"
        threads = {args.threads}
        {"tf32 = false" if gpu else ""}
    """))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    db = tmp / f"h{i}.db"
    subprocess.run([sys.executable, "-m", "devicediff", "run", str(study), "--store", str(db), "-q"], env=env,
                   check=True, capture_output=True, text=True)
    sys.path.insert(0, str(SRC))
    from devicediff.store import open_store

    with open_store(str(db)) as s:
        r = s.runs().iloc[0]
        assert r["state"] == "finished", r["error"]
        steps = args.train_size // args.batch
        return float(r["train_time"]) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--train-size", type=int, default=50000)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 64])
    p.add_argument("--every", type=int, default=10)
    args = p.parse_args()
    hs, bs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            bs.append(bare(args))
            hs.append(harness(args, Path(tmp), i))
            print(f"repeat {i}: bare {bs[-1] * 1e3:.3f} ms/step, devicediff {hs[-1] * 1e3:.3f} ms/step", flush=True)
    b, h = statistics.median(bs), statistics.median(hs)
    print(f"device={args.device} threads={args.threads} steps/run={args.train_size // args.batch}")
    print(f"median bare loop:  {b * 1e3:.3f} ms/step")
    print(f"median devicediff: {h * 1e3:.3f} ms/step")
    print(f"overhead ratio: {h / b:.3f} ({(h / b - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
