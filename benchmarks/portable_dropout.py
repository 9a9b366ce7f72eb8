"""Cost of portable dropout against nn.Dropout: forward + backward on one large float32 tensor.

The target (issue 18): within 1.5x of ``nn.Dropout`` on the GPU for a 64M-element tensor. On CUDA the
portable layer runs one fused Triton kernel forward (draw the mask, scale, write) and the same kernel
on the gradient backward (the mask is recomputed, never stored); without Triton, and on the CPU, it
runs eager int64 tensor operations. Each figure is the median over ``--reps`` timings of ``--inner``
back-to-back calls (after ``--warmup`` calls), the device synchronised before every clock read;
``--inner 1`` measures one call's latency, launch overhead included.

    python benchmarks/portable_dropout.py                     # CUDA if available (64M), else CPU (4M)
    python benchmarks/portable_dropout.py --device cpu --size 4194304

Prints one JSON line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from devicediff.portable import _torch_philox  # noqa: E402
from devicediff.portable.torch import Dropout, PortableRandom  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int, inner: int) -> list[float]:
    """Seconds per call: ``reps`` timings of ``inner`` back-to-back calls each (as in a training loop,
    where launches overlap the previous kernels), the device synchronised before each clock read."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="elements (default 64M on CUDA, 4M on CPU)")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inner", type=int, default=10, help="calls per timing (1: latency of one call)")
    ap.add_argument("--eager", action="store_true", help="force the eager torch path (no Triton)")
    args = ap.parse_args(argv)
    if args.eager:
        os.environ["DEVICEDIFF_PORTABLE_TRITON"] = "0"
    device = torch.device(args.device)
    n = args.size or ((64 << 20) if device.type == "cuda" else (4 << 20))
    x = torch.randn(n, device=device, requires_grad=True)
    g = torch.randn(n, device=device)
    ctx = PortableRandom(1)
    layers = {"nn.Dropout": nn.Dropout(args.p), "portable Dropout": Dropout(args.p, name="bench", ctx=ctx)}
    path = "triton" if _torch_philox._use_triton(device) else "eager"
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "elements": n, "p": args.p,
           "portable_path": path}
    print(json.dumps(env))
    med = {}
    for name, layer in layers.items():
        def fwd_bwd():
            x.grad = None
            layer(x).backward(g)
            ctx.advance()

        def fwd():
            with torch.no_grad():
                layer(x)
            ctx.advance()

        for what, fn in (("forward+backward", fwd_bwd), ("forward", fwd)):
            ts = timed(fn, device, args.reps, args.warmup, args.inner)
            med[(name, what)] = statistics.median(ts)
            print(json.dumps({"layer": name, "what": what, "median_ms": round(1e3 * med[(name, what)], 3),
                              "min_ms": round(1e3 * min(ts), 3), "reps": args.reps,
                              "inner": args.inner}))
    for what in ("forward+backward", "forward"):
        r = med[("portable Dropout", what)] / med[("nn.Dropout", what)]
        print(f"{what}: portable / nn.Dropout = {r:.2f}x  ({device.type}, {n} elements, {path} path)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
