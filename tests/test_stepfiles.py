"""The lockstep step file (devicediff.stepfiles): what every side writes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from devicediff import stepfiles as fmt


def test_roundtrip_keeps_order_dtype_and_shape(tmp_path):
    arrays = {
        "fwd/layers.1": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fwd/layers.0": np.ones(3, np.float32),
        "fwd/layers.0@20:1": np.zeros((1, 2), np.float32),
        "loss/loss": np.float32(0.25),
        "grad/layers.0.weight": np.full((2, 2), -1.5, np.float32),
        "ref64/loss/loss": np.float64(0.25),
        "meta/step": np.int64(3),
        "free/weight/a.b": np.array([True, False]),
    }
    path = fmt.write_step(tmp_path / "d", 3, arrays)
    assert path == tmp_path / "d" / "step00003.npz"
    back = fmt.read_step(path)
    assert list(back) == list(arrays)  # the computation order survives
    assert fmt.step_keys(path) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.asarray(v).shape
        np.testing.assert_array_equal(back[k], v)
    assert not list((tmp_path / "d").glob(".*tmp*")), "the temporary file must be renamed away"


def test_written_files_are_plain_npz(tmp_path):
    """np.load reads what write_step wrote, non-contiguous and empty arrays included."""
    rng = np.random.default_rng(0)
    arrays = {
        "fwd/t": np.arange(12.0).reshape(3, 4).T,  # Fortran-ordered view
        "fwd/s": rng.random((4, 6), dtype=np.float32)[:, ::2],  # strided view
        "weight/empty": np.zeros((0, 5), np.float32),
        "ref64/grad/big": rng.random(300_000),
        "meta/step": np.int64(9),
    }
    path = fmt.write_step(tmp_path, 9, arrays)
    with np.load(path, allow_pickle=False) as z:
        assert z.files == list(arrays)
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype and z[k].shape == v.shape
            np.testing.assert_array_equal(z[k], v)
    np.testing.assert_array_equal(fmt.read_step(path)["fwd/t"], arrays["fwd/t"])


def test_split_key_inverts_key():
    for prefix in (None, "ref64", "rep", "free"):
        for kind, name in (("fwd", "<model>"), ("grad", "layers.0.lstm.weight"), ("fwd", "x@3:1"), ("loss", "loss")):
            assert fmt.split_key(fmt.key(kind, name, prefix)) == (prefix, kind, name)
    assert fmt.split_key("meta/step") == ("meta", "step", "")


def test_iter_kind_selects_by_prefix():
    arrays = {"fwd/a": np.ones(1), "ref64/fwd/a": np.ones(1), "meta/step": np.int64(1), "free/weight/w": np.ones(1)}
    assert [(k, n) for k, n, _ in fmt.iter_kind(arrays)] == [("fwd", "a")]
    assert [(k, n) for k, n, _ in fmt.iter_kind(arrays, "ref64")] == [("fwd", "a")]
    assert [(k, n) for k, n, _ in fmt.iter_kind(arrays, "free")] == [("weight", "w")]


def test_bad_keys_and_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kind/name"):
        fmt.write_step(tmp_path, 1, {"nokind": np.ones(1)})
    with pytest.raises(TypeError, match="numeric"):
        fmt.write_step(tmp_path, 1, {"fwd/x": np.array(["a"])})


def test_format_imports_with_numpy_and_stdlib_only():
    # An old framework's environment (Chainer 7.8, numpy<2, no torch) must be able to import it.
    code = ("import sys, devicediff.stepfiles; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', 'rich', 'scipy', 'matplotlib')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compressed_files_are_read_too(tmp_path):
    # Another framework's worker might write np.savez_compressed: read_step falls back to np.load.
    arrays = {"fwd/a": np.arange(10, dtype=np.float32), "ref64/fwd/a": np.arange(10, dtype=np.float64)}
    path = fmt.step_path(tmp_path, 1)
    np.savez_compressed(path, **arrays)
    back = fmt.read_step(path)
    assert list(back) == list(arrays)
    np.testing.assert_array_equal(back["ref64/fwd/a"], arrays["ref64/fwd/a"])


def test_mapped_arrays_outlive_the_file(tmp_path):
    path = fmt.write_step(tmp_path, 1, {"grad/w": np.linspace(0, 1, 1000).reshape(10, 100)})
    back = fmt.read_step(path)
    path.unlink()  # the parent deletes each file once compared
    assert back["grad/w"].shape == (10, 100) and back["grad/w"][9, 99] == 1.0
    assert not back["grad/w"].flags.writeable


def test_assemble_step_orders_references_and_keeps_only_differing_repeats():
    own = {"grad/b": np.float32([1, 2]), "grad/a": np.float32([3])}
    ref = {"ref64/grad/a": np.float64([3]), "ref64/grad/b": np.float64([1, 2]), "ref64/fwd/x": np.float64([0])}
    rep = {"grad/b": np.float32([1, 2]), "grad/a": np.float32([4])}
    arrays, varied = fmt.assemble_step(2, own, ref, rep, free_loss=np.float32(0.5), free_weights={"w": np.ones(2)})
    assert list(arrays) == ["grad/b", "grad/a", "ref64/grad/b", "ref64/grad/a", "ref64/fwd/x", "rep/grad/a",
                            "free/loss/loss", "free/weight/w", "meta/step", "meta/repeat"]
    assert varied and int(arrays["meta/step"]) == 2 and int(arrays["meta/repeat"]) == 1
    same, varied = fmt.assemble_step(3, own, ref, dict(own))
    assert not varied and not any(k.startswith(("rep/", "free/")) for k in same) and int(same["meta/repeat"]) == 1
    assert int(fmt.assemble_step(4, own, ref)[0]["meta/repeat"]) == 0


def test_assemble_step_keeps_carried_kinds_and_the_rounding_model():
    own = {"fwd/a": np.ones(2, np.float32), "buffer/bn.running_mean": np.zeros(3, np.float32),
           "optim/w.exp_avg": np.ones(2, np.float32)}
    ref = {"ref64/fwd/a": np.ones(2), "ref64/buffer/bn.running_mean": np.zeros(3)}
    local = {"local/fwd/a": np.array([0.0, 1e-7, 2.0])}
    arrays, varied = fmt.assemble_step(2, own, ref, None, free_loss=np.float32(1.0),
                                       free_weights={"w": np.ones(2, np.float32),
                                                     "optim/w.exp_avg": np.ones(2, np.float32)}, local=local)
    assert not varied
    assert arrays["free/weight/w"].shape == (2,) and "free/optim/w.exp_avg" in arrays
    assert arrays["local/fwd/a"][1] == 1e-7
    assert fmt.split_key("local/grad/x.y") == ("local", "grad", "x.y")
    assert {k for k, _, _ in fmt.iter_kind(arrays)} == {"fwd", "buffer", "optim"}
    assert set(fmt.CARRIED) == {"weight", "buffer", "optim", "scaler", "carry"}
