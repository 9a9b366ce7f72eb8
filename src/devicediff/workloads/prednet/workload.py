"""The PredNet workload: next-frame video prediction, two variants.

``chainer-lineage`` (the original study's network and training loop, Watanabe
et al. 2018 Chainer PredNet): batch 1 by default; each training step is one
truncated-BPTT *window* of up to ``window`` frames of one sequence; the loss is
the sum over the window of the pixel MSE between P_0 (the prediction made
from frame t) and frame t+1; the recurrent state is carried from one window to
the next within a sequence (detached at the window boundary) and reset at a
new sequence; Adam, lr 1e-3.

``lotter`` (coxlab/prednet, Lotter et al. 2016, arXiv 1605.08104, the KITTI
training script): batch 4 sequences of ``window`` = nt = 10 frames; loss =
Σ_t w_t Σ_l λ_l mean(E_l(t)), time weights w_0 = 0 and w_t = 1/(nt-1), layer
weights λ = [1, 0, 0, 0] (the paper's "L_0" model); Adam, lr 1e-3, then 1e-4
from halfway through the run (their 150 epochs switch at epoch 75).

Planted fault (``fault="alias_targets"``, chainer-lineage only): reproduces,
on any device, the Chainer CPU bug of the original study (DESIGN.md §1). One
target buffer is overwritten in place with each frame's target, and each
frame's MSE term keeps a *reference* to that buffer and reads it again in
backward. The forward loss is right; at backward time every term of the
window sees the window's last target, so the gradients are wrong.

Speed devices, each a parameter and in ``describe()``: ``conv_routes`` (other cuDNN entry points
on Hopper), ``fused_kernels`` (eager's bits) and ``weight_grads``: ``"batched"`` (lotter's default:
each convolution's weight gradient once per backward pass over all time steps, the same sums in
another order) or ``"per_step"`` (chainer-lineage's default, as Chainer sums them). docs/prednet.md.

Data: ``data = "moving_mnist" | "carphone" | "bikes" | PATH`` (see
``devicediff.data.moving_mnist`` and ``devicediff.data.video``). The data set
is fixed by ``dataset_seed`` (default 0), identical for every run of a study;
``data_seed`` only orders the batches.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from devicediff.errors import DataError, ParamError
from devicediff.spec import Batch, Workload, epoch_order
from devicediff.workloads.prednet.data import prednet_data
from devicediff.workloads.prednet.model import VARIANTS, PredNet, build_prednet

FAULTS = ("none", "alias_targets")
DEFAULTS = {
    "chainer-lineage": {"height": 120, "width": 160, "window": 20, "batch_size": 1, "lr_drop": False},
    "lotter": {"height": 128, "width": 160, "window": 10, "batch_size": 4, "lr_drop": True},
}
UPPER_CHANNELS = (48, 96, 192)  # both papers' A/R channels above the input layer


def default_channels(layers: int, in_channels: int) -> list[int]:
    """(C_in, 48, 96, 192) for 4 layers; fewer layers take a prefix, more keep doubling."""
    upper = [UPPER_CHANNELS[i] if i < 3 else UPPER_CHANNELS[-1] * 2 ** (i - 2) for i in range(layers - 1)]
    return [in_channels, *upper]


# ------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------


class AliasedTargetMSE(torch.autograd.Function):
    """Mean squared error whose backward reads the target *buffer* as it is at
    backward time, not as it was at forward time.

    This is how Chainer >= 3 ``mean_squared_error`` behaves when the target
    Variable wraps a numpy buffer the loop overwrites (``numpy.asarray`` does
    not copy on CPU): it keeps its inputs and recomputes ``x0 - x1`` in
    backward. PyTorch would refuse this pattern with a version-counter error if
    the buffer were saved with ``save_for_backward``; keeping a plain reference
    on ``ctx`` bypasses that check on purpose.
    """

    @staticmethod
    def forward(ctx, pred, target_buffer):
        ctx.save_for_backward(pred)
        ctx.target_buffer = target_buffer  # a reference: later in-place writes show through
        return F.mse_loss(pred, target_buffer)

    @staticmethod
    def backward(ctx, grad):
        (pred,) = ctx.saved_tensors
        # The same kernel as F.mse_loss's own backward, fed the buffer's current contents.
        g = torch.ops.aten.mse_loss_backward(grad, pred, ctx.target_buffer, 1)  # 1 = mean reduction
        return g, None


def lotter_loss(out, layer_loss_weights) -> torch.Tensor:
    """Lotter et al.'s training loss: Σ_{t>=1} 1/(nt-1) Σ_l λ_l mean(E_l(t)).

    The t = 0 term has weight 0 (the first prediction has seen nothing) and is
    left out; so are layers with λ_l = 0. ``mean`` runs over batch, channels
    and pixels (coxlab/prednet averages per sample, then over the batch: the
    same number)."""
    nt = len(out.errors)
    total = None
    for t in range(1, nt):
        for l, lam in enumerate(layer_loss_weights):
            if lam == 0.0:
                continue
            term = out.errors[t][l].mean() * (lam / (nt - 1))
            total = term if total is None else total + term
    return total


def window_mse_loss(predictions, targets: torch.Tensor, *, target_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The chainer-lineage loss of one window: Σ_t MSE(P_0(t), targets[:, t]).

    With ``target_buffer`` (the ``alias_targets`` fault), each frame's target is
    first copied into that one buffer, in place, and the term keeps a reference
    to the buffer (``AliasedTargetMSE``), as the original Chainer loop did."""
    total = None
    for t, pred in enumerate(predictions):
        if target_buffer is None:
            term = F.mse_loss(pred, targets[:, t])
        else:
            target_buffer.copy_(targets[:, t])  # the loop's reused numpy buffer, rewritten each frame
            term = AliasedTargetMSE.apply(pred, target_buffer)
        total = term if total is None else total + term
    return total


# ------------------------------------------------------------------------------------
# SSIM (Wang, Bovik, Sheikh & Simoncelli 2004)
# ------------------------------------------------------------------------------------


def _gaussian(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image, for (N, C, H, W) batches; shape (N,).

    Wang et al. 2004, eq. 13 with their settings: an 11x11 circular-symmetric
    gaussian window of σ = 1.5 (normalised to sum 1), K1 = 0.01, K2 = 0.03,
    L = ``data_range``; local statistics with the population (1/N-weighted)
    covariance; the SSIM map is averaged over the positions where the window
    fits inside the image ("valid"), then over channels. This equals
    ``skimage.metrics.structural_similarity(x, y, data_range=1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=0)`` (skimage crops the same border before averaging).
    Computed in float64.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ParamError(f"ssim: need two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win:
        raise ParamError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {win}x{win} window")
    x, y = x.to(torch.float64), y.to(torch.float64)
    n, c, h, w = x.shape
    g = _gaussian(win, sigma, x.dtype, x.device)
    gy = g.view(1, 1, win, 1).expand(c, 1, win, 1)
    gx = g.view(1, 1, 1, win).expand(c, 1, 1, win)

    def filt(z):
        return F.conv2d(F.conv2d(z, gy, groups=c), gx, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------
# The workload
# ------------------------------------------------------------------------------------


WEIGHT_GRADS = ("auto", "batched", "per_step")


def _check_choices(variant: str, fault: str, conv_routes: str, fused_kernels: str, weight_grads: str) -> tuple:
    if variant not in VARIANTS:
        raise ParamError(f"prednet.variant {variant!r} unknown; use one of {list(VARIANTS)}")
    if fault not in FAULTS:
        raise ParamError(f"prednet.fault {fault!r} unknown; use one of {list(FAULTS)}")
    if fault != "none" and variant != "chainer-lineage":
        raise ParamError("prednet.fault = 'alias_targets' needs variant = 'chainer-lineage' (lotter's loss has no targets)")
    if conv_routes not in ("auto", "plain"):
        raise ParamError(f"prednet.conv_routes {conv_routes!r} unknown; use 'auto' (measured cuDNN routes on Hopper) or 'plain'")
    if fused_kernels not in ("auto", "off"):
        raise ParamError(f"prednet.fused_kernels {fused_kernels!r} unknown; use 'auto' (fused elementwise kernels on "
                         "CUDA, eager's bits) or 'off'")
    if weight_grads not in WEIGHT_GRADS:
        raise ParamError(f"prednet.weight_grads {weight_grads!r} unknown; use 'auto' (lotter: batched, chainer-lineage: "
                         "per_step), 'batched' (once per backward pass over all time steps) or 'per_step'")
    if weight_grads == "auto":
        weight_grads = "batched" if variant == "lotter" else "per_step"
    return variant, fault, conv_routes, fused_kernels, weight_grads


def _window(variant: str, window: int | None, nt: int | None) -> int | None:
    """lotter's ``nt`` is its window (and sequence length)."""
    if nt is None:
        return window
    if variant != "lotter":
        raise ParamError("prednet.nt is lotter's sequence length; for chainer-lineage set window (BPTT window)")
    if window is not None and window != nt:
        raise ParamError(f"prednet: nt = {nt} and window = {window} disagree; give one")
    return nt


def _sequence_length(variant: str, sequence_length: int | None, window: int) -> int:
    if variant != "lotter":
        return int(sequence_length if sequence_length is not None else 20)
    length = int(sequence_length if sequence_length is not None else window)
    if length != window:
        raise ParamError(f"prednet (lotter): sequence_length {sequence_length} must equal window/nt {window}")
    return length


def _channels(layers: int | None, channels: list[int] | None, in_ch: int, data: str) -> list[int]:
    """Channels per layer: given, or the papers' defaults for ``layers`` layers; the first must fit the data."""
    if channels is None:
        nl = int(layers) if layers is not None else 4
        if nl < 1:
            raise ParamError(f"prednet.layers must be >= 1, got {layers}")
        return default_channels(nl, in_ch)
    channels = [int(c) for c in channels]
    if layers is not None and int(layers) != len(channels):
        raise ParamError(f"prednet: layers = {layers} but channels has {len(channels)} entries; give one")
    if channels[0] != in_ch:
        raise DataError(
            f"prednet.channels[0] = {channels[0]} but data {data!r} has {in_ch} channel(s); "
            f"set channels[0] = {in_ch} or color = {'rgb' if channels[0] == 3 else 'gray'!r}"
        )
    return channels


class PredNetWorkload(Workload):
    name = "prednet"
    primary_metrics = ("eval_mse",)
    # Data-only metrics: the same on every run by construction (a check, never a test).
    check_metrics = ("baseline_mse", "baseline_ssim")

    def __init__(  # long: 30 lines are the typed signature the parameter checks read
        self,
        *,
        variant: str = "chainer-lineage",
        layers: int | None = None,
        channels: list[int] | None = None,
        r_channels: list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        window: int | None = None,
        nt: int | None = None,
        sequence_length: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-3,
        lr_drop: bool | None = None,
        layer_loss_weights: list[float] | None = None,
        data: str = "moving_mnist",
        sequences: int | None = None,
        test_sequences: int | None = None,
        dataset_seed: int = 0,
        color: str = "auto",
        fit: str = "crop",
        test_fraction: float = 0.2,
        scene_cuts: list[int] | None = None,
        mnist_canvas: int = 64,
        mnist_digits: int = 2,
        mnist_root: str | None = None,
        eval_batch_size: int = 8,
        grid_frames: int = 10,
        fault: str = "none",
        conv_routes: str = "auto",
        fused_kernels: str = "auto",
        weight_grads: str = "auto",
    ):
        self.variant, self.fault, self.conv_routes, self.fused_kernels, self.weight_grads = _check_choices(
            variant, fault, conv_routes, fused_kernels, weight_grads)
        d = DEFAULTS[variant]
        window = _window(variant, window, nt)
        self.height = int(height if height is not None else d["height"])
        self.width = int(width if width is not None else d["width"])
        self.window = int(window if window is not None else d["window"])
        self.batch_size = int(batch_size if batch_size is not None else d["batch_size"])
        if not lr > 0:
            raise ParamError(f"prednet.lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.lr_drop = bool(d["lr_drop"] if lr_drop is None else lr_drop)
        self.sequence_length = _sequence_length(variant, sequence_length, self.window)
        self._check_geometry()
        self.data = str(data)
        self.dataset_seed = int(dataset_seed)
        self.eval_batch_size = int(eval_batch_size)
        self.grid_frames = int(grid_frames)
        # Data: fails here, before any training, with a one-line DataError.
        self._load_data(sequences=sequences, test_sequences=test_sequences, color=color, fit=fit,
                        test_fraction=test_fraction, scene_cuts=scene_cuts, mnist_canvas=mnist_canvas,
                        mnist_digits=mnist_digits, mnist_root=mnist_root)
        self.channels = _channels(layers, channels, int(self.train_x.shape[2]), self.data)
        self.r_channels = [int(c) for c in r_channels] if r_channels is not None else list(self.channels)
        nl = len(self.channels)
        if layer_loss_weights is None:
            layer_loss_weights = [1.0] + [0.0] * (nl - 1)
        if len(layer_loss_weights) != nl:
            raise ParamError(f"prednet.layer_loss_weights needs {nl} entries (one per layer), got {layer_loss_weights}")
        self.layer_loss_weights = [float(v) for v in layer_loss_weights]
        # Fail on a bad architecture now rather than in the worker's build_model.
        try:
            PredNet(variant=variant, channels=self.channels, r_channels=self.r_channels, height=self.height,
                    width=self.width)
        except ValueError as e:
            raise ParamError(f"prednet: {e}") from None
        self._state = None  # chainer-lineage: recurrent state carried across windows
        self._target_buffer = None  # alias_targets: the one reused target buffer

    def _check_geometry(self) -> None:
        if self.window < 1 or self.batch_size < 1:
            raise ParamError(f"prednet: window and batch_size must be >= 1, got {self.window}, {self.batch_size}")
        if self.sequence_length < 2:
            raise ParamError(f"prednet: sequence_length must be >= 2 (an input and a target), got {self.sequence_length}")
        if min(self.height, self.width) < 11:
            raise ParamError(f"prednet: {self.height}x{self.width} is too small for the 11x11 SSIM window; use >= 11")

    def _load_data(self, **recipe: Any) -> None:
        train, test, self.data_info = prednet_data(self.data, sequence_length=self.sequence_length, height=self.height,
                                                   width=self.width, dataset_seed=self.dataset_seed, **recipe)
        if len(train) < self.batch_size:
            raise DataError(
                f"data {self.data!r}: {len(train)} training sequence(s), fewer than batch_size {self.batch_size}; "
                "lower batch_size or give more sequences / a longer video"
            )
        if len(test) < 1:
            raise DataError(f"data {self.data!r}: no held-out sequence; give more sequences or a longer video")
        self.train_x = torch.from_numpy(np.ascontiguousarray(train))
        self.test_x = torch.from_numpy(np.ascontiguousarray(test))
        self.data_info["sha256"] = hashlib.sha256(train.tobytes() + test.tobytes()).hexdigest()[:16]

    # -- description ------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "layers": len(self.channels), "channels": self.channels,
            "r_channels": self.r_channels, "height": self.height, "width": self.width,
            "window": self.window, "sequence_length": self.sequence_length, "batch_size": self.batch_size,
            "lr": self.lr, "lr_drop": self.lr_drop, "layer_loss_weights": self.layer_loss_weights,
            "fault": self.fault, "conv_routes": self.conv_routes,
            "fused_kernels": self.fused_kernels, "weight_grads": self.weight_grads,
            "train_sequences": len(self.train_x), "test_sequences": len(self.test_x),
            "dataset_seed": self.dataset_seed, "data": self.data_info,
            "randomness": "none during training (no dropout); init from init_seed, order from data_seed",
        }

    # -- model and optimisation ---------------------------------------------------------
    def build_model(self, init_seed: int) -> PredNet:
        model = build_prednet(variant=self.variant, channels=self.channels, r_channels=self.r_channels,
                              height=self.height, width=self.width, init_seed=init_seed)
        return model.set_conv_routes(self.conv_routes).set_fused(self.fused_kernels == "auto") \
            .set_batch_wgrad(self.weight_grads == "batched")

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def learning_rate(self, step: int, total_steps: int) -> float | None:
        if not self.lr_drop:
            return None
        return self.lr if step < total_steps // 2 else self.lr * 0.1

    # -- batches --------------------------------------------------------------------------
    def windows_per_sequence(self) -> int:
        if self.variant == "lotter":
            return 1
        return math.ceil((self.sequence_length - 1) / self.window)

    def steps_per_epoch(self) -> int:
        return (len(self.train_x) // self.batch_size) * self.windows_per_sequence()

    def train_batches(self, data_seed: int, epoch: int) -> Iterator[Batch]:
        """Sequences in an order drawn from numpy's PCG64 seeded by (data_seed,
        epoch); the last incomplete batch of sequences is dropped.

        lotter: data (B, nt, C, H, W). chainer-lineage: one window of B sequences,
        data (B, k + 1, C, H, W) holding k inputs and their k targets (frames
        shifted by one); consecutive windows overlap by one frame; the first
        window of each sequence has ``new_sequence=True``.
        """
        order = epoch_order(data_seed, epoch, len(self.train_x))
        b = self.batch_size
        pairs = self.sequence_length - 1
        for s in range(len(self.train_x) // b):
            idx = torch.from_numpy(order[s * b : (s + 1) * b])
            seqs = self.train_x[idx]
            if self.variant == "lotter":
                yield Batch(seqs, new_sequence=True)
                continue
            for k in range(self.windows_per_sequence()):
                lo, hi = k * self.window, min((k + 1) * self.window, pairs)
                yield Batch(seqs[:, lo : hi + 1].contiguous(), new_sequence=(k == 0))

    # -- loss -------------------------------------------------------------------------------
    def reset_state(self) -> None:
        self._state = None

    def loss(self, model, batch: Batch) -> torch.Tensor:
        frames = batch.data
        if self.variant == "lotter":
            upper = any(w != 0 for w in self.layer_loss_weights[1:])
            return lotter_loss(model(frames, full_last_step=upper), self.layer_loss_weights)
        # chainer-lineage: one truncated-BPTT window, state carried within a sequence.
        if batch.new_sequence:
            self._state = None
        inputs, targets = frames[:, :-1], frames[:, 1:]
        out = model(inputs, self._state)
        self._state = out.state.detach()
        if self.fault == "alias_targets":
            buf = self._target_buffer
            if buf is None or buf.shape != targets[:, 0].shape or buf.device != targets.device or buf.dtype != targets.dtype:
                buf = self._target_buffer = torch.empty_like(targets[:, 0])
            return window_mse_loss(out.predictions, targets, target_buffer=buf)
        return window_mse_loss(out.predictions, targets)

    # -- evaluation ---------------------------------------------------------------------------
    def _predict(self, model, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of frames 1..T-1 of ``seqs`` (B, T, C, H, W) and the
        per-step training-loss terms, both computed without carrying state in
        from anywhere else."""
        if self.variant == "lotter":
            out = model(seqs)
            pred = torch.stack(out.predictions[1:], 1)
            nt = seqs.shape[1]
            terms = [sum(lam * out.errors[t][l].mean().item() for l, lam in enumerate(self.layer_loss_weights) if lam)
                     / (nt - 1) for t in range(1, nt)]
            return pred, torch.tensor(terms, dtype=torch.float64)
        out = model(seqs[:, :-1])
        pred = torch.stack(out.predictions, 1)
        return pred, None

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Next-frame MSE and SSIM on the held-out sequences (frames 1..T-1),
        and the same for the copy-last-frame baseline."""
        sq_model = sq_base = ssim_model = ssim_base = 0.0
        n_frames = n_px = 0
        loss_sum, loss_n = 0.0, 0
        for i in range(0, len(self.test_x), self.eval_batch_size):
            seqs = self.test_x[i : i + self.eval_batch_size].to(device)
            pred, terms = self._predict(model, seqs)
            truth, last = seqs[:, 1:], seqs[:, :-1]
            b, t = truth.shape[:2]
            flat = (b * t,) + tuple(truth.shape[2:])
            err = (pred.double() - truth.double()) ** 2
            sq_model += err.sum().item()
            sq_base += ((last.double() - truth.double()) ** 2).sum().item()
            ssim_model += ssim(pred.reshape(flat), truth.reshape(flat)).sum().item()
            ssim_base += ssim(last.reshape(flat), truth.reshape(flat)).sum().item()
            n_frames += b * t
            n_px += truth.numel()
            if self.variant == "lotter":
                loss_sum += terms.sum().item() * b
                loss_n += b
            else:
                per_frame = err.mean(dim=(2, 3, 4))  # (B, T-1): the MSE term of each frame
                for k in range(self.windows_per_sequence()):
                    loss_sum += per_frame[:, k * self.window : (k + 1) * self.window].sum().item()
                    loss_n += b
        return {
            "eval_loss": loss_sum / loss_n,
            "eval_mse": sq_model / n_px,
            "eval_ssim": ssim_model / n_frames,
            "baseline_mse": sq_base / n_px,
            "baseline_ssim": ssim_base / n_frames,
        }

    # -- artifacts ----------------------------------------------------------------------------
    @torch.no_grad()
    def artifacts(self, model, device, outdir: Path) -> dict[str, Path]:
        """A PNG grid for the first held-out sequence: ground truth (top row)
        and the model's prediction (bottom row) of frames 1..k."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        was_training = model.training
        model.eval()
        seqs = self.test_x[:1].to(device)
        pred, _ = self._predict(model, seqs)
        model.train(was_training)
        k = min(self.grid_frames, pred.shape[1])
        truth = seqs[0, 1 : k + 1].float().cpu().numpy()
        guess = pred[0, :k].float().clamp(0, 1).cpu().numpy()
        fig = Figure(figsize=(1.1 * k + 0.6, 2.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, k, squeeze=False)
        for row, (label, frames) in enumerate((("truth", truth), ("prediction", guess))):
            for j in range(k):
                ax = axes[row][j]
                img = frames[j]
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(np.transpose(img, (1, 2, 0)))
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"t={j + 1}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(f"PredNet ({self.variant}) next-frame prediction, held-out sequence 0", fontsize=9)
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / "prediction_grid.png"
        fig.savefig(path)
        return {"prediction_grid": path}
