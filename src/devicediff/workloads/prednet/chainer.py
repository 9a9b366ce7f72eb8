"""The Chainer twin of PredNet ``chainer-lineage`` (``model.py``, ``workload.py``): the
original study's network and loop, in the framework it ran in. Its data come from the same
numpy recipe as the PyTorch workload's (``data.py``); its SSIM and prediction grid are numpy
restatements of the PyTorch workload's."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator, Mapping

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import Variable

from devicediff.errors import ParamError
from devicediff.spec import Batch, epoch_order
from devicediff.workloads.prednet.data import DATA_PARAMS, prednet_data


def _conv(c_in: int, c_out: int) -> L.Convolution2D:
    """3x3, stride 1, zero padding 1, with bias; zero-initialised (weights are loaded).
    Every parameter takes ``chainer.config.dtype`` (float32 unless a caller asks for float64)."""
    return L.Convolution2D(c_in, c_out, ksize=3, stride=1, pad=1, initialW=chainer.initializers.Zero(),
                           initial_bias=chainer.initializers.Zero())


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
            raise ParamError(
                f"prednet variant {d.get('variant')!r} has no Chainer version; the Chainer loop runs 'chainer-lineage'"
            )
        if d.get("fault", "none") != "none":
            raise ParamError(
                "prednet.fault is the PyTorch reproduction of the Chainer bug; in a Chainer config use "
                "frame_buffers = \"reused\" (the real thing) and leave fault unset"
            )
        if any(float(w) != 0.0 for w in d.get("layer_loss_weights", [1.0])[1:]):
            raise ParamError("chainer-lineage trains on the pixel MSE of P_0 only; layer_loss_weights are lotter's")
        self.channels = [int(c) for c in d["channels"]]
        self.r_channels = [int(c) for c in d["r_channels"]]
        self.height, self.width = int(d["height"]), int(d["width"])
        self.window, self.sequence_length = int(d["window"]), int(d["sequence_length"])
        self.batch_size, self.lr, self.lr_drop = int(d["batch_size"]), float(d["lr"]), bool(d["lr_drop"])
        self.eval_batch_size = int(params.get("eval_batch_size", 8))
        self.grid_frames = int(params.get("grid_frames", 10))
        source = str(params.get("data", "moving_mnist"))
        recipe = {k: params[k] for k in DATA_PARAMS if params.get(k) is not None}
        train, test, _ = prednet_data(source, sequence_length=int(d["sequence_length"]), height=self.height,
                                      width=self.width, **{"mnist_root": mnist_path, **recipe})
        want = (d.get("data") or {}).get("sha256")
        got = hashlib.sha256(train.tobytes() + test.tobytes()).hexdigest()[:16]
        if want and got != want:  # a check that this environment's numpy/decoder gives the same bits
            raise RuntimeError(f"the Chainer side built data {source!r} with sha256 {got}, PyTorch's workload has {want}")
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

    def loss(self, model, batch: Batch, feed):
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
