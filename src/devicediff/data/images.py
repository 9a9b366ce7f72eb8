"""A user's labelled images, offline: an ``.npz`` of arrays or a folder of class subfolders.

Sources (``load_labelled_images``):

* an ``.npz`` file with arrays ``x`` and ``y``: ``x`` of shape (N, H, W) or (N, C, H, W)
  (channels-last (N, H, W, C) with C in {1, 3, 4} is recognised and transposed), uint8
  0..255 (scaled to [0, 1]) or float (kept as given, must be finite); ``y`` of N integer
  labels (any integers: they are mapped to 0..K-1 in sorted order, ``classes`` keeps the
  originals);
* a folder with one subfolder per class (the subfolder names, sorted, are the classes),
  each holding image files (``.png``, ``.jpg``, ``.bmp``, ``.gif``, ``.tif``, ``.webp``,
  ``.pgm``/``.ppm``), read with Pillow. All images grey -> 1 channel, else RGB. They must
  share one size unless ``image_size`` resizes every one to ``image_size`` x ``image_size``.

Images come back as float32 (N, C, H, W), labels as int64 (N,), both in a fixed order
(files sorted by name), so every run of every config reads the same bits. ``split`` then
divides them into train and held-out sets, stratified by class, from a seeded numpy
generator: deterministic and independent of the run's seeds.

Numpy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from devicediff.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
PILLOW_HINT = "pip install pillow"


@dataclass
class LabelledImages:
    """Images ``x`` float32 (N, C, H, W), labels ``y`` int64 (N,) in 0..K-1, ``classes`` their names."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _labels(y_raw: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    y_raw = np.asarray(y_raw)
    if y_raw.ndim != 1:
        raise DataError(f"{where}: y must be one label per image (shape (N,)), got shape {y_raw.shape}")
    if y_raw.dtype.kind == "f":
        if not np.all(np.isfinite(y_raw)) or not np.all(y_raw == np.round(y_raw)):
            raise DataError(f"{where}: y must hold integer class labels, got non-integer floats")
        y_raw = y_raw.astype(np.int64)
    elif y_raw.dtype.kind not in "iub":
        raise DataError(f"{where}: y must hold integer class labels, got dtype {y_raw.dtype}")
    values, y = np.unique(y_raw.astype(np.int64), return_inverse=True)
    if len(values) < 2:
        raise DataError(f"{where}: y has {len(values)} distinct class(es); a classifier needs at least 2")
    return y.astype(np.int64).ravel(), [str(int(v)) for v in values]


def _to_float(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind in "iu":
        raise DataError(f"{where}: x of dtype {x.dtype} is ambiguous; use uint8 (0..255) or float")
    if x.dtype.kind != "f":
        raise DataError(f"{where}: x must be uint8 or float, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: x holds NaN or infinite values")
    return x


def load_npz(path: str | Path) -> LabelledImages:
    """``x`` and ``y`` from an ``.npz`` file (see the module docstring for the layouts)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if not {"x", "y"} <= names:
                raise DataError(f"{path}: an .npz for the classifier needs arrays 'x' (images) and 'y' (labels); "
                                f"it has {sorted(names)}")
            x, y_raw = f["x"], f["y"]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    layout = "NCHW"
    if x.ndim == 3:
        x, layout = x[:, None], "NHW"
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            x, layout = np.transpose(x, (0, 3, 1, 2)), "NHWC"
    else:
        raise DataError(f"{path}: x must have shape (N, H, W) or (N, C, H, W), got {x.shape}")
    if len(x) != len(y_raw):
        raise DataError(f"{path}: x has {len(x)} images but y has {len(y_raw)} labels")
    y, classes = _labels(y_raw, str(path))
    x = np.ascontiguousarray(_to_float(x, str(path)))
    return LabelledImages(x, y, classes, {"source": str(path), "format": "npz", "layout": layout})


def _pillow():
    if find_spec("PIL") is None:
        raise DataError(f"reading an image folder needs Pillow; {PILLOW_HINT} (or save the images as an .npz)")
    from PIL import Image

    return Image


def load_image_folder(path: str | Path, image_size: int | None = None) -> LabelledImages:
    """Images from ``path/<class>/<file>``, classes and files sorted by name."""
    root = Path(path)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root}: an image folder needs one subfolder per class (at least 2); found {len(class_dirs)}")
    files: list[tuple[Path, int]] = []
    for k, d in enumerate(class_dirs):
        own = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.startswith("."))
        if not own:
            raise DataError(f"{d}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, k) for p in own]
    Image = _pillow()
    images = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                img = im.copy()
        except Exception as e:  # PIL.UnidentifiedImageError, OSError
            raise DataError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
        images.append(img)
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    mode = "L" if grey else "RGB"
    arrays, size0 = [], None
    for (p, _), im in zip(files, images):
        im = im.convert(mode)
        if image_size is not None:
            im = im.resize((image_size, image_size), Image.BILINEAR)
        if size0 is None:
            size0 = (im.size, p)
        elif im.size != size0[0]:
            raise DataError(f"{root}: images differ in size ({size0[1].name} is {size0[0][0]}x{size0[0][1]}, "
                            f"{p.name} is {im.size[0]}x{im.size[1]}); set image_size to resize them")
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1)))
    x = np.stack(arrays).astype(np.float32) / np.float32(255.0)
    y = np.array([k for _, k in files], dtype=np.int64)
    return LabelledImages(np.ascontiguousarray(x), y, [d.name for d in class_dirs],
                          {"source": str(root), "format": "folder", "mode": mode})


def load_labelled_images(path: str | Path, image_size: int | None = None) -> LabelledImages:
    """An ``.npz`` file or a folder of class subfolders (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data {str(path)!r} does not exist; give 'mnist', an .npz file or a folder of class subfolders")
    if p.is_dir():
        return load_image_folder(p, image_size)
    if p.suffix.lower() == ".npz":
        if image_size is not None:
            raise DataError(f"{p}: image_size resizes folder images only; resize the arrays in the .npz instead")
        return load_npz(p)
    raise DataError(f"data {str(path)!r}: unsupported file; give an .npz with x and y, or a folder of class subfolders")


def split(y: np.ndarray, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices (sorted int64 arrays), stratified by class.

    Within each class the examples are permuted by ``default_rng([seed, class])`` and the first
    ``round(eval_fraction * n_class)`` are held out, at least one when the class has 2 or more
    examples, never all of them. Deterministic: the same ``y``, fraction and seed give the same split."""
    y = np.asarray(y)
    train, held = [], []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        idx = idx[np.random.default_rng([int(seed), int(k)]).permutation(len(idx))]
        n_eval = int(round(eval_fraction * len(idx)))
        if len(idx) >= 2:
            n_eval = min(max(n_eval, 1), len(idx) - 1)
        else:
            n_eval = 0
        held.append(idx[:n_eval])
        train.append(idx[n_eval:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)
