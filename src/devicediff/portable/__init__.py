"""Portable randomness: random draws that are the same on every device and in every framework.

``devicediff.portable.philox`` (standard library + numpy) is the generator; ``devicediff.portable.torch``
holds the PyTorch layers (``Dropout``, ``dropout``, ``PortableRandom``, ``make_portable``) and
``devicediff.portable.detect`` the tools that find draws on torch's own generators. The torch names
are importable from here too, loaded on first use, so that importing this package needs no torch.
See docs/randomness.md.
"""

from __future__ import annotations

from devicediff.portable.philox import bernoulli_mask, dropout_np, normal, random_bits, stream_id, uniform

_TORCH_NAMES = {
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Key", "PortableRandom", "PortableReport",
    "PortableFunctional", "attach", "contexts", "dropout", "feature_dropout", "make_portable",
}
_DETECT_NAMES = {"RandomDraw", "RandomOpWatch", "drew", "rng_snapshot"}

__all__ = ["bernoulli_mask", "dropout_np", "normal", "random_bits", "stream_id", "uniform",
           *sorted(_TORCH_NAMES), *sorted(_DETECT_NAMES)]


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from devicediff.portable import torch as _t

        return getattr(_t, name)
    if name in _DETECT_NAMES:
        from devicediff.portable import detect as _d

        return getattr(_d, name)
    raise AttributeError(f"module 'devicediff.portable' has no attribute {name!r}")
