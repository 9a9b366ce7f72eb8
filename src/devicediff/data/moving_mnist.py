"""Moving MNIST, generated from the real MNIST digits, seeded.

The recipe of Srivastava, Mansimov & Salakhutdinov 2015 ("Unsupervised Learning
of Video Representations using LSTMs", §3.1 and their generator's settings):
two 28x28 digits bounce inside a 64x64 canvas; each digit starts at a uniform
position in the free range, moves in a direction drawn uniformly from
[0, 2π) with a step of 0.1 of the free range per frame, and bounces off the
walls (position clamped to the wall, velocity component flipped); digits are
combined by a pixel-wise max; 20 frames.

Numpy only (no torch), so any framework's environment can import it.
Everything is drawn from one ``numpy.random.Generator`` seeded by the caller,
in a fixed order: digit indices, start positions, directions.
"""

from __future__ import annotations

import math

import numpy as np

from devicediff.data.mnist import DataError, load_mnist
from devicediff.data.video import resize_frames

DIGIT = 28


def trajectories(rng: np.random.Generator, n: int, digits: int, frames: int, step: float = 0.1) -> np.ndarray:
    """Positions in the unit square, shape (n, digits, frames, 2) as (y, x).

    Frame 0 is the start position; after each frame the position moves by
    ``step`` along the direction and bounces off the walls.
    """
    pos = rng.random((n, digits, 2))
    theta = rng.random((n, digits)) * 2 * math.pi
    vel = np.stack([np.sin(theta), np.cos(theta)], axis=-1) * step
    out = np.empty((n, digits, frames, 2))
    for t in range(frames):
        out[:, :, t] = pos
        pos = pos + vel
        low, high = pos < 0.0, pos > 1.0
        pos = np.where(low, 0.0, np.where(high, 1.0, pos))
        vel = np.where(low | high, -vel, vel)
    return out


def moving_mnist(
    n: int,
    *,
    seed: int,
    frames: int = 20,
    canvas: int = 64,
    digits: int = 2,
    step: float = 0.1,
    split: str = "train",
    size: tuple[int, int] | None = None,
    mnist_root: str | None = None,
) -> np.ndarray:
    """``n`` sequences, float32 of shape (n, frames, 1, H, W) in [0, 1).

    Digits come from MNIST ``split`` (train and test sequences should use
    different splits so no digit image is shared). ``size`` = (H, W) resizes
    the ``canvas`` x ``canvas`` frames (area averaging when shrinking).
    """
    if canvas < DIGIT:
        raise DataError(f"moving_mnist: canvas {canvas} is smaller than a digit ({DIGIT}); use canvas >= {DIGIT}")
    if n < 1 or frames < 1 or digits < 1:
        raise DataError(f"moving_mnist: need n, frames and digits >= 1, got {n}, {frames}, {digits}")
    images, _ = load_mnist(split, mnist_root)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(images), size=(n, digits))
    free = canvas - DIGIT
    pos = trajectories(rng, n, digits, frames, step)
    corner = np.floor(pos * free).astype(np.int64)  # (n, digits, frames, 2), each in [0, free]
    out = np.zeros((n, frames, 1, canvas, canvas), dtype=np.float32)
    for i in range(n):
        for d in range(digits):
            img = images[which[i, d]]
            for t in range(frames):
                y, x = corner[i, d, t]
                win = out[i, t, 0, y : y + DIGIT, x : x + DIGIT]
                np.maximum(win, img, out=win)
    if size is not None and tuple(size) != (canvas, canvas):
        out = np.stack([resize_frames(seq, size[0], size[1], fit="stretch") for seq in out])
    return out
