"""PredNet in PyTorch, two variants that share one set of building blocks.

PredNet (Lotter, Kreiman & Cox 2016, "Deep Predictive Coding Networks for Video
Prediction and Unsupervised Learning", arXiv 1605.08104) is a stack of layers
l = 0..L-1. Each layer holds

* A_l  its input (A_0 is the frame; A_{l+1} is made from E_l),
* R_l  a convolutional LSTM "representation" (hidden state h, cell c),
* P_l  a prediction of A_l made from R_l (the paper writes Â_l),
* E_l  error units, E_l = [ReLU(A_l - P_l), ReLU(P_l - A_l)] (channel concat,
  in that order, as in the paper's Algorithm 1).

The two variants (``variant=``):

``chainer-lineage``
    The network the original (retracted) GPU-uncertainty study trained: the
    Chainer PredNet of Watanabe et al. 2018 (eijwat/PredNet; forks by LanaSina,
    quadjr). Each time step takes frame x_t and returns P_0, the prediction
    of x_{t+1}:

    1. bottom-up with last step's predictions P (zeros at a new sequence)::

           A_0 = x_t
           E_l = [ReLU(A_l - P_l), ReLU(P_l - A_l)]
           A_{l+1} = maxpool2x2(ReLU(conv_a_l(E_l)))          (l < L-1)

    2. top-down, l = L-1 .. 0::

           U_l  = upsample_nearest_x2(R_{l+1})   (new R_{l+1}, this step; l < L-1)
           X_l  = concat[E_l, R_l(prev), U_l]    (channel order exactly so;
                                                  U_l absent at the top)
           Z    = lstm_l(X_l)                    (one 3x3 conv, 4*C_R outputs,
                                                  gate blocks in order i, f, o, g)
           i    = sigmoid(Z_i + peephole_i ⊙ c_prev)
           f    = sigmoid(Z_f + peephole_f ⊙ c_prev)
           c    = f ⊙ c_prev + i ⊙ tanh(Z_g)
           o    = sigmoid(Z_o + peephole_o ⊙ c)        (new c, Shi et al. 2015)
           R_l  = h = o ⊙ tanh(c)
           P_0  = clip(conv_p_0(R_0), 0, 1)      (Chainer clipped_relu(., 1))
           P_l  = ReLU(conv_p_l(R_l))            (l > 0)

    Peepholes are per-pixel weights of shape (C_R, H_l, W_l) (Chainer's
    "EltFilter"), so the network is tied to one image size. Logistic sigmoid
    gates. Trained on pixel MSE(P_0, x_{t+1}), see ``workload.py``.

``lotter``
    coxlab/prednet as published (Lotter et al. 2016, Algorithm 1): each step
    first updates R top-down from the *previous* step's E (zeros at t = 0),
    then predicts P(t) for the current frame and computes E(t) bottom-up.
    Same equations as above except: no peepholes, and i, f, o use Keras's
    hard sigmoid, clip(0.2 z + 0.5, 0, 1) (Keras 1/2 ``hard_sigmoid``, the
    LSTM "inner activation" coxlab/prednet used). Trained on the mean of E
    activity (see ``workload.py``).

Both variants: every convolution is 3x3, stride 1, zero padding 1 ("same"),
with a bias; max pooling is 2x2 stride 2; upsampling is nearest neighbour x2
(Chainer ``unpooling_2d(2, stride=2, cover_all=False)``, Keras
``UpSampling2D``). All states start at zero.

Speed (issue 7): the four gate convolutions are one convolution with 4*C_R
output channels; the three LSTM inputs are concatenated once; E is made with
one concat and one ReLU (ReLU(cat[d, -d]) equals [ReLU(A-P), ReLU(P-A)]
exactly, since a - b = -(b - a) in IEEE arithmetic); on Hopper GPUs a few
convolutions of the lotter training shapes enter cuDNN through another,
faster entry point computing the same sums (``Conv3x3``, ``CUDNN_ROUTES``); on CUDA, the lotter
cell's and the error units' elementwise operations run as one kernel each way with eager's
roundings, bit for bit (``fused.py``, ``PredNet.set_fused``).
Nothing here follows or overrides the execution config: channels_last, TF32,
compile and CUDA graphs are config axes of the loop, or options of
``benchmarks/prednet_speed.py``.

Parameter names (``state_dict``), stable, documented in docs/prednet.md::

    layers.{l}.lstm.weight   (4*C_R[l], 2*C_A[l] + C_R[l] + C_R[l+1], 3, 3)
    layers.{l}.lstm.bias     (4*C_R[l],)
    layers.{l}.peephole_i    (C_R[l], H_l, W_l)    chainer-lineage only
    layers.{l}.peephole_f    (C_R[l], H_l, W_l)    chainer-lineage only
    layers.{l}.peephole_o    (C_R[l], H_l, W_l)    chainer-lineage only
    layers.{l}.conv_p.weight (C_A[l], C_R[l], 3, 3)   R_l -> P_l
    layers.{l}.conv_p.bias   (C_A[l],)
    layers.{l}.conv_a.weight (C_A[l+1], 2*C_A[l], 3, 3)  E_l -> A_{l+1}, l < L-1
    layers.{l}.conv_a.bias   (C_A[l+1],)
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from devicediff.workloads.prednet import fused

VARIANTS = ("chainer-lineage", "lotter")
GATE_ORDER = ("i", "f", "o", "g")


#: cuDNN entry points per convolution shape (N, C_in, C_out, H, W) -> (forward, input gradient),
#: used by ``routes="auto"`` (the default) on Hopper GPUs (compute capability 9.x) with cuDNN on.
#: "tconv": forward as conv_transpose2d(x, V); "conv" (input gradient): conv2d(gy, V); V = _flipped(W).
#: Measured by ``benchmarks/prednet_speed.py --conv-table`` (cuDNN 9.19, float32, TF32 off, H200;
#: the H100 table of the same kernels agreed): the lotter training shapes (batch 4, 128x160), where
#: cuDNN's own choice for the plain call is 1.2x to 6.6x slower. Shapes not listed take the plain path.
CUDNN_ROUTES: dict[tuple[int, int, int, int, int], tuple[str, str]] = {
    (4, 57, 12, 128, 160): ("tconv", "native"),  # layers.0.lstm   fwd 0.234 -> 0.170 ms
    (4, 240, 192, 64, 80): ("conv", "conv"),  # layers.1.lstm   dgrad 1.507 -> 0.658 ms
    (4, 96, 96, 64, 80): ("conv", "conv"),  # layers.1.conv_a dgrad 0.416 -> 0.168 ms
    (4, 480, 384, 32, 40): ("tconv", "native"),  # layers.2.lstm   fwd 0.640 -> 0.540 ms
    (4, 576, 768, 16, 20): ("tconv", "native"),  # layers.3.lstm   fwd 2.321 -> 0.351 ms
}
_ROUTE_ARCHS = (9,)  # compute capability majors the table was measured on
PLAIN = ("conv", "native")
_capability: dict[int, int] = {}  # device index -> major compute capability (a hardware fact, cached)


def _arch_major(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capability:
        _capability[idx] = torch.cuda.get_device_capability(idx)[0]
    return _capability[idx]


def choose_route(routes, key: tuple[int, int, int, int, int], arch_major: int | None) -> tuple[str, str]:
    """The route of one conv call on a CUDA GPU with cuDNN on (float32)."""
    if routes == "plain":
        return PLAIN
    if routes == "auto":
        return CUDNN_ROUTES.get(key, PLAIN) if arch_major in _ROUTE_ARCHS else PLAIN
    return routes.get(key, PLAIN)


_CONV_ARGS = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out pad, groups


def _flipped(w: torch.Tensor) -> torch.Tensor:
    """W (C_out, C_in, 3, 3) -> V (C_in, C_out, 3, 3), V[c, o] = W[o, c] rotated 180 degrees.

    With stride 1 and padding 1: conv2d(x, W) == conv_transpose2d(x, V), and the
    input gradient of conv2d(., W) is conv2d(gy, V)."""
    return w.transpose(0, 1).flip(2, 3).contiguous()


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, zero padding 1, with bias.

    Our own small class (not ``nn.Conv2d``) so building it draws no random
    numbers: every value is set later by ``PredNet.init_weights``.

    Two speed devices, neither touching the execution config's flags (cuDNN on
    or off, TF32, determinism and cudnn.benchmark apply to every path alike):

    * ``routes`` (default ``"auto"``; ``PredNet.set_conv_routes``): which cuDNN
      entry point computes the forward product and the input gradient. A 3x3
      "same" correlation can be run as conv2d(x, W) or as conv_transpose2d(x, V)
      (``_flipped``), and its input gradient as cuDNN's dgrad or as
      conv2d(gy, V): the same sums, but cuDNN's fp32 heuristics pick very
      different kernels for the two (``CUDNN_ROUTES``, docs/prednet.md). On
      CPU, with cuDNN off, off Hopper, or for unlisted shapes: plain conv2d.
    * ``batch_wgrad`` (``PredNet.set_batch_wgrad``; the lotter variant's default): the weight and
      bias gradients of all this module's calls in one backward pass computed once, over their
      inputs and output gradients stacked along the batch axis, instead of once per call (per time
      step) and summed by the autograd engine: the same sum in another order, with ten times fewer
      convolution calls and no engine additions (docs/prednet.md, "Batched weight gradients"). The
      total goes back through the engine from the module's last node to run in the pass, so
      ``.grad``, ``torch.autograd.grad`` and parameter hooks see one gradient as usual.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.batch_wgrad = False
        self.routes: str | dict = "auto"
        self.cache_flipped = True  # V = _flipped(W) once per weight version, not once per call
        self._flip: tuple | None = None  # (weakref to W, its data pointer, its version, V)
        self._nodes: list = []  # batch_wgrad: weak references to this module's autograd nodes
        self._passes: dict = {}  # backward pass (graph task id) -> [nodes it will run, (x, gy) so far]

    def flipped(self, w: torch.Tensor) -> torch.Tensor:
        """``_flipped(w)``, made once for each version of ``w``: a recurrent step calls the conv at every
        time step with the same weights (10 forward and 10 backward calls a step at nt = 10), and each
        flip is a kernel launch and host work (docs/prednet.md, "Speed that holds"). The same values
        either way; an in-place update of ``w`` (the optimizer, ``load_state_dict``) makes a new one."""
        if not self.cache_flipped:
            return _flipped(w)
        c = self._flip
        if c is not None and c[0]() is w and c[1] == w.data_ptr() and c[2] == w._version:
            return c[3]
        v = _flipped(w.detach())
        self._flip = (weakref.ref(w), w.data_ptr(), w._version, v)
        return v

    def _route(self, x: torch.Tensor) -> tuple[str, str]:
        if self.routes == "plain" or not x.is_cuda or not torch.backends.cudnn.enabled or x.dtype != torch.float32:
            return PLAIN
        arch = _arch_major(x.device) if self.routes == "auto" else None
        return choose_route(self.routes, (x.shape[0], self.in_channels, self.out_channels, x.shape[2], x.shape[3]), arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile, plain conv2d: the routed path's autograd.Function (with this module as an
        # argument) broke dynamo's graph at every convolution, and each of the step's shapes then recompiled
        # this method until dynamo's recompile limit left the rest of the step uncompiled (docs/prednet.md).
        compiling = torch.compiler.is_compiling()
        route = PLAIN if compiling else self._route(x)
        if torch.is_grad_enabled() and self.weight.requires_grad and not compiling \
                and ((self.batch_wgrad and _CAN_BATCH) or route != PLAIN):
            return _Conv3x3Fn.apply(x, self.weight, self.bias, route, self)
        if route[0] == "tconv":
            return F.conv_transpose2d(x, _flipped(self.weight), self.bias, padding=1)
        return F.conv2d(x, self.weight, self.bias, padding=1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3, padding=1"

    def __getstate__(self):  # pickling (torch.save of a whole model, deepcopy) leaves the caches behind
        return {**super().__getstate__(), "_flip": None, "_nodes": [], "_passes": {}}

    # -- batch_wgrad ---------------------------------------------------------------
    def _track(self, node) -> None:
        if len(self._nodes) >= 64:  # forward passes that never ran backward leave dead references
            self._nodes = [r for r in self._nodes if r() is not None]
        self._nodes.append(weakref.ref(node))

    def _batched_wgrad(self, x: torch.Tensor, gy: torch.Tensor, w: torch.Tensor):
        """Called from each of this module's nodes as the engine runs it: ``(None, None)`` until the
        last of them that runs in this backward pass, which gets the weight and bias gradients over
        all of their inputs at once (in the order the engine ran them)."""
        task = torch._C._current_graph_task_id()  # a pass may run inside another (reentrant backward)
        state = self._passes.get(task)
        if state is None:
            live = [n for n in (r() for r in self._nodes) if n is not None]
            self._nodes = [weakref.ref(n) for n in live]
            state = self._passes[task] = [sum(1 for n in live if torch._C._will_engine_execute_node(n)), []]
        state[1].append((x, gy))
        if len(state[1]) < state[0]:
            return None, None
        del self._passes[task]
        xs, gys = zip(*state[1])
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        gy = gys[0] if len(gys) == 1 else torch.cat(gys)
        return _wgrad(gy, x, w)


#: batch_wgrad counts a module's nodes in the running backward pass with these (torch >= 2.0);
#: without them the weight gradients are computed per call
_CAN_BATCH = hasattr(torch._C, "_current_graph_task_id") and hasattr(torch._C, "_will_engine_execute_node")


class _Conv3x3Fn(torch.autograd.Function):
    """conv2d(x, W, b, padding=1) with a chosen cuDNN entry point for the forward
    product and for the input gradient, and the weight gradient computed now or, with
    ``batch_wgrad``, once for all of the module's calls (``Conv3x3._batched_wgrad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, route, conv):
        ctx.save_for_backward(x, weight)
        ctx.route, ctx.conv = route, conv
        ctx.batched = conv.batch_wgrad and _CAN_BATCH
        if ctx.batched:
            conv._track(ctx)
        if route[0] == "tconv":
            return F.conv_transpose2d(x, conv.flipped(weight), bias, padding=1)
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        conv = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and ctx.route[1] == "conv":
            gx = F.conv2d(gy, conv.flipped(w), None, padding=1)
        elif ctx.needs_input_grad[0]:
            # cuDNN's own input gradient; with the weight gradient in the same call, as autograd's
            # backward of conv2d makes it
            mask = [True, not ctx.batched, not ctx.batched]
            gx, gw, gb = torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], *_CONV_ARGS, mask)
        if ctx.batched:
            gw, gb = conv._batched_wgrad(x, gy, w)
        elif gw is None:
            gw, gb = _wgrad(gy, x, w)
        return gx, gw, gb, None, None


def _wgrad(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients of conv2d(x, w, b, padding=1) for the output gradient ``gy``."""
    _, gw, gb = torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]], *_CONV_ARGS, [False, True, True])
    return gw, gb


class PredNetLayer(nn.Module):
    """Parameters of one level: its ConvLSTM, its prediction conv, the conv that
    makes the next level's input, and (chainer-lineage) the peepholes."""

    def __init__(self, *, a_ch: int, r_ch: int, r_up_ch: int, a_next_ch: int | None,
                 peephole_hw: tuple[int, int] | None):
        super().__init__()
        self.a_ch, self.r_ch = a_ch, r_ch
        if peephole_hw is not None:
            h, w = peephole_hw
            self.peephole_i = nn.Parameter(torch.empty(r_ch, h, w))
            self.peephole_f = nn.Parameter(torch.empty(r_ch, h, w))
            self.peephole_o = nn.Parameter(torch.empty(r_ch, h, w))
        self.has_peepholes = peephole_hw is not None
        self.lstm = Conv3x3(2 * a_ch + r_ch + r_up_ch, 4 * r_ch)
        self.conv_p = Conv3x3(r_ch, a_ch)
        self.conv_a = Conv3x3(2 * a_ch, a_next_ch) if a_next_ch is not None else None


class State(NamedTuple):
    """Recurrent state carried between steps (one tensor per layer in each list).

    ``carry`` holds P (chainer-lineage: the predictions for the next frame) or
    E (lotter: the last step's errors)."""

    r: list
    c: list
    carry: list

    def detach(self) -> "State":
        return State([t.detach() for t in self.r], [t.detach() for t in self.c], [t.detach() for t in self.carry])


class PredNetOutput(NamedTuple):
    #: P_0 for every step: chainer-lineage the prediction of x_{t+1}; lotter of x_t
    predictions: list
    #: E_l for every step (a list of L tensors per step); lotter's loss reads these
    errors: list
    #: state after the last step (None when ``full_last_step=False`` cut it short)
    state: State | None


class PredNet(nn.Module):
    """See the module docstring. ``forward(frames, state)`` runs the recurrence
    over ``frames`` of shape (B, T, C, H, W)."""

    def __init__(self, *, variant: str = "chainer-lineage", channels=(3, 48, 96, 192), r_channels=None,
                 height: int = 120, width: int = 160):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"prednet variant {variant!r} unknown; use one of {list(VARIANTS)}")
        channels = [int(c) for c in channels]
        r_channels = [int(c) for c in (r_channels if r_channels is not None else channels)]
        nl = len(channels)
        if nl < 1 or len(r_channels) != nl:
            raise ValueError(f"prednet channels {channels} / r_channels {r_channels}: need one entry per layer")
        scale = 2 ** (nl - 1)
        if height % scale or width % scale:
            raise ValueError(
                f"prednet: height {height} and width {width} must be divisible by 2**(layers-1) = {scale} "
                f"(each layer halves the image); pick e.g. {height - height % scale}x{width - width % scale}"
            )
        self.variant, self.channels, self.r_channels = variant, channels, r_channels
        self.height, self.width = int(height), int(width)
        self.peepholes = variant == "chainer-lineage"
        self.fuse = True  # on CUDA: the lotter cell and the error units as fused kernels, eager's bits (fused.py)
        self.layers = nn.ModuleList(
            PredNetLayer(
                a_ch=channels[l],
                r_ch=r_channels[l],
                r_up_ch=r_channels[l + 1] if l + 1 < nl else 0,
                a_next_ch=channels[l + 1] if l + 1 < nl else None,
                peephole_hw=(height >> l, width >> l) if self.peepholes else None,
            )
            for l in range(nl)
        )
        self.set_batch_wgrad(variant == "lotter")

    def set_conv_routes(self, routes: str | dict = "auto") -> "PredNet":
        """``"plain"``: conv2d and autograd's own backward everywhere. ``"auto"``
        (the default): the measured table ``CUDNN_ROUTES`` on Hopper GPUs with
        cuDNN on. A dict: that table, on any CUDA GPU with cuDNN on."""
        for m in self.modules():
            if isinstance(m, Conv3x3):
                m.routes = routes
        return self

    def set_batch_wgrad(self, on: bool = True) -> "PredNet":
        """Compute each convolution's weight and bias gradients once per backward pass over all
        time steps (``True``; the lotter variant's default) or once per step, summed by the
        autograd engine (``False``; chainer-lineage's default, as Chainer's backward sums them).
        The same gradient up to the order of summation (``Conv3x3``, docs/prednet.md)."""
        for m in self.modules():
            if isinstance(m, Conv3x3):
                m.batch_wgrad = bool(on)
        return self

    def set_fused(self, on: bool = True) -> "PredNet":
        """On a CUDA GPU, the lotter cell's and (both variants) the error units' elementwise operations
        as one kernel each way (``fused.py``; the same bits as eager, checked on each device before
        first use). ``False``: eager's kernels everywhere."""
        self.fuse = bool(on)
        return self

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- initial weights -------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Set every parameter from a private CPU generator seeded with ``seed``.

        Parameters are drawn one after another in ``named_parameters()`` order.
        chainer-lineage: Chainer's default for ``Convolution2D`` (LeCunNormal:
        N(0, 1/fan_in), fan_in = C_in*3*3), zero biases; peepholes
        N(0, 1/(C*H*W)) (our choice: small, so the cell starts near a plain
        ConvLSTM). lotter: Keras ``glorot_uniform`` (U(-a, a), a =
        sqrt(6/(fan_in + fan_out)), fan = channels*3*3, fan_out per gate block:
        Lotter has four separate gate convs), zero biases.
        The global RNG is neither read nor advanced.
        """
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif leaf.startswith("peephole_"):
                std = 1.0 / math.sqrt(p.numel())
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif self.variant == "chainer-lineage":
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(1.0 / fan_in))
            else:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                out = p.shape[0] // 4 if name.endswith("lstm.weight") else p.shape[0]
                fan_out = out * p.shape[2] * p.shape[3]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)

    # -- state -----------------------------------------------------------------------
    def zero_state(self, x: torch.Tensor) -> State:
        """All-zero state for a batch like ``x`` (B, C, H, W): same device and
        dtype; channels_last when the model's weights are (``model.to(
        memory_format=torch.channels_last)``), so every conv sees one layout."""
        b, _, h, w = x.shape
        wt = self.layers[0].lstm.weight
        fmt = torch.channels_last if (not wt.is_contiguous() and wt.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format

        def z(c, l):
            return torch.zeros((b, c, h >> l, w >> l), device=x.device, dtype=x.dtype).contiguous(memory_format=fmt)

        r = [z(rc, l) for l, rc in enumerate(self.r_channels)]
        c = [z(rc, l) for l, rc in enumerate(self.r_channels)]
        if self.variant == "chainer-lineage":
            carry = [z(ac, l) for l, ac in enumerate(self.channels)]
        else:
            carry = [z(2 * ac, l) for l, ac in enumerate(self.channels)]
        return State(r, c, carry)

    # -- the two halves of a step ---------------------------------------------------
    def _lstm(self, layer: PredNetLayer, x: torch.Tensor, c_prev: torch.Tensor):
        z = layer.lstm(x)
        n = layer.r_ch
        if layer.has_peepholes:
            zi, zf, zo, zg = z.split(n, 1)
            i = torch.sigmoid(torch.addcmul(zi, layer.peephole_i, c_prev))
            f = torch.sigmoid(torch.addcmul(zf, layer.peephole_f, c_prev))
            c = torch.addcmul(f * c_prev, i, torch.tanh(zg))
            o = torch.sigmoid(torch.addcmul(zo, layer.peephole_o, c))
            return o * torch.tanh(c), c
        # lotter: eager's kernels, or on a CUDA GPU the fused ones computing the same bits (fused.py)
        if self.fuse and fused.usable(z, c_prev):
            return fused.lotter_cell(z, c_prev, n)
        return fused.eager_cell(z, c_prev, n)

    def _top_down(self, e: list, r_prev: list, c_prev: list):
        nl = self.num_layers
        r, c, p = [None] * nl, [None] * nl, [None] * nl
        for l in reversed(range(nl)):
            layer = self.layers[l]
            if l == nl - 1:
                x = torch.cat([e[l], r_prev[l]], 1)
            else:
                up = F.interpolate(r[l + 1], scale_factor=2, mode="nearest")
                x = torch.cat([e[l], r_prev[l], up], 1)
            r[l], c[l] = self._lstm(layer, x, c_prev[l])
            q = layer.conv_p(r[l])
            p[l] = F.hardtanh(q, 0.0, 1.0) if l == 0 else torch.relu(q)
        return r, c, p

    def _bottom_up(self, x: torch.Tensor, p: list, upto: int):
        e = [None] * self.num_layers
        a = x
        for l in range(upto):
            e[l] = fused.errors(a, p[l]) if self.fuse and fused.usable(p[l], a) else fused.eager_errors(a, p[l])
            if l + 1 < upto:
                a = F.max_pool2d(torch.relu(self.layers[l].conv_a(e[l])), 2)
        return e

    # -- the recurrence ---------------------------------------------------------------
    def forward(self, frames: torch.Tensor, state: State | None = None, *, full_last_step: bool = True) -> PredNetOutput:
        """Run over ``frames`` (B, T, C, H, W) from ``state`` (zeros if None).

        ``full_last_step=False`` (lotter only) skips the last step's bottom-up
        pass above layer 0, which nothing reads when only E_0 enters the loss and
        the state is not carried on; the returned state is then None.
        """
        if frames.dim() != 5:
            raise ValueError(f"prednet expects frames of shape (B, T, C, H, W), got {tuple(frames.shape)}")
        T = frames.shape[1]
        if state is None:
            state = self.zero_state(frames[:, 0])
        r, c, carry = state
        preds, errs = [], []
        nl = self.num_layers
        if self.variant == "chainer-lineage":
            p = carry
            for t in range(T):
                e = self._bottom_up(frames[:, t], p, nl)
                r, c, p = self._top_down(e, r, c)
                preds.append(p[0])
                errs.append(e)
            return PredNetOutput(preds, errs, State(r, c, p))
        e = carry
        for t in range(T):
            r, c, p = self._top_down(e, r, c)
            upto = nl if (full_last_step or t < T - 1) else 1
            e = self._bottom_up(frames[:, t], p, upto)
            preds.append(p[0])
            errs.append(e)
        return PredNetOutput(preds, errs, State(r, c, e) if full_last_step else None)


def build_prednet(*, variant: str, channels, r_channels=None, height: int, width: int, init_seed: int) -> PredNet:
    """A PredNet on CPU with weights drawn from ``init_seed`` alone."""
    model = PredNet(variant=variant, channels=channels, r_channels=r_channels, height=height, width=width)
    model.init_weights(init_seed)
    return model
