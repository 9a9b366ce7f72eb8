"""The classifier's networks: a small CNN and a small ResNet-style network.

Both end in ``features -> (dropout) -> Linear(num_classes)`` and return logits. Dropout, when
on, multiplies the features by a mask the *workload* draws on the CPU (see
``SharedDropout``), so no layer draws from a device random generator and every config drops
the same units at the same step.

Every layer is chosen to be deterministic-capable on CUDA (``torch.use_deterministic_algorithms``
raises for adaptive pooling's backward): global pooling is a plain mean over H and W.

``init_weights`` sets every parameter from a private CPU ``torch.Generator``, so a model
depends on its init seed alone, never on the global random state.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ARCHS = ("cnn", "resnet")


class SharedDropout(nn.Module):
    """Inverted dropout with a mask given from outside: ``x * mask`` in training, identity in eval.

    The mask (0 or 1/(1-p) per feature, drawn on the CPU from the run's data seed) travels with
    the batch; ``None`` (dropout off, evaluation, or a caller that gives none) leaves ``x`` as is."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training or self.p == 0.0:
            return x
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, mask drawn on CPU by the workload"


class SmallCNN(nn.Module):
    """``len(channels)`` stages of conv3x3 (padding 1) + ReLU + 2x2 max-pool, then
    Linear(hidden) + ReLU, dropout, Linear(num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int,
                 channels: Sequence[int] = (16, 32), hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        convs, c = [], in_channels
        for c_out in channels:
            convs += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = c_out
        self.features = nn.Sequential(*convs)
        h, w = height >> len(channels), width >> len(channels)
        self.fc = nn.Linear(c * h * w, hidden)
        self.dropout = SharedDropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).flatten(1)
        h = torch.relu(self.fc(h))
        return self.head(self.dropout(h, mask))


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic residual block: conv3x3-BN-ReLU-conv3x3-BN plus the input
    (a 1x1 conv + BN projection when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, then one stage per entry of ``channels`` of ``blocks`` basic blocks
    (the first block of every stage after the first halves H and W), global mean pooling,
    dropout, Linear(num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32),
                 blocks: int = 1, dropout: float = 0.0):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        layers, c = [], c0
        for i, c_out in enumerate(channels):
            for j in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*layers)
        self.dropout = SharedDropout(dropout)
        self.head = nn.Linear(c, num_classes)
        self.feature_dim = c

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.blocks(self.stem(x)).mean(dim=(2, 3))  # not AdaptiveAvgPool2d: see the module docstring
        return self.head(self.dropout(h, mask))


def init_weights(model: nn.Module, seed: int) -> None:
    """He-uniform conv and hidden linear weights (bound sqrt(6 / fan_in)), Glorot-uniform for the
    output layer ``head`` (bound sqrt(6 / (fan_in + fan_out))), zero biases, BatchNorm scale 1 and
    shift 0, all from a private CPU generator seeded with ``seed``, in ``named_modules`` order."""
    g = torch.Generator().manual_seed(int(seed))
    head = getattr(model, "head", None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                if m is head:
                    bound = math.sqrt(6.0 / (fan_in + m.weight.shape[0]))
                else:
                    bound = math.sqrt(6.0 / fan_in)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.reset_running_stats()


def build(arch: str, *, in_channels: int, num_classes: int, height: int, width: int, channels: Sequence[int],
          hidden: int, blocks: int, dropout: float, init_seed: int) -> nn.Module:
    """The network named by ``arch``, on CPU, initialised from ``init_seed`` alone."""
    if arch == "cnn":
        model = SmallCNN(in_channels, num_classes, height, width, channels, hidden, dropout)
    elif arch == "resnet":
        model = SmallResNet(in_channels, num_classes, channels, blocks, dropout)
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {list(ARCHS)}")
    init_weights(model, init_seed)
    return model
