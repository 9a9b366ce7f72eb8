"""What every Chainer twin of a workload shares: host batches, PyTorch names for Chainer
parameters, how frames reach the network (``FrameFeeder``), and Adam in either formula.

Runs inside the Chainer environment (numpy<2, no torch). The mirroring rules (docs/chainer.md):

* architecture and parameter names: every Chainer parameter path maps to the PyTorch
  ``state_dict`` name (``/layers/0/lstm/W`` -> ``layers.0.lstm.weight``, ``b`` -> ``bias``)
  and has PyTorch's layout (``L.Linear.W`` is (out, in) like ``nn.Linear.weight``;
  ``L.Convolution2D.W`` is (out, in, kh, kw) like ``F.conv2d``'s weight; both frameworks
  compute cross-correlation), so the initial weights exported by PyTorch load without any
  transposition;
* data: the same arrays, made by the workload's one numpy data recipe, in the same order
  (``devicediff.spec.epoch_order``);
* optimizer: Adam with PyTorch's defaults (alpha = lr, beta1 = 0.9, beta2 = 0.999, eps =
  1e-8). ``adam = "chainer"`` (default, what the original study ran) is
  ``chainer.optimizers.Adam``, which adds eps to sqrt(v) before the bias correction of v
  where PyTorch adds it after: Chainer's effective eps is eps / sqrt(1 - beta2^t) (3.2e-7 at
  step 1, 1e-8 after a few thousand steps). ``adam = "pytorch"`` uses PyTorch's formula
  (``TorchFormulaAdam``), so that nothing but the arithmetic differs from a PyTorch run.

The loop option ``frame_buffers`` ("reused" | "fresh", a config parameter) selects how frames
reach the network: see ``FrameFeeder`` and docs/chainer.md.
"""

from __future__ import annotations

import math
from typing import Mapping

import chainer
import numpy as np
from chainer import Variable

from devicediff.errors import ParamError
from devicediff.frameworks import FRAMEWORKS

FRAME_BUFFERS = FRAMEWORKS["chainer"].parameters["frame_buffers"]


# ------------------------------------------------------------------------------------
# Names and weights
# ------------------------------------------------------------------------------------


def torch_name(path: str) -> str:
    """``/layers/0/lstm/W`` -> ``layers.0.lstm.weight``."""
    parts = path.strip("/").split("/")
    leaf = {"W": "weight", "b": "bias"}.get(parts[-1], parts[-1])
    return ".".join(parts[:-1] + [leaf])


def named_arrays(link: chainer.Link) -> dict[str, np.ndarray]:
    """Every parameter as a host numpy array under its PyTorch name."""
    out = {}
    for path, p in link.namedparams():
        out[torch_name(path)] = chainer.backends.cuda.to_cpu(p.array)
    return out


def load_arrays(link: chainer.Link, arrays: Mapping[str, np.ndarray]) -> None:
    """Set every parameter from ``{pytorch_name: array}``; the two name sets must be equal."""
    params = {torch_name(path): p for path, p in link.namedparams()}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ParamError(
            f"initial weights do not match the Chainer model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, p in params.items():
        a = np.asarray(arrays[name])
        if a.shape != p.array.shape or a.dtype != p.array.dtype:
            raise ParamError(
                f"initial weight {name}: PyTorch {a.dtype}{a.shape}, Chainer {p.array.dtype}{p.array.shape}"
            )
        p.array[...] = a


# ------------------------------------------------------------------------------------
# Frame feeding: the one place where "reused" and "fresh" differ
# ------------------------------------------------------------------------------------


class FrameFeeder:
    """Turns host arrays into Variables on the device, the way the loop says.

    ``reused`` (the eijwat / LanaSina / quadjr Chainer PredNet loop): one host
    buffer per role ("input", "target"), overwritten in place for each frame
    and wrapped with ``Variable(xp.asarray(buf))``. With numpy (CPU)
    ``asarray`` returns the buffer itself, so every Variable of a window wraps
    the same memory; with CuPy (GPU) it copies to the device.

    ``fresh``: a new host array per frame (then ``xp.asarray``), so nothing a
    Variable wraps is ever overwritten.
    """

    def __init__(self, mode: str, xp, dtype=np.float32):
        if mode not in FRAME_BUFFERS:
            raise ParamError(f"frame_buffers {mode!r} unknown; use one of {list(FRAME_BUFFERS)}")
        self.mode, self.xp, self.dtype = mode, xp, np.dtype(dtype)
        self._buffers: dict[str, np.ndarray] = {}

    def __call__(self, role: str, frame: np.ndarray) -> Variable:
        if self.mode == "fresh":
            return Variable(self.xp.asarray(np.array(frame, dtype=self.dtype, copy=True)))
        buf = self._buffers.get(role)
        if buf is None or buf.shape != frame.shape:
            buf = self._buffers[role] = np.empty(frame.shape, dtype=self.dtype)
        buf[...] = frame
        return Variable(self.xp.asarray(buf))

    def aliases(self) -> bool:
        """Whether a Variable made here shares memory with the host buffer."""
        probe = np.zeros(4, np.float32)
        return self.mode == "reused" and self.xp.asarray(probe) is probe


# ------------------------------------------------------------------------------------
# Adam
# ------------------------------------------------------------------------------------

ADAM_FORMULAS = FRAMEWORKS["chainer"].parameters["adam"]


class TorchFormulaAdamRule(chainer.optimizers.adam.AdamRule):
    """Adam as ``torch.optim.Adam`` computes it (single-tensor path, torch/optim/adam.py):

        m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g²
        w -= lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Chainer's own ``AdamRule`` adds eps to sqrt(v) *before* dividing by
    sqrt(1 - b2^t), i.e. uses eps / sqrt(1 - b2^t) (3.2e-7 at t = 1 for eps =
    1e-8), which moves small-gradient parameters visibly in the first steps.
    Same state (``m``, ``v``) as Chainer's rule, so checkpoints and diverge's
    teacher forcing work unchanged."""

    def _update(self, param):
        grad = param.grad
        if grad is None:
            return
        hp = self.hyperparam
        xp = chainer.backend.get_array_module(param.array)
        m, v = self.state["m"], self.state["v"]
        m += (1 - hp.beta1) * (grad - m)
        v *= hp.beta2
        v += (1 - hp.beta2) * grad * grad
        step_size = hp.alpha / (1 - hp.beta1**self.t)
        denom = xp.sqrt(v) / math.sqrt(1 - hp.beta2**self.t) + hp.eps
        param.array -= (step_size * m / denom).astype(param.array.dtype, copy=False)

    def update_core_cpu(self, param):
        self._update(param)

    def update_core_gpu(self, param):  # pragma: no cover - GPU Chainer is untested
        self._update(param)


class TorchFormulaAdam(chainer.optimizers.Adam):
    def create_update_rule(self):
        return TorchFormulaAdamRule(self.hyperparam)


def make_adam(formula: str, lr: float):
    """Adam with PyTorch's default hyper-parameters (betas 0.9, 0.999; eps 1e-8)."""
    if formula not in ADAM_FORMULAS:
        raise ParamError(f"adam {formula!r} unknown; use one of {list(ADAM_FORMULAS)}")
    cls = chainer.optimizers.Adam if formula == "chainer" else TorchFormulaAdam
    return cls(alpha=lr, beta1=0.9, beta2=0.999, eps=1e-8)
