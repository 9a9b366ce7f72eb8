"""Cost of diverge's teacher-state copy (``frameworks.torch.lockstep.teacher_sync``) on one device.

Each lockstep step starts by rounding the float64 reference state to the
config's dtype and loading it into the working model and optimizer. This times
that copy for the autoencoder of ``tests/diverge/autoencoder_gpu.toml``
(784-64-16-64-784, Adam): the earlier ``load_state_dict`` round trip, the
current copy alone, and the current copy while a helper thread writes step
files (as the lockstep loop's writer does).

    python benchmarks/teacher_sync.py                 # cuda if there is one, else cpu
    python benchmarks/teacher_sync.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from devicediff.stepfiles import write_step  # noqa: E402
from devicediff.frameworks.torch.lockstep import clone_state, teacher_sync  # noqa: E402


def load_state_dict_round_trip(m, opt, m64, opt64) -> None:
    """The copy as it was before: four ``load_state_dict`` calls, there and back."""
    m.load_state_dict(m64.state_dict())
    opt.load_state_dict(clone_state(opt64.state_dict()))
    m64.load_state_dict(m.state_dict())
    opt64.load_state_dict(clone_state(opt.state_dict()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=50, help="copies timed per variant")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    sizes = [784, 64, 16, 64, 784]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    m = torch.nn.Sequential(*layers).to(dev)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(64, 784, device=dev)).pow(2).mean().backward()
    opt.step()
    m64 = copy.deepcopy(m).to("cpu", torch.float64)
    opt64 = torch.optim.Adam(m64.parameters())
    opt64.load_state_dict(clone_state(opt.state_dict()))

    def wait() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(label: str, fn) -> None:
        wait()
        ts = []
        for _ in range(args.n):
            t = time.perf_counter()
            fn(m, opt, m64, opt64)
            wait()
            ts.append(time.perf_counter() - t)
        print(f"{label:48s} median {np.median(ts) * 1e3:6.2f} ms   p90 {np.percentile(ts, 90) * 1e3:6.2f} ms", flush=True)

    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    timed("load_state_dict round trip (before)", load_state_dict_round_trip)
    timed("teacher_sync alone", teacher_sync)
    arrays = {f"fwd/x{i}": np.random.rand(200_000) for i in range(40)}  # 64 MB of float64 per file
    stop = threading.Event()

    def writer(directory: str) -> None:
        i = 0
        while not stop.is_set():
            write_step(directory, i % 3, arrays)
            i += 1

    with tempfile.TemporaryDirectory() as d:
        th = threading.Thread(target=writer, args=(d,), daemon=True)
        th.start()
        try:
            timed("teacher_sync beside a thread writing step files", teacher_sync)
        finally:
            stop.set()
            th.join()


if __name__ == "__main__":
    main()
