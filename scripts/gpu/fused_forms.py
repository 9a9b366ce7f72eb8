"""Which rounding each of eager's elementwise CUDA kernels does, and whether PredNet's fused lotter
kernels (src/devicediff/workloads/prednet/fused.py) give eager's bits (issue 17).

1. For each eager operation the fused kernels mirror, candidate formulas (explicitly rounded
   intrinsics, with and without a fused multiply-add) run as jiterator kernels on edge values and
   are compared bit for bit with the operation itself: the one that matches is how this torch
   build's kernel rounds.
2. ``fused.compare``: the fused forward and backward against eager's on edge values.
3. Whole training steps: the lotter headline model (batch 4, 128x160, nt 10, fp32, TF32 off) trained
   STEPS steps with the fused kernels and without, from the same weights and frames: the bits of
   every weight, of the losses, and the kernels per step.

    PYTHONPATH=src python scripts/gpu/fused_forms.py [STEPS]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from devicediff.workloads.prednet import fused
from devicediff.workloads.prednet.model import build_prednet
from devicediff.workloads.prednet.workload import lotter_loss

dev = torch.device("cuda")
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
vals = fused.edge_values(dev)
g = torch.Generator().manual_seed(3)


def draw():
    return vals[torch.randint(len(vals), (1 << 16,), generator=g).to(dev)]


def jit(body: str, n_in: int, *ts):
    names = "abc"[:n_in]
    code = ("template <typename T> void dd_probe(" + ", ".join(f"T {x}" for x in names) + ", T& out) {\n"
            + body + "\n}\n")
    return fused._launch(code, 1, *ts)[0]


a, b, c = draw(), draw(), draw().abs().clamp(max=1.0)
PROBES = {
    "mul(0.2)": (lambda: a.mul(0.2), 1, (a,), {"rn": "out = __fmul_rn(a, 0.2f);"}),
    "add_(0.5)": (lambda: a.clone().add_(0.5), 1, (a,), {"rn": "out = __fadd_rn(a, 0.5f);"}),
    "hardtanh(0,1)": (lambda: F.hardtanh(a, 0.0, 1.0), 1, (a,),
                      {"fminmax": "out = a != a ? a : fminf(fmaxf(a, 0.0f), 1.0f);"}),
    "tanh": (lambda: torch.tanh(a), 1, (a,), {"tanhf": "out = tanhf(a);"}),
    "addcmul": (lambda: torch.addcmul(a, b, c), 3, (a, b, c),
                {"rn": "out = __fadd_rn(a, __fmul_rn(b, c));", "fma": "out = __fmaf_rn(b, c, a);"}),
    "tanh_backward": (lambda: torch.ops.aten.tanh_backward(a, c), 2, (a, c),
                      {"rn": "out = __fmul_rn(a, __fsub_rn(1.0f, __fmul_rn(b, b)));",
                       "fma": "out = __fmul_rn(a, __fmaf_rn(-b, b, 1.0f));"}),
    "hardtanh_backward": (lambda: torch.ops.aten.hardtanh_backward(a, b, 0.0, 1.0), 2, (a, b),
                          {"cmp": "out = (b <= 0.0f || b >= 1.0f) ? 0.0f : a;"}),
    "relu": (lambda: torch.relu(a), 1, (a,),
             {"fmaxf": "out = a != a ? a : fmaxf(a, 0.0f);", "keep-0": "out = a != a ? a : (a < 0.0f ? 0.0f : a);"}),
    "threshold_backward": (lambda: torch.ops.aten.threshold_backward(a, b, 0.0), 2, (a, b),
                           {"cmp": "out = b <= 0.0f ? 0.0f : a;"}),
    "sub": (lambda: a - b, 2, (a, b), {"rn": "out = __fsub_rn(a, b);"}),
}

print(f"{torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
      f"{torch.cuda.get_device_name(0)}")
print("== 1. each eager kernel's rounding (candidate: same bits as eager?)")
for name, (ref, n_in, ts, forms) in PROBES.items():
    want = ref()
    res = []
    for form, body in forms.items():
        try:
            got = jit(body, n_in, *ts)
            res.append(f"{form}={'SAME' if fused._bits_equal(got, want) else 'differs'}")
        except Exception as e:  # noqa: BLE001
            res.append(f"{form}=ERROR {str(e).splitlines()[0][:200]}")
    print(f"  {name:20s} " + "  ".join(res))

print("== 2. fused.compare (edge values, forward and backward)")
bad = fused.compare(dev)
print("  all bits equal" if not bad else f"  DIFFER: {bad}")
z = torch.randn(4, 12, 8, 8, device=dev)
frames = torch.rand(4, 10, 3, 8, 8, device=dev)
e = fused.errors(frames[:, 2], torch.rand(4, 3, 8, 8, device=dev))
print(f"  errors on a frame sliced from a clip: contiguous {e.is_contiguous()}, strides {e.stride()}")

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
print(f"== 3. {steps} lotter training steps, fused vs eager kernels (headline settings; cuDNN deterministic,"
      " else its default algorithms differ from run to run even eager against eager)")
x = torch.rand(4, 10, 3, 128, 160, generator=torch.Generator().manual_seed(1)).to(dev)
torch.backends.cudnn.deterministic = True
runs = {}
for on in (True, False):
    m = build_prednet(variant="lotter", channels=[3, 48, 96, 192], height=128, width=160, init_seed=0).to(dev)
    m.set_fused(on)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = lotter_loss(m(x, full_last_step=False), [1.0, 0.0, 0.0, 0.0])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.zero_grad(set_to_none=True)
        lotter_loss(m(x, full_last_step=False), [1.0, 0.0, 0.0, 0.0]).backward()
        opt.step()
        torch.cuda.synchronize()
    kernels = sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
    runs[on] = (m.state_dict(), losses, kernels)
sd1, l1, k1 = runs[True]
sd0, l0, k0 = runs[False]
diff = [k for k in sd0 if not fused._bits_equal(sd1[k], sd0[k])]
print(f"  losses fused {l1}\n  losses eager {l0}")
print(f"  weights: {'ALL BITS EQUAL' if not diff else f'{len(diff)} of {len(sd0)} differ: {diff[:6]}'}; "
      f"losses {'equal' if l1 == l0 else 'DIFFER'}")
print(f"  CUDA kernels per step (profiled): fused {k1}, eager {k0}")
