"""Training speed of the PredNet workload (issue 7).

Measures sequences per second of full training steps (forward + backward +
Adam step) for both variants, on CPU and on the GPU when there is one, and
counts the FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode``
to report achieved TFLOP/s and the fraction of the card's fp32 peak.

Settings of the headline number (issue 7): ``lotter`` at batch 4, 128x160,
nt = 10, float32, TF32 off, eager, cudnn.benchmark off: option ``eager``, the
workload's default model (with its ``CUDNN_ROUTES`` on Hopper GPUs). The chainer-lineage
step is one window of 20 frames at batch 1, 120x160 (a "sequence" there is one
window). Synthetic frames (uniform in [0, 1)): speed does not depend on the
pixels.

Options that change the arithmetic (``--options``) are measured separately and
never used by the workload's default (join several with "+"): ``nocudnn``,
``deterministic``, ``cudnn_benchmark``, ``channels_last``,
``tf32``, ``cudagraph`` (whole step captured, Adam(capturable=True)),
``compile`` (torch.compile, default mode), ``batch_wgrad`` (each conv's weight
gradient once per step over all time steps, ``PredNet.set_batch_wgrad``: chainer-lineage; lotter's
default), ``stepwgrad`` (each conv's weight gradient per time step, summed by autograd: lotter's
default before 2026-12-03) and
``nogc`` (Python's cyclic garbage collector frozen and off during the timed steps: the same
arithmetic), ``unfused`` (eager's elementwise kernels for the lotter cell and the error units instead of
``fused.py``'s: the same bits), ``flipfresh`` (the routed convs flip their weights at every call, as
before the flip cache), ``routes`` (the fastest cuDNN entry points measured by ``--conv-table`` in
this run, instead of the table shipped in model.py), ``plain`` (no routes:
conv2d everywhere) and ``naive`` (a straightforward port
with four separate gate convolutions, for comparison).

Usage::

    PYTHONPATH=src python benchmarks/prednet_speed.py                 # CPU (+ GPU if any)
    PYTHONPATH=src python benchmarks/prednet_speed.py --options all --profile
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from devicediff.workloads.prednet.model import Conv3x3, PredNet, build_prednet  # noqa: E402
from devicediff.workloads.prednet.workload import lotter_loss, window_mse_loss  # noqa: E402

# fp32 (non-tensor-core) peak, TFLOP/s, from NVIDIA's datasheets.
FP32_PEAK = [
    ("H100 PCIe", 51.0),
    ("H100 NVL", 60.0),
    ("H100", 67.0),  # SXM5 (the "H100 80GB HBM3" of this workplace)
    ("H200", 67.0),  # same GH100 SXM part
    ("A100", 19.5),
    ("L40S", 91.6),
    ("A10", 31.2),
    ("V100", 15.7),
]

SETTINGS = {
    "lotter": dict(batch=4, height=128, width=160, frames=10, in_ch=3),
    "chainer-lineage": dict(batch=1, height=120, width=160, frames=20, in_ch=3),
}


def fp32_peak(name: str) -> float | None:
    for key, peak in FP32_PEAK:
        if key.lower() in name.lower():
            return peak
    return None


# ----------------------------------------------------------------------------------------
# A straightforward port, for comparison only: four gate convolutions, explicit cats.
# Same function as PredNet(variant="lotter"); weights are copied from it.
# ----------------------------------------------------------------------------------------


class NaiveLotter(nn.Module):
    def __init__(self, fused: PredNet):
        super().__init__()
        self.nl = fused.num_layers
        self.convs = nn.ModuleDict()
        for l, layer in enumerate(fused.layers):
            n = layer.r_ch
            w, b = layer.lstm.weight.detach(), layer.lstm.bias.detach()
            for k, gate in enumerate("ifog"):
                conv = nn.Conv2d(w.shape[1], n, 3, padding=1)
                conv.weight.data.copy_(w[k * n : (k + 1) * n])
                conv.bias.data.copy_(b[k * n : (k + 1) * n])
                self.convs[f"{gate}{l}"] = conv
            p = nn.Conv2d(layer.r_ch, layer.a_ch, 3, padding=1)
            p.weight.data.copy_(layer.conv_p.weight.detach())
            p.bias.data.copy_(layer.conv_p.bias.detach())
            self.convs[f"p{l}"] = p
            if layer.conv_a is not None:
                a = nn.Conv2d(layer.conv_a.in_channels, layer.conv_a.out_channels, 3, padding=1)
                a.weight.data.copy_(layer.conv_a.weight.detach())
                a.bias.data.copy_(layer.conv_a.bias.detach())
                self.convs[f"a{l}"] = a
        self.channels, self.r_channels = fused.channels, fused.r_channels

    def forward(self, frames):
        b, T, _, h, w = frames.shape
        z = lambda c, l: frames.new_zeros(b, c, h >> l, w >> l)  # noqa: E731
        r = [z(c, l) for l, c in enumerate(self.r_channels)]
        c = [z(c, l) for l, c in enumerate(self.r_channels)]
        e = [z(2 * a, l) for l, a in enumerate(self.channels)]
        loss = 0.0
        for t in range(T):
            new_r = [None] * self.nl
            for l in reversed(range(self.nl)):
                inputs = [e[l], r[l]]
                if l < self.nl - 1:
                    inputs.append(F.interpolate(new_r[l + 1], scale_factor=2, mode="nearest"))
                x = torch.cat(inputs, 1)
                i = torch.clamp(0.2 * self.convs[f"i{l}"](x) + 0.5, 0, 1)
                f = torch.clamp(0.2 * self.convs[f"f{l}"](x) + 0.5, 0, 1)
                o = torch.clamp(0.2 * self.convs[f"o{l}"](x) + 0.5, 0, 1)
                g = torch.tanh(self.convs[f"g{l}"](x))
                c[l] = f * c[l] + i * g
                new_r[l] = o * torch.tanh(c[l])
            r = new_r
            a = frames[:, t]
            for l in range(self.nl):
                ahat = F.relu(self.convs[f"p{l}"](r[l]))
                if l == 0:
                    ahat = torch.clamp(ahat, max=1.0)
                e[l] = torch.cat([F.relu(a - ahat), F.relu(ahat - a)], 1)
                if l < self.nl - 1:
                    a = F.max_pool2d(F.relu(self.convs[f"a{l}"](e[l])), 2)
            if t > 0:
                loss = loss + e[0].mean() / (T - 1)
        return loss


# ----------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------


def make_case(variant: str, device: torch.device, option: str):
    opts = set(option.split("+"))
    s = SETTINGS[variant]
    model = build_prednet(variant=variant, channels=[s["in_ch"], 48, 96, 192], height=s["height"], width=s["width"],
                          init_seed=0)
    if "naive" in opts:
        model = NaiveLotter(model)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    extra = 1 if variant == "chainer-lineage" else 0
    x = torch.rand(s["batch"], s["frames"] + extra, s["in_ch"], s["height"], s["width"], generator=g).to(device)
    if "channels_last" in opts:
        model = model.to(memory_format=torch.channels_last)
    if "batch_wgrad" in opts:
        model.set_batch_wgrad(True)
    if "stepwgrad" in opts:
        model.set_batch_wgrad(False)
    if "routes" in opts:  # the routes measured by conv_table in this process
        model.set_conv_routes(dict(MEASURED_ROUTES))
    if "plain" in opts:  # conv2d and autograd's own backward everywhere (the model before issue 7's routes)
        model.set_conv_routes("plain").set_batch_wgrad(False)
    if "unfused" in opts:  # eager's kernels for the lotter cell and the error units (before fused.py)
        model.set_fused(False)
    if "flipfresh" in opts:  # the routed convs flip their weights at every call (before the flip cache)
        for m in model.modules():
            if isinstance(m, Conv3x3):
                m.cache_flipped = False
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=("cudagraph" in opts))
    fwd = torch.compile(model) if "compile" in opts else model

    def loss_fn():
        if "naive" in opts:
            return fwd(x)
        if variant == "lotter":
            return lotter_loss(fwd(x, full_last_step=False), [1.0, 0.0, 0.0, 0.0])
        return window_mse_loss(fwd(x[:, :-1]).predictions, x[:, 1:])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return model, step, loss_fn, s


@contextmanager
def flags(device: torch.device, option: str):
    """The arithmetic settings of one measurement; everything off except what
    ``option`` ("a+b+...") names."""
    opts = set(option.split("+"))
    cudnn = torch.backends.cudnn
    old = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32,
           torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled())
    cudnn.enabled = "nocudnn" not in opts
    cudnn.benchmark = "cudnn_benchmark" in opts
    cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = "tf32" in opts
    cudnn.deterministic = "deterministic" in opts
    torch.use_deterministic_algorithms("deterministic" in opts)
    try:
        yield
    finally:
        (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32, det) = old
        torch.use_deterministic_algorithms(det)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(loss_fn) -> int:
    fc = FlopCounterMode(display=False)
    with fc:
        loss = loss_fn()
        loss.backward()
    return fc.get_total_flops()


def host_probe(n: int = 4000) -> dict:
    """How fast this process's host side is right now: microseconds per tiny CPU torch operation
    (the dispatcher and Python, as every launch pays them), and the core the main thread is on."""
    a = torch.ones(1)
    t0 = time.perf_counter()
    for _ in range(n):
        a = a.add(1.0)
    us = (time.perf_counter() - t0) / n * 1e6
    try:
        core = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        core = None
    return {"us_per_op": us, "core": core}


def sched_sample() -> dict:
    """This process's threads' time on a CPU and waiting for one (``/proc/self/task/*/schedstat``, ns)
    and the machine's stolen time (``/proc/stat``, the hypervisor running someone else; jiffies
    summed over CPUs). Linux only; empty elsewhere."""
    run = wait = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/schedstat") as f:
                r, w, _ = f.read().split()
            run, wait = run + int(r), wait + int(w)
        with open("/proc/stat") as f:
            steal = int(f.readline().split()[8])
    except (OSError, ValueError, IndexError):
        return {}
    return {"run_ns": run, "wait_ns": wait, "steal": steal}


def sched_delta(a: dict, b: dict, steps: int) -> dict:
    if not a or not b:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    return {"on_cpu_ms": (b["run_ns"] - a["run_ns"]) / 1e6 / steps,
            "runqueue_wait_ms": (b["wait_ns"] - a["wait_ns"]) / 1e6 / steps,
            "steal_ms_all_cpus": (b["steal"] - a["steal"]) * 1e3 / hz / steps}


def measure(variant: str, device: torch.device, option: str, steps: int, warmup: int) -> dict:
    with flags(device, option):
        model, step, loss_fn, s = make_case(variant, device, option)
        flops = count_flops(loss_fn) if option in ("eager", "naive", "plain") else None
        t0 = time.perf_counter()
        if "cudagraph" in option.split("+"):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        else:
            for _ in range(warmup):
                step()
            run = step
        sync(device)
        warm_s = time.perf_counter() - t0
        probe = host_probe()
        nogc = "nogc" in option.split("+")
        if nogc:  # the cyclic garbage collector off for the timed steps
            gc.collect()
            gc.freeze()
            gc.disable()
        sched0 = sched_sample()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if device.type == "cuda" else []
        t0 = time.perf_counter()
        for i in range(steps):
            if marks:
                marks[i].record()
            run()
        if marks:
            marks[-1].record()
        sync(device)
        dt = (time.perf_counter() - t0) / steps
        sched = sched_delta(sched0, sched_sample(), steps)
        if nogc:
            gc.enable()
            gc.unfreeze()
        issue = []  # the host's time to issue one step, from an idle GPU (an upper bound where the queue fills)
        for _ in range(5 if device.type == "cuda" else 0):
            t1 = time.perf_counter()
            run()
            issue.append((time.perf_counter() - t1) * 1e3)
            sync(device)
    # per step, on the GPU's clock (event to event: a step's kernels plus any time the GPU waited for
    # the CPU to issue them)
    per = sorted(marks[i].elapsed_time(marks[i + 1]) for i in range(steps)) if marks else []
    out = {"variant": variant, "device": str(device), "option": option, "batch": s["batch"],
           "frames": s["frames"], "size": f"{s['height']}x{s['width']}", "step_ms": dt * 1e3,
           "seq_per_s": s["batch"] / dt, "warmup_s": warm_s,
           "host": probe, "issue_ms": sorted(issue)[len(issue) // 2] if issue else None, "sched": sched}
    if per:
        out["gpu_step_ms"] = {"min": per[0], "median": per[len(per) // 2], "max": per[-1]}
    if flops:
        out["tflop_per_step"] = flops / 1e12
        out["tflops"] = flops / dt / 1e12
    return out


def check_naive(device: torch.device) -> float:
    """Relative difference of loss and gradients between the fused model and the
    naive port on the same weights and frames (rounding only: both are the same function)."""
    s = SETTINGS["lotter"]
    with flags(device, "eager"):
        fused = build_prednet(variant="lotter", channels=[3, 48, 96, 192], height=s["height"], width=s["width"],
                              init_seed=0)
        naive = NaiveLotter(fused).to(device)
        fused = fused.to(device)
        x = torch.rand(s["batch"], s["frames"], 3, s["height"], s["width"], generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        lf = lotter_loss(fused(x), [1.0, 0.0, 0.0, 0.0])
        ln = naive(x)
        lf.backward()
        ln.backward()
        gf = fused.layers[1].lstm.weight.grad
        gn = torch.cat([naive.convs[f"{g}1"].weight.grad for g in "ifog"])
        rel_g = ((gf - gn).norm() / gn.norm()).item()
        rel_l = abs(lf.item() - ln.item()) / abs(ln.item())
    print(f"fused vs naive on {device}: loss {lf.item():.6f} vs {ln.item():.6f} (rel {rel_l:.1e}); "
          f"layers.1.lstm.weight grad rel L2 diff {rel_g:.1e}")
    return rel_g


def check_option(variant: str, device: torch.device, option: str) -> None:
    """Loss and gradients of one step with ``option`` against the plain model
    (conv2d everywhere), same weights and frames: relative L2 differences."""
    with flags(device, "plain"):
        ref, _, loss_ref, _ = make_case(variant, device, "plain")
        lr_ = loss_ref()
        lr_.backward()
    with flags(device, option):
        alt, _, loss_alt, _ = make_case(variant, device, option)
        la = loss_alt()
        la.backward()
    worst = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
                for p, q in zip(alt.parameters(), ref.parameters()) if q.grad is not None and q.grad.norm() > 0)
    print(f"check {variant} {option} vs plain: loss rel diff {abs(la.item() - lr_.item()) / abs(lr_.item()):.1e}, "
          f"worst parameter-gradient rel L2 diff {worst:.1e}")


def conv_shapes(variant: str) -> list[tuple[str, int, int, int, int, int]]:
    """(name, N, C_in, C_out, H, W) of every convolution of one time step."""
    s = SETTINGS[variant]
    ch = [s["in_ch"], 48, 96, 192]
    out = []
    for l in range(4):
        h, w = s["height"] >> l, s["width"] >> l
        up = ch[l + 1] if l < 3 else 0
        out.append((f"layers.{l}.lstm", s["batch"], 2 * ch[l] + ch[l] + up, 4 * ch[l], h, w))
        out.append((f"layers.{l}.conv_p", s["batch"], ch[l], ch[l], h, w))
        if l < 3:
            out.append((f"layers.{l}.conv_a", s["batch"], 2 * ch[l], ch[l + 1], h, w))
    return out


MEASURED_ROUTES: dict = {}


def conv_table(variant: str, device: torch.device, frames: int, switch: float = 0.85) -> dict:
    """Time each convolution of one time step alone (CUDA events, median of 20
    after 5 warm-ups): the forward product through conv2d and through
    conv_transpose2d with flipped weights, the input gradient through cuDNN's
    dgrad and through conv2d with flipped weights, and the weight gradient per
    step and over all ``frames`` steps at once (batch_wgrad). Returns the
    fastest route per shape (a switch only when it is at least 1/switch faster)."""
    if device.type != "cuda":
        return {}
    from devicediff.workloads.prednet.model import _flipped

    def timed(fn, reps=20):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    print(f"\n[conv table {variant}] ms per call; totals count each conv once per time step ({frames})")
    print(f"  {'conv':16s} {'N,Cin,Cout,H,W':>20s} {'fwd':>7s} {'fwd_T':>7s} {'dgrad':>7s} {'dgrad_C':>7s}"
          f" {'wgrad':>7s} {'wgrad/T':>7s} {'GFLOP':>6s}  route")
    tot = dict(fwd=0.0, fwd_best=0.0, dgrad=0.0, dgrad_best=0.0, wgrad=0.0, wgrad_b=0.0)
    routes = {}
    cb = torch.ops.aten.convolution_backward
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    with flags(device, "eager"):
        g = torch.Generator(device=device).manual_seed(0)
        for name, n, cin, cout, h, w in conv_shapes(variant):
            x = torch.rand(n, cin, h, w, device=device, generator=g)
            wt = torch.randn(cout, cin, 3, 3, device=device, generator=g) * 0.05
            b = torch.zeros(cout, device=device)
            gy = torch.randn(n, cout, h, w, device=device, generator=g)
            xt = torch.rand(n * frames, cin, h, w, device=device, generator=g)
            gyt = torch.randn(n * frames, cout, h, w, device=device, generator=g)
            t_f = timed(lambda: F.conv2d(x, wt, b, padding=1))
            t_ft = timed(lambda: F.conv_transpose2d(x, _flipped(wt), b, padding=1))
            t_d = timed(lambda: cb(gy, x, wt, None, *args, [True, False, False]))
            t_dc = timed(lambda: F.conv2d(gy, _flipped(wt), None, padding=1))
            t_w = timed(lambda: cb(gy, x, wt, [cout], *args, [False, True, True]))
            t_wt = timed(lambda: cb(gyt, xt, wt, [cout], *args, [False, True, True])) / frames
            route = ("tconv" if t_ft < switch * t_f else "conv", "conv" if t_dc < switch * t_d else "native")
            if route != ("conv", "native"):
                routes[(n, cin, cout, h, w)] = route
            gf = 2 * n * cin * cout * 9 * h * w / 1e9
            for k, v in (("fwd", t_f), ("fwd_best", min(t_f, t_ft) if route[0] == "tconv" else t_f), ("dgrad", t_d),
                         ("dgrad_best", t_dc if route[1] == "conv" else t_d), ("wgrad", t_w), ("wgrad_b", t_wt)):
                tot[k] += v * frames
            print(f"  {name:16s} {f'{n},{cin},{cout},{h},{w}':>20s} {t_f:7.3f} {t_ft:7.3f} {t_d:7.3f} {t_dc:7.3f}"
                  f" {t_w:7.3f} {t_wt:7.3f} {gf:6.2f}  {route[0]}/{route[1]}")
    print("  per step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in tot.items()))
    print(f"  routes {variant}: {routes!r}")
    return routes


def profile_kernels(variant: str, device: torch.device, steps: int = 3, top: int = 18, option: str = "eager") -> None:
    """Where the GPU time of the default step goes: top kernels and busy fraction."""
    from torch.profiler import ProfilerActivity, profile

    with flags(device, option):
        _, step, _, _ = make_case(variant, device, option)
        for _ in range(3):
            step()
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            sync(device)
        wall = time.perf_counter() - t0
    rows = []
    total = 0.0
    n_kernels = 0
    for ev in prof.key_averages():
        dev_t = getattr(ev, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(ev, "self_cuda_time_total", 0)
        if dev_t and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((dev_t, ev.count, ev.key))
            total += dev_t
            n_kernels += ev.count
    rows.sort(reverse=True)
    print(f"\n[profile {variant} {option}] {steps} steps: wall {wall * 1e3:.1f} ms, GPU kernel time {total / 1e3:.1f} ms "
          f"({100 * total / 1e3 / (wall * 1e3):.0f}% busy), {n_kernels / steps:.0f} kernels/step")
    cats = {}
    for t, n, k in rows:
        kl = k.lower()
        if "wgrad" in kl or "dgrad" in kl or "conv" in kl or "implicit" in kl or "cudnn" in kl or "sm90" in kl or "gemm" in kl:
            cat = "conv/gemm"
        elif "elementwise" in kl or "vectorized" in kl or "unrolled" in kl or "reduce" in kl:
            cat = "elementwise/reduce"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0) + t
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:20s} {t / 1e3 / steps:8.2f} ms/step ({100 * t / total:.0f}%)")
    # The host's side: the operations and CUDA runtime calls with the most CPU time of their own
    # (profiling adds about a microsecond to each, so the sum is an upper bound of the unprofiled step).
    host = sorted(((ev.self_cpu_time_total, ev.count, ev.key) for ev in prof.key_averages()
                   if ev.device_type == torch.autograd.DeviceType.CPU and ev.self_cpu_time_total), reverse=True)
    print(f"  host: {sum(t for t, _, _ in host) / 1e3 / steps:.1f} ms/step of CPU time in profiled operations "
          f"and runtime calls; the largest (ms/step, calls/step):")
    for t, n, k in host[:15]:
        print(f"    {t / 1e3 / steps:7.2f} {n / steps:6.0f}  {k[:70]}")
    for t, n, k in rows[:top]:
        print(f"  {t / 1e3 / steps:8.2f} ms/step  x{n // steps:4d}  {k[:110]}")


#: the modules CUDNN_ROUTES routes at the headline settings (model.py's comments), for --host-proxy
ROUTED_MODULES = {"layers.0.lstm": ("tconv", "native"), "layers.1.lstm": ("conv", "conv"),
                  "layers.1.conv_a": ("conv", "conv"), "layers.2.lstm": ("tconv", "native"),
                  "layers.3.lstm": ("tconv", "native")}


def host_proxy(steps: int = 30) -> None:
    """The host's share of the lotter step, measured on the CPU: the headline step's operations
    (4 layers, nt 10, batch 4) on tensors so small (2 channels a layer, 8x16) that the arithmetic is
    negligible, so a step's time is Python, autograd and the dispatcher issuing them, one thread.
    ``plain``: conv2d and autograd's backward, per-step weight gradients (the model before issue 7);
    ``routed`` forces the headline route of each routed module (the custom autograd.Function path
    the GPU takes) with the default batched weight gradients, ``stepwgrad`` per-step ones (the
    default before 2026-12-03), ``flipfresh`` flips the weights at every call. Prints ms per step
    and aten operations per step for each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 10, 3, 8, 16, generator=g)
    print(f"[host proxy] lotter step operations on tiny tensors, CPU, 1 thread, {steps} steps (median)")
    for option in ("plain", "routed+stepwgrad", "routed+stepwgrad+flipfresh", "routed"):
        model = build_prednet(variant="lotter", channels=[3, 2, 2, 2], height=8, width=16, init_seed=0)
        model.set_batch_wgrad(option == "routed")
        if option != "plain":
            for name, m in model.named_modules():
                if name in ROUTED_MODULES:
                    m._route = (lambda r: lambda _x: r)(ROUTED_MODULES[name])
                    m.cache_flipped = "flipfresh" not in option
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            lotter_loss(model(x, full_last_step=False), [1.0, 0.0, 0.0, 0.0]).backward()
            opt.step()

        for _ in range(3):
            step()
        Count.n = 0
        with Count():
            step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"[host proxy] {option:28s} {times[len(times) // 2]:6.2f} ms/step  {Count.n:5d} aten operations/step  "
              f"{1e3 * times[len(times) // 2] / Count.n:5.1f} us/operation")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="lotter,chainer-lineage")
    ap.add_argument("--options", default="eager",
                    help="comma list of eager,cudnn_benchmark,channels_last,tf32,cudagraph,compile,naive or 'all'")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu", choices=("yes", "no", "auto"), default="auto", help="auto: CPU only when no GPU")
    ap.add_argument("--cpu-steps", type=int, default=2)
    ap.add_argument("--cpu-threads", default="", help="comma list of thread counts for the CPU runs (default: torch's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-options", default="eager", help="comma list of options to profile")
    ap.add_argument("--conv-table", action="store_true", help="time each convolution alone (GPU)")
    ap.add_argument("--check-options", default="", help="comma list of options to check against eager")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip remaining GPU options after this many seconds")
    ap.add_argument("--json", default="")
    ap.add_argument("--chainer", default="", metavar="HxW:C:FRAMES",
                    help="chainer-lineage size, input channels and window, e.g. 64x64:1:20 (Moving MNIST)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to test this script quickly")
    ap.add_argument("--host-proxy", action="store_true",
                    help="the host's work per lotter step, on the CPU with tiny tensors (plain, routed, routed+flipfresh)")
    args = ap.parse_args(argv)
    if args.host_proxy:
        host_proxy()
        return 0

    t_start = time.perf_counter()
    if args.smoke:
        for s in SETTINGS.values():
            s.update(height=32, width=40, frames=4)
    if args.chainer:
        hw, ch, fr = args.chainer.split(":")
        h, w = hw.split("x")
        SETTINGS["chainer-lineage"].update(height=int(h), width=int(w), in_ch=int(ch), frames=int(fr))
    variants = [v for v in args.variants.split(",") if v]
    options = ["eager", "cudnn_benchmark", "channels_last", "tf32", "naive", "batch_wgrad", "cudagraph", "compile"] \
        if args.options == "all" else args.options.split(",")
    results = []
    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn "
          f"{torch.backends.cudnn.version() if gpu else None}, CPU threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}")
    if gpu:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
        peak = fp32_peak(name)
        print(f"GPU: {name}; fp32 peak {peak} TFLOP/s (datasheet)")
        if args.conv_table or any("routes" in o for o in options):
            for variant in variants:
                MEASURED_ROUTES.update(conv_table(variant, dev, SETTINGS[variant]["frames"]))
        for variant in variants:
            for option in options:
                if "naive" in option and variant != "lotter":
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    print(f"skip {variant}/{option}: over --budget-s")
                    continue
                try:
                    r = measure(variant, dev, option, args.steps, args.warmup)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{variant:16s} {option:16s} FAILED: {type(e).__name__}: {str(e)[:200]}")
                    continue
                r["gpu"] = name
                if "tflops" in r and peak:
                    r["fraction_of_peak"] = r["tflops"] / peak
                results.append(r)
                extra = ""
                if "tflops" in r:
                    extra = f"  {r['tflop_per_step']:.3f} TFLOP/step  {r['tflops']:.1f} TFLOP/s"
                    if peak:
                        extra += f" ({100 * r['tflops'] / peak:.0f}% of fp32 peak)"
                if "gpu_step_ms" in r:
                    g = r["gpu_step_ms"]
                    extra += (f"  GPU per step {g['min']:.1f}/{g['median']:.1f}/{g['max']:.1f} ms, issued in "
                              f"{r['issue_ms']:.1f} ms, host {r['host']['us_per_op']:.2f} us/op on core {r['host']['core']}")
                    if r["sched"]:
                        extra += ("; per step: threads on a CPU {on_cpu_ms:.1f} ms, waiting for one "
                                  "{runqueue_wait_ms:.2f} ms, stolen {steal_ms_all_cpus:.2f} ms").format(**r["sched"])
                print(f"{variant:16s} {option:16s} {r['step_ms']:8.2f} ms/step  {r['seq_per_s']:7.1f} seq/s"
                      f"  (warm-up {r['warmup_s']:.1f} s){extra}", flush=True)
        if "naive" in options:
            check_naive(dev)
        for option in [o for o in args.check_options.split(",") if o]:
            for variant in variants:
                check_option(variant, dev, option)
        if args.profile:
            for variant in variants:
                for option in args.profile_options.split(","):
                    profile_kernels(variant, dev, option=option)
    if args.cpu == "yes" or (args.cpu == "auto" and not gpu):
        threads = [int(t) for t in args.cpu_threads.split(",") if t] or [torch.get_num_threads()]
        for n in threads:
            torch.set_num_threads(n)
            for variant in variants:
                r = measure(variant, torch.device("cpu"), "eager", args.cpu_steps, 1)
                r["threads"] = n
                results.append(r)
                print(f"{variant:16s} cpu {n:2d} threads {r['step_ms']:9.1f} ms/step  {r['seq_per_s']:7.2f} seq/s"
                      f"  {r.get('tflops', math.nan):.3f} TFLOP/s", flush=True)
    if not gpu and "naive" in options:
        check_naive(torch.device("cpu"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
