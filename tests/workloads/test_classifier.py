"""The classifier workload: build, determinism, batches, a few training steps, evaluation keys and
ranges, ECE, npz and image-folder data, bad parameters, artifacts. Tiny sizes, one CPU thread:
a few seconds in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devicediff.data.images import load_labelled_images, split
from devicediff.errors import DataError, ParamError
from devicediff.spec import Batch, epoch_order
from devicediff.workloads.classifier import WORKLOAD_CLASS, Classifier, expected_calibration_error, make


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SMALL = dict(train_size=256, eval_size=200, batch_size=32, channels=[4, 8], hidden=16)


@pytest.fixture(scope="module")
def mnist_wl():
    return make(**SMALL)


def _train(wl, steps: int, seed: int = 0):
    model = wl.build_model(seed)
    opt = wl.make_optimizer(model)
    model.train()
    for i, b in enumerate(wl.train_batches(seed, 0)):
        if i == steps:
            break
        loss = wl.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _evaluate(wl, model):
    model.eval()
    with torch.no_grad():
        return wl.evaluate(model, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# model and batches


def test_api(mnist_wl):
    assert WORKLOAD_CLASS is Classifier and isinstance(mnist_wl, Classifier)
    assert Classifier.name == "classifier"
    assert Classifier.primary_metrics == ("eval_accuracy",)
    d = mnist_wl.describe()
    assert d["arch"] == "cnn" and d["num_classes"] == 10 and d["input_shape"] == [1, 28, 28]
    assert d["train_size"] == 256 and d["eval_size"] == 200 and d["dropout"] == 0.0


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_build_depends_on_init_seed_only(arch):
    wl = make(arch=arch, **SMALL)
    torch.manual_seed(123)
    a = wl.build_model(7).state_dict()
    torch.manual_seed(456)  # the global generator must not matter
    b = wl.build_model(7).state_dict()
    c = wl.build_model(8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
    assert all(not t.is_cuda for t in a.values())


def test_batches_follow_epoch_order(mnist_wl):
    batches = list(mnist_wl.train_batches(3, 1))
    assert len(batches) == mnist_wl.steps_per_epoch() == 256 // 32
    order = epoch_order(3, 1, 256)
    x, y, mask = batches[1].data
    assert isinstance(batches[1], Batch) and mask is None
    assert torch.equal(x, mnist_wl.train_x[torch.from_numpy(order[32:64])])
    assert torch.equal(y, mnist_wl.train_y[torch.from_numpy(order[32:64])])
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64


def test_dropout_masks_from_cpu_and_data_seed():
    wl = make(dropout=0.5, **SMALL)
    m1 = [b.data[2] for b in wl.train_batches(0, 0)]
    m2 = [b.data[2] for b in wl.train_batches(0, 0)]
    m3 = [b.data[2] for b in wl.train_batches(1, 0)]
    assert m1[0].shape == (32, 16)
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))
    assert not torch.equal(m1[0], m3[0]) and not torch.equal(m1[0], m1[1])
    assert set(torch.unique(m1[0]).tolist()) == {0.0, 2.0}
    assert "dropout_masks" in wl.describe()
    # the model in eval mode ignores masks; in training they change the output
    model = wl.build_model(0)
    x = wl.train_x[:32]
    model.eval()
    assert torch.equal(model(x, m1[0]), model(x))
    model.train()
    assert not torch.equal(model(x, m1[0]), model(x))


def test_loss_is_cross_entropy(mnist_wl):
    model = mnist_wl.build_model(0)
    b = next(iter(mnist_wl.train_batches(0, 0)))
    x, y, _ = b.data
    expect = torch.nn.functional.cross_entropy(model(x), y)
    assert mnist_wl.loss(model, b).item() == pytest.approx(expect.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# training and evaluation


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_train_and_evaluate(arch):
    wl = make(arch=arch, **SMALL)
    before = _evaluate(wl, wl.build_model(0))
    model = _train(wl, 8)
    after = _evaluate(wl, model)
    keys = {"eval_loss", "eval_accuracy", "eval_ece"} | {f"eval_acc_class_{k}" for k in range(10)}
    assert set(after) == keys  # 200 validation digits hold every class
    for m in (before, after):
        assert all(np.isfinite(v) for v in m.values())
        assert 0.0 <= m["eval_accuracy"] <= 1.0 and 0.0 <= m["eval_ece"] <= 1.0 and m["eval_loss"] > 0
        assert all(0.0 <= m[f"eval_acc_class_{k}"] <= 1.0 for k in range(10))
    if arch == "cnn":
        assert after["eval_loss"] < before["eval_loss"]
    # accuracy is the class-size-weighted mean of the per-class accuracies
    counts = np.bincount(wl.eval_y, minlength=10)
    weighted = sum(after[f"eval_acc_class_{k}"] * counts[k] for k in range(10)) / counts.sum()
    assert weighted == pytest.approx(after["eval_accuracy"])


def test_ece_hand_values():
    # all confidence 1.0 and right: 0; all confidence 0.6 (bin (8/15, 9/15]) and half right: |0.5 - 0.6|
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    probs = np.array([[0.6, 0.4]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.1)
    # two bins: conf 0.9 all right (gap 0.1, weight 1/2), conf 0.55 all wrong (gap 0.55, weight 1/2)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.55, 0.45], [0.55, 0.45]])
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.55)


def test_artifacts(tmp_path, mnist_wl):
    model = _train(mnist_wl, 2)
    arts = mnist_wl.artifacts(model, torch.device("cpu"), tmp_path)
    assert model.training  # artifacts() leaves the mode as it found it
    assert set(arts) == {"predictions", "probs", "labels"}
    pred, probs, labels = (np.load(arts[k]) for k in ("predictions", "probs", "labels"))
    assert arts["predictions"].name == "predictions.npy" and arts["probs"].name == "probs.npy"
    assert pred.dtype == np.int16 and pred.shape == (200,)
    assert probs.dtype == np.float16 and probs.shape == (200, 10)
    assert np.allclose(probs.astype(np.float64).sum(axis=1), 1.0, atol=1e-2)
    assert np.array_equal(labels, mnist_wl.eval_y)
    metrics = _evaluate(mnist_wl, model)
    assert np.mean(pred == labels) == pytest.approx(metrics["eval_accuracy"])


# --------------------------------------------------------------------------------------------------
# a user's data


def _npz(tmp_path, x, y, name="d.npz"):
    p = tmp_path / name
    np.savez(p, x=x, y=y)
    return p


def test_npz_layouts_and_split(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([3, 7, 9], 20)
    x = rng.integers(0, 256, size=(60, 12, 12), dtype=np.uint8)
    imgs = load_labelled_images(_npz(tmp_path, x, y))
    assert imgs.x.shape == (60, 1, 12, 12) and imgs.x.dtype == np.float32 and imgs.x.max() <= 1.0
    assert imgs.classes == ["3", "7", "9"] and set(imgs.y) == {0, 1, 2}
    nhwc = load_labelled_images(_npz(tmp_path, rng.random((60, 12, 12, 3)), y, "c.npz"))
    assert nhwc.x.shape == (60, 3, 12, 12) and nhwc.info["layout"] == "NHWC"
    tr, te = split(imgs.y, 0.25, seed=0)
    assert len(te) == 15 and np.bincount(imgs.y[te]).tolist() == [5, 5, 5]  # stratified
    assert not set(tr) & set(te) and len(tr) + len(te) == 60
    tr2, te2 = split(imgs.y, 0.25, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)  # deterministic
    assert not np.array_equal(te, split(imgs.y, 0.25, seed=1)[1])


def test_npz_workload_trains(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = rng.random((90, 1, 8, 8)).astype(np.float32)
    x[np.arange(90), 0, y, y] += 3.0  # a learnable signal
    wl = make(data=str(_npz(tmp_path, x, y)), batch_size=16, channels=[4], hidden=8, eval_fraction=0.2)
    assert wl.describe()["data"]["format"] == "npz" and wl.num_classes == 3
    assert len(wl.eval_x) == 18 and len(wl.train_x) == 72
    m = _evaluate(wl, _train(wl, 4))
    assert {f"eval_acc_class_{k}" for k in range(3)} <= set(m)
    for arch in ("resnet",):
        assert np.isfinite(_evaluate(make(data=str(tmp_path / "d.npz"), arch=arch, batch_size=16, channels=[4]),
                                     _train(make(data=str(tmp_path / "d.npz"), arch=arch, batch_size=16,
                                                 channels=[4]), 2))["eval_loss"])


def test_image_folder(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            PIL.fromarray(rng.integers(0, 256, size=(10, 10), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    imgs = load_labelled_images(tmp_path / "imgs")
    assert imgs.classes == ["cat", "dog"] and imgs.x.shape == (12, 1, 10, 10) and imgs.info["mode"] == "L"
    PIL.fromarray(rng.integers(0, 256, size=(14, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "rgb.png")
    with pytest.raises(DataError, match="differ in size"):
        load_labelled_images(tmp_path / "imgs")
    resized = load_labelled_images(tmp_path / "imgs", image_size=8)
    assert resized.x.shape == (13, 3, 8, 8) and resized.info["mode"] == "RGB"
    wl = make(data=str(tmp_path / "imgs"), image_size=8, batch_size=4, channels=[4], hidden=8, eval_fraction=0.3)
    assert wl.describe()["classes"] == ["cat", "dog"]
    assert np.isfinite(_evaluate(wl, _train(wl, 2))["eval_loss"])


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    import devicediff.data.images as images

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(b"")
    monkeypatch.setattr(images, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install pillow"):
        load_labelled_images(tmp_path)


# --------------------------------------------------------------------------------------------------
# errors: one line each


@pytest.mark.parametrize("params, match", [
    ({"lr": 0.0}, "classifier.lr must be > 0"),
    ({"lr": -1e-3}, "classifier.lr"),
    ({"batch_size": 0}, "classifier.batch_size must be >= 1"),
    ({"arch": "vit"}, "classifier.arch 'vit' unknown"),
    ({"dropout": 1.0}, "classifier.dropout"),
    ({"channels": []}, "classifier.channels"),
    ({"optimizer": "lbfgs"}, "classifier.optimizer"),
    ({"eval_fraction": 1.5}, "classifier.eval_fraction"),
    ({"eval_split": "train"}, "classifier.eval_split"),
    ({"train_size": 0}, "classifier.train_size"),
])
def test_bad_params(params, match):
    with pytest.raises(ParamError, match=match) as e:
        make(**params)
    assert "\n" not in str(e.value)


def test_bad_data(tmp_path):
    cases = []
    cases.append(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8)))
    cases.append(str(tmp_path / "nolabels.npz"))
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((4, 8, 8)), y=np.zeros(5, dtype=int))
    cases.append(str(tmp_path / "mismatch.npz"))
    np.savez(tmp_path / "oneclass.npz", x=np.zeros((4, 8, 8)), y=np.zeros(4, dtype=int))
    cases.append(str(tmp_path / "oneclass.npz"))
    np.savez(tmp_path / "floaty.npz", x=np.zeros((4, 8, 8)), y=np.array([0, 1, 0.5, 1]))
    cases.append(str(tmp_path / "floaty.npz"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    cases.append(str(tmp_path / "garbage.npz"))
    (tmp_path / "table.csv").write_text("1,2\n")
    cases.append(str(tmp_path / "table.csv"))
    (tmp_path / "empty" / "only").mkdir(parents=True)
    cases.append(str(tmp_path / "empty"))
    for data in cases:
        with pytest.raises(DataError) as e:
            make(data=data, batch_size=2, channels=[2])
        assert "\n" not in str(e.value), data
    np.savez(tmp_path / "small.npz", x=np.zeros((10, 8, 8)), y=np.repeat([0, 1], 5))
    with pytest.raises(DataError, match="fewer than batch_size"):
        make(data=str(tmp_path / "small.npz"), batch_size=64)
    with pytest.raises(DataError, match="too small"):
        make(data=str(tmp_path / "small.npz"), batch_size=2, channels=[2, 2, 2, 2])


def test_held_out_indices_name_the_evaluated_inputs(tmp_path, mnist_wl):
    """Row i of the held-out metrics and of predictions.npy is input held_out_indices(params)[i] of
    the source data, computed without building the workload."""
    from devicediff.data.mnist import load_mnist
    from devicediff.workloads.classifier import held_out_indices

    idx = held_out_indices(SMALL)
    xe, ye = load_mnist(SMALL.get("eval_split", "valid"))
    assert len(idx) == len(mnist_wl.eval_y)
    assert np.array_equal(ye[idx], mnist_wl.eval_y)
    assert np.array_equal(xe[idx][:, None], mnist_wl.eval_x.numpy())
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 30)
    x = rng.random((90, 1, 8, 8)).astype(np.float32)
    params = dict(data=str(_npz(tmp_path, x, y)), batch_size=16, channels=[4], hidden=8, eval_fraction=0.2,
                  split_seed=3, eval_size=10)
    wl = make(**params)
    idx = held_out_indices({"name": "classifier", **params})
    assert len(idx) == 10 and np.array_equal(x[idx], wl.eval_x.numpy()) and np.array_equal(y[idx], wl.eval_y)
    assert wl.describe()["classes"] == ["0", "1", "2"]
