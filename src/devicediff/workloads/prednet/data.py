"""PredNet's data, one numpy recipe for both frameworks (the PyTorch workload and its Chainer
twin call it with the same parameters, so their arrays are the same bits).

Standard library and numpy only (the Chainer environment imports it).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def prednet_data(
    data: str,
    *,
    sequence_length: int,
    height: int,
    width: int,
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
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(train, test, info)``: float32 sequences (N, T, C, H, W) in [0, 1].

    ``data = "moving_mnist"``: Moving MNIST (``devicediff.data.moving_mnist``), train digits from
    MNIST train and held-out digits from MNIST test (no digit image is shared), 1000 training
    sequences unless ``sequences`` says otherwise and a tenth as many held out. Anything else is a
    video (``devicediff.data.video``: "carphone", "bikes" or a path), cut into sequences.
    """
    info: dict[str, Any] = {"source": data}
    if data == "moving_mnist":
        from devicediff.data.moving_mnist import moving_mnist

        n_train = int(sequences if sequences is not None else 1000)
        n_test = int(test_sequences if test_sequences is not None else max(1, n_train // 10))
        gen = dict(frames=int(sequence_length), canvas=int(mnist_canvas), digits=int(mnist_digits),
                   size=(int(height), int(width)), mnist_root=mnist_root)
        train = moving_mnist(n_train, seed=int(dataset_seed), split="train", **gen)
        test = moving_mnist(n_test, seed=int(dataset_seed) + 1_000_003, split="test", **gen)
        if color == "rgb":
            train, test = np.repeat(train, 3, axis=2), np.repeat(test, 3, axis=2)
        info.update(canvas=int(mnist_canvas), digits=int(mnist_digits), split="MNIST train/test digits")
        return train, test, info
    from devicediff.data.video import video_sequences

    train, test, vinfo = video_sequences(data, height=int(height), width=int(width), length=int(sequence_length),
                                         color=color, test_fraction=float(test_fraction), scene_cuts=scene_cuts, fit=fit)
    info.update(vinfo)
    if sequences is not None:
        train = train[: int(sequences)]
    if test_sequences is not None:
        test = test[: int(test_sequences)]
    return train, test, info


#: the workload parameters that feed the recipe (besides the frame geometry)
DATA_PARAMS = ("sequences", "test_sequences", "dataset_seed", "color", "fit", "test_fraction", "scene_cuts",
               "mnist_canvas", "mnist_digits", "mnist_root")
