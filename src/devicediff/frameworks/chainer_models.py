"""Chainer 7.8 versions of devicediff's workloads: the MNIST autoencoder and
PredNet ``chainer-lineage``. They run inside the Chainer environment
(numpy<2, no torch) and mirror the PyTorch workloads exactly in what is
computed; only the framework doing the arithmetic differs.

Mirrored, per workload:

* architecture and parameter names: every Chainer parameter path maps to the
  PyTorch ``state_dict`` name (``/layers/0/lstm/W`` -> ``layers.0.lstm.weight``,
  ``b`` -> ``bias``) and has PyTorch's layout (``L.Linear.W`` is (out, in)
  like ``nn.Linear.weight``; ``L.Convolution2D.W`` is (out, in, kh, kw) like
  ``F.conv2d``'s weight; both frameworks compute cross-correlation), so the
  initial weights exported by PyTorch load without any transposition;
* data: the same arrays, read or generated with devicediff's numpy-only data
  modules, in the same order (numpy PCG64 seeded by ``[data_seed, epoch]``);
  PredNet's data set is checked against the SHA-256 the PyTorch workload
  reports, so a drift between the two copies of the data recipe fails loudly;
* loss: autoencoder mean pixel MSE; PredNet the sum over a window of
  ``F.mean_squared_error(P_0(t), x_{t+1})``, one backward per window;
* optimizer: Adam with PyTorch's defaults (alpha = lr, beta1 = 0.9, beta2 =
  0.999, eps = 1e-8). ``adam = "chainer"`` (default, what the original study
  ran) is ``chainer.optimizers.Adam``, which adds eps to sqrt(v) before the
  bias correction of v where PyTorch adds it after: Chainer's effective eps is
  eps / sqrt(1 - beta2^t) (3.2e-7 at step 1, 1e-8 after a few thousand
  steps). ``adam = "pytorch"`` uses PyTorch's formula (``TorchFormulaAdam``),
  so that nothing but the arithmetic differs from a PyTorch run
  (docs/chainer.md).

The training loop option ``frame_buffers`` ("reused" | "fresh", a workload
parameter) selects how frames reach the network: see ``FrameFeeder`` and
docs/chainer.md.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import Variable

from devicediff.spec import epoch_order

FRAME_BUFFERS = ("reused", "fresh")


from devicediff.errors import ParamError as ChainerWorkloadError  # noqa: E402


@dataclass(frozen=True)
class Batch:
    """One training step's input: numpy arrays on the host (as ``spec.Batch``)."""

    data: np.ndarray
    new_sequence: bool = True


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
        raise ChainerWorkloadError(
            f"initial weights do not match the Chainer model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, p in params.items():
        a = np.asarray(arrays[name])
        if a.shape != p.array.shape or a.dtype != p.array.dtype:
            raise ChainerWorkloadError(
                f"initial weight {name}: PyTorch {a.dtype}{a.shape}, Chainer {p.array.dtype}{p.array.shape}"
            )
        p.array[...] = a


def _conv(c_in: int, c_out: int) -> L.Convolution2D:
    """3x3, stride 1, zero padding 1, with bias; zero-initialised (weights are loaded).
    Every parameter takes ``chainer.config.dtype`` (float32 unless a caller asks for float64)."""
    return L.Convolution2D(c_in, c_out, ksize=3, stride=1, pad=1, initialW=chainer.initializers.Zero(),
                           initial_bias=chainer.initializers.Zero())


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
            raise ChainerWorkloadError(f"frame_buffers {mode!r} unknown; use one of {list(FRAME_BUFFERS)}")
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

ADAM_FORMULAS = ("chainer", "pytorch")


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
        raise ChainerWorkloadError(f"adam {formula!r} unknown; use one of {list(ADAM_FORMULAS)}")
    cls = chainer.optimizers.Adam if formula == "chainer" else TorchFormulaAdam
    return cls(alpha=lr, beta1=0.9, beta2=0.999, eps=1e-8)


# ------------------------------------------------------------------------------------
# Autoencoder
# ------------------------------------------------------------------------------------


class AutoEncoderNet(chainer.Chain):
    """784 -> sizes -> reversed -> 784, ReLU, sigmoid output (workloads/autoencoder.py)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        dims = [784, *sizes, *reversed(sizes[:-1]), 784]
        with self.init_scope():
            self.layers = chainer.ChainList(
                *[L.Linear(a, b, initialW=chainer.initializers.Zero()) for a, b in zip(dims[:-1], dims[1:])]
            )

    def forward(self, x):
        h = F.reshape(x, (x.shape[0], 784))
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            h = F.sigmoid(h) if i == n - 1 else F.relu(h)
        return h


class ChainerAutoencoder:
    """The autoencoder workload; hyper-parameters from the PyTorch workload's ``describe()``."""

    name = "autoencoder"

    def __init__(self, params: Mapping[str, Any], described: Mapping[str, Any], mnist_path: str | None):
        from devicediff.data.mnist import load_mnist

        self.sizes = [int(s) for s in described["sizes"]]
        self.batch_size = int(described["batch_size"])
        self.lr = float(described["lr"])
        root = params.get("mnist_root") or mnist_path
        x, _ = load_mnist("train", root)
        xe, _ = load_mnist(described.get("eval_split", "valid"), root)
        self.train_x = np.ascontiguousarray(x[: int(described["train_size"])])
        self.eval_x = np.ascontiguousarray(xe[: int(described["eval_size"])])
        self._described = dict(described)

    def describe(self) -> dict:
        return self._described

    def build_model(self) -> chainer.Chain:
        return AutoEncoderNet(self.sizes)

    def learning_rate(self, step: int, total: int) -> float | None:
        return None

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        order = epoch_order(data_seed, epoch, len(self.train_x))
        for i in range(self.steps_per_epoch()):
            yield Batch(self.train_x[order[i * self.batch_size : (i + 1) * self.batch_size]])

    def reset_state(self) -> None:
        pass

    def loss(self, model, batch: Batch, feed: FrameFeeder):
        x = feed("input", batch.data)
        return F.mean_squared_error(model(x), F.reshape(x, (x.shape[0], 784)))

    def evaluate(self, model, xp) -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(self.eval_x), 1000):
            x = self.eval_x[i : i + 1000]
            y = chainer.backends.cuda.to_cpu(model(xp.asarray(x)).array)
            total += float(np.sum((y - x.reshape(x.shape[0], 784)) ** 2))
            n += x.shape[0] * 784
        return {"eval_loss": total / n}

    def artifacts(self, model, xp, outdir) -> dict:
        return {}


# ------------------------------------------------------------------------------------
# PredNet, chainer-lineage
# ------------------------------------------------------------------------------------


class PredNetLayer(chainer.Chain):
    """One level: ConvLSTM (one conv, gate blocks i, f, o, g), peepholes,
    the prediction conv and the conv that makes the next level's input."""

    def __init__(self, *, a_ch: int, r_ch: int, r_up_ch: int, a_next_ch: int | None, hw: tuple[int, int]):
        super().__init__()
        self.a_ch, self.r_ch = a_ch, r_ch
        zero, shape = chainer.initializers.Zero(), (r_ch, *hw)  # dtype: chainer.config.dtype
        with self.init_scope():
            self.peephole_i = chainer.Parameter(zero, shape)
            self.peephole_f = chainer.Parameter(zero, shape)
            self.peephole_o = chainer.Parameter(zero, shape)
            self.lstm = _conv(2 * a_ch + r_ch + r_up_ch, 4 * r_ch)
            self.conv_p = _conv(r_ch, a_ch)
            if a_next_ch is not None:
                self.conv_a = _conv(2 * a_ch, a_next_ch)


class PredNetNet(chainer.Chain):
    """PredNet ``chainer-lineage`` (workloads/prednet/model.py, whose docstring
    has the equations). ``step(x, state)`` takes frame x_t and returns
    (P_0 = the prediction of x_{t+1}, new state). The state is
    ``(r, c, p)``, three lists of one Variable per layer; ``None`` = zeros.
    """

    def __init__(self, *, channels: list[int], r_channels: list[int], height: int, width: int):
        super().__init__()
        self.channels, self.r_channels = list(channels), list(r_channels)
        self.height, self.width = height, width
        nl = len(channels)
        with self.init_scope():
            self.layers = chainer.ChainList(*[
                PredNetLayer(a_ch=channels[l], r_ch=r_channels[l],
                             r_up_ch=r_channels[l + 1] if l + 1 < nl else 0,
                             a_next_ch=channels[l + 1] if l + 1 < nl else None,
                             hw=(height >> l, width >> l))
                for l in range(nl)
            ])

    def zero_state(self, batch: int):
        xp, dtype = self.xp, self.layers[0].conv_p.W.dtype  # float64 for diverge's reference copy

        def z(ch, l):
            return Variable(xp.zeros((batch, ch, self.height >> l, self.width >> l), dtype))

        return ([z(c, l) for l, c in enumerate(self.r_channels)],
                [z(c, l) for l, c in enumerate(self.r_channels)],
                [z(c, l) for l, c in enumerate(self.channels)])

    def step(self, x, state=None):
        nl = len(self.layers)
        r_prev, c_prev, p_prev = state if state is not None else self.zero_state(x.shape[0])
        # bottom-up with last step's predictions: E_l = [ReLU(A_l - P_l), ReLU(P_l - A_l)]
        e, a = [None] * nl, x
        for l in range(nl):
            d = a - p_prev[l]
            e[l] = F.relu(F.concat((d, -d), axis=1))
            if l + 1 < nl:
                a = F.max_pooling_2d(F.relu(self.layers[l].conv_a(e[l])), 2, stride=2, cover_all=False)
        # top-down: new R_{l+1} (upsampled) feeds layer l
        r, c, p = [None] * nl, [None] * nl, [None] * nl
        for l in reversed(range(nl)):
            layer = self.layers[l]
            if l == nl - 1:
                xin = F.concat((e[l], r_prev[l]), axis=1)
            else:
                up = F.unpooling_2d(r[l + 1], 2, stride=2, cover_all=False)
                xin = F.concat((e[l], r_prev[l], up), axis=1)
            zi, zf, zo, zg = F.split_axis(layer.lstm(xin), 4, axis=1)
            i = F.sigmoid(zi + layer.peephole_i * c_prev[l])
            f = F.sigmoid(zf + layer.peephole_f * c_prev[l])
            c[l] = f * c_prev[l] + i * F.tanh(zg)
            o = F.sigmoid(zo + layer.peephole_o * c[l])
            r[l] = o * F.tanh(c[l])
            q = layer.conv_p(r[l])
            p[l] = F.clipped_relu(q, 1.0) if l == 0 else F.relu(q)
        return p[0], (r, c, p)


def detach_state(state):
    return None if state is None else tuple([Variable(v.array) for v in part] for part in state)


def _moving_mnist_data(params: Mapping[str, Any], d: Mapping[str, Any], mnist_path: str | None):
    from devicediff.data.moving_mnist import moving_mnist

    n_train = int(params["sequences"]) if params.get("sequences") is not None else 1000
    n_test = int(params["test_sequences"]) if params.get("test_sequences") is not None else max(1, n_train // 10)
    gen = dict(frames=int(d["sequence_length"]), canvas=int(params.get("mnist_canvas", 64)),
               digits=int(params.get("mnist_digits", 2)), size=(int(d["height"]), int(d["width"])),
               mnist_root=params.get("mnist_root") or mnist_path)
    seed = int(params.get("dataset_seed", 0))
    train = moving_mnist(n_train, seed=seed, split="train", **gen)
    test = moving_mnist(n_test, seed=seed + 1_000_003, split="test", **gen)
    if params.get("color", "auto") == "rgb":
        train, test = np.repeat(train, 3, axis=2), np.repeat(test, 3, axis=2)
    return train, test


def _video_data(params: Mapping[str, Any], d: Mapping[str, Any]):
    from devicediff.data.video import video_sequences

    train, test, _ = video_sequences(
        str(params.get("data")), height=int(d["height"]), width=int(d["width"]), length=int(d["sequence_length"]),
        color=params.get("color", "auto"), test_fraction=float(params.get("test_fraction", 0.2)),
        scene_cuts=params.get("scene_cuts"), fit=params.get("fit", "crop"),
    )
    if params.get("sequences") is not None:
        train = train[: int(params["sequences"])]
    if params.get("test_sequences") is not None:
        test = test[: int(params["test_sequences"])]
    return train, test


class ChainerPredNet:
    """PredNet ``chainer-lineage`` workload (workloads/prednet/workload.py):
    batch of ``batch_size`` sequences; each step one truncated-BPTT window of
    up to ``window`` frames; loss = Σ_t MSE(P_0(t), x_{t+1}); state carried
    across the windows of a sequence (detached at the boundary), reset at a
    new sequence; Adam."""

    name = "prednet"

    def __init__(self, params: Mapping[str, Any], described: Mapping[str, Any], mnist_path: str | None):
        d = described
        if d.get("variant") != "chainer-lineage":
            raise ChainerWorkloadError(
                f"prednet variant {d.get('variant')!r} has no Chainer version; the Chainer loop runs 'chainer-lineage'"
            )
        if d.get("fault", "none") != "none":
            raise ChainerWorkloadError(
                "prednet.fault is the PyTorch reproduction of the Chainer bug; in a Chainer config use "
                "frame_buffers = \"reused\" (the real thing) and leave fault unset"
            )
        if any(float(w) != 0.0 for w in d.get("layer_loss_weights", [1.0])[1:]):
            raise ChainerWorkloadError("chainer-lineage trains on the pixel MSE of P_0 only; layer_loss_weights are lotter's")
        self.channels = [int(c) for c in d["channels"]]
        self.r_channels = [int(c) for c in d["r_channels"]]
        self.height, self.width = int(d["height"]), int(d["width"])
        self.window, self.sequence_length = int(d["window"]), int(d["sequence_length"])
        self.batch_size, self.lr, self.lr_drop = int(d["batch_size"]), float(d["lr"]), bool(d["lr_drop"])
        self.eval_batch_size = int(params.get("eval_batch_size", 8))
        self.grid_frames = int(params.get("grid_frames", 10))
        source = str(params.get("data", "moving_mnist"))
        train, test = (_moving_mnist_data(params, d, mnist_path) if source == "moving_mnist" else _video_data(params, d))
        want = (d.get("data") or {}).get("sha256")
        got = hashlib.sha256(train.tobytes() + test.tobytes()).hexdigest()[:16]
        if want and got != want:
            raise ChainerWorkloadError(
                f"the Chainer side built data {source!r} with sha256 {got}, PyTorch's workload has {want}: "
                "the two copies of the data recipe disagree (chainer_models._moving_mnist_data / _video_data)"
            )
        self.train_x, self.test_x = np.ascontiguousarray(train), np.ascontiguousarray(test)
        self._described = dict(d)
        self._state = None

    def describe(self) -> dict:
        return self._described

    def build_model(self) -> chainer.Chain:
        return PredNetNet(channels=self.channels, r_channels=self.r_channels, height=self.height, width=self.width)

    def learning_rate(self, step: int, total: int) -> float | None:
        if not self.lr_drop:
            return None
        return self.lr if step < total // 2 else self.lr * 0.1

    def windows_per_sequence(self) -> int:
        return math.ceil((self.sequence_length - 1) / self.window)

    def steps_per_epoch(self) -> int:
        return (len(self.train_x) // self.batch_size) * self.windows_per_sequence()

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        order = epoch_order(data_seed, epoch, len(self.train_x))
        b, pairs = self.batch_size, self.sequence_length - 1
        for s in range(len(self.train_x) // b):
            seqs = self.train_x[order[s * b : (s + 1) * b]]
            for k in range(self.windows_per_sequence()):
                lo, hi = k * self.window, min((k + 1) * self.window, pairs)
                yield Batch(np.ascontiguousarray(seqs[:, lo : hi + 1]), new_sequence=(k == 0))

    def reset_state(self) -> None:
        self._state = None

    def loss(self, model, batch: Batch, feed: FrameFeeder):
        """The window's summed loss; the graph is backpropagated by the loop.
        Frame t's input and target go through ``feed`` (reused or fresh buffers)."""
        frames = batch.data
        if batch.new_sequence:
            self._state = None
        total, state = None, self._state
        for t in range(frames.shape[1] - 1):
            x = feed("input", frames[:, t])
            y = feed("target", frames[:, t + 1])
            pred, state = model.step(x, state)
            term = F.mean_squared_error(pred, y)
            total = term if total is None else total + term
        self._state = detach_state(state)
        return total

    def predict(self, model, seqs: np.ndarray, xp) -> np.ndarray:
        """Predictions of frames 1..T-1 of ``seqs`` (B, T, C, H, W) from zero state (no grad)."""
        state, preds = None, []
        for t in range(seqs.shape[1] - 1):
            pred, state = model.step(Variable(xp.asarray(np.ascontiguousarray(seqs[:, t]))), state)
            preds.append(chainer.backends.cuda.to_cpu(pred.array))
        return np.stack(preds, 1)

    def evaluate(self, model, xp) -> dict[str, float]:
        """As the PyTorch workload: next-frame MSE and SSIM on held-out sequences, and
        the copy-last-frame baseline; float64 statistics."""
        sq_model = sq_base = ssim_model = ssim_base = 0.0
        n_frames = n_px = 0
        loss_sum, loss_n = 0.0, 0
        for i in range(0, len(self.test_x), self.eval_batch_size):
            seqs = self.test_x[i : i + self.eval_batch_size]
            pred = self.predict(model, seqs, xp)
            truth, last = seqs[:, 1:].astype(np.float64), seqs[:, :-1].astype(np.float64)
            b, t = truth.shape[:2]
            flat = (b * t,) + truth.shape[2:]
            err = (pred.astype(np.float64) - truth) ** 2
            sq_model += float(err.sum())
            sq_base += float(((last - truth) ** 2).sum())
            ssim_model += float(ssim(pred.reshape(flat), truth.reshape(flat)).sum())
            ssim_base += float(ssim(last.reshape(flat), truth.reshape(flat)).sum())
            n_frames += b * t
            n_px += truth.size
            per_frame = err.mean(axis=(2, 3, 4))
            for k in range(self.windows_per_sequence()):
                loss_sum += float(per_frame[:, k * self.window : (k + 1) * self.window].sum())
                loss_n += b
        return {
            "eval_loss": loss_sum / loss_n,
            "eval_mse": sq_model / n_px,
            "eval_ssim": ssim_model / n_frames,
            "baseline_mse": sq_base / n_px,
            "baseline_ssim": ssim_base / n_frames,
        }

    def artifacts(self, model, xp, outdir) -> dict:
        """``prediction_grid.png``: truth (top) and prediction (bottom) of frames 1..k
        of held-out sequence 0 (the PyTorch workload's grid, without matplotlib)."""
        from pathlib import Path

        seqs = self.test_x[:1]
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            pred = self.predict(model, seqs, xp)
        k = min(self.grid_frames, pred.shape[1])
        rows = [seqs[0, 1 : k + 1], np.clip(pred[0, :k], 0, 1)]
        path = Path(outdir) / "prediction_grid.png"
        write_png(path, frame_grid(rows, scale=max(1, 96 // max(self.height, self.width))))
        return {"prediction_grid": path}


# ------------------------------------------------------------------------------------
# numpy helpers: SSIM and a PNG writer
# ------------------------------------------------------------------------------------


def ssim(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0, win: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Mean SSIM per image of (N, C, H, W) batches, float64: the same definition
    as ``devicediff.workloads.prednet.ssim`` (Wang et al. 2004: 11x11 gaussian
    window, σ = 1.5, K1 = 0.01, K2 = 0.03, population covariance, mean over the
    valid positions and channels), written with numpy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    g = np.arange(win, dtype=np.float64) - (win - 1) / 2
    g = np.exp(-(g**2) / (2 * sigma**2))
    g /= g.sum()

    def filt(z):
        h = z.shape[2] - win + 1
        z = sum(g[k] * z[:, :, k : k + h, :] for k in range(win))
        w = z.shape[3] - win + 1
        return sum(g[k] * z[:, :, :, k : k + w] for k in range(win))

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.mean(axis=(1, 2, 3))


def frame_grid(rows: list[np.ndarray], *, gap: int = 2, scale: int = 1) -> np.ndarray:
    """Rows of (k, C, H, W) frames in [0, 1] -> one uint8 image (H', W') or (H', W', 3)."""
    k, c, h, w = rows[0].shape
    h2, w2 = h * scale, w * scale
    out = np.full((len(rows) * (h2 + gap) - gap, k * (w2 + gap) - gap, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(k):
            img = np.transpose(row[j], (1, 2, 0)).repeat(scale, 0).repeat(scale, 1)
            out[i * (h2 + gap) : i * (h2 + gap) + h2, j * (w2 + gap) : j * (w2 + gap) + w2] = (
                np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out[..., 0] if c == 1 else out


def write_png(path, img: np.ndarray) -> None:
    """A minimal PNG (8-bit gray or RGB, no filtering), standard library + numpy."""
    import struct
    import zlib

    img = np.ascontiguousarray(img, np.uint8)
    h, w = img.shape[:2]
    color = 0 if img.ndim == 2 else 2
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------


WORKLOADS = {"autoencoder": ChainerAutoencoder, "prednet": ChainerPredNet}
BUILTIN_TARGETS = {"devicediff.workloads.autoencoder:make": "autoencoder", "devicediff.workloads.prednet:make": "prednet"}


def make_chainer_workload(name: str, params: Mapping[str, Any], meta: Mapping[str, Any]):
    """The Chainer twin of built-in workload ``name``, configured from the PyTorch
    workload's resolved ``describe()`` (carried in the init export's ``meta``)."""
    key = BUILTIN_TARGETS.get(name, name)
    cls = WORKLOADS.get(key)
    if cls is None:
        raise ChainerWorkloadError(f"workload {name!r} has no Chainer version; Chainer runs {sorted(WORKLOADS)}")
    return cls(params, meta.get("describe") or {}, meta.get("mnist_path"))
