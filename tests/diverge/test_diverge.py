"""``devicediff diverge`` end to end: two worker processes, planted faults, the CLI.

Must catch a real bug at its first step and module, and must not call plain
thread-count rounding a bug.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from devicediff.cli import main
from devicediff.diverge import plot_divergence
from devicediff.diverge.compare import BEYOND, IDENTICAL, ROUNDING
from devicediff.diverge.lockstep import DivergeError, diverge
from devicediff.store import open_store
from devicediff.study import StudyError, load_study

HERE = Path(__file__).parent
AE = HERE / "autoencoder_small.toml"


def test_one_vs_two_threads_is_rounding(tmp_path):
    study = load_study(AE)
    store = open_store(":memory:")
    payload = diverge(study, "cpu-1t", "cpu-2t", steps=2, store=store, workdir=tmp_path / "w")
    s = payload["summary"]
    assert s["verdict"] in (ROUNDING, IDENTICAL), s["line"]
    assert not [r for r in payload["rows"] if r["cls"] == BEYOND]
    # The triangle inequality bounds the ratio by ~1 for configs computing the same mathematics.
    assert max(r["ratio"] for r in payload["rows"]) <= 1.5
    assert [st["step"] for st in payload["per_step"]] == [1, 2]
    # Teacher forcing: both sides start every step from the same state (float64 noise rounds away).
    assert all((st["start_gap"] or 0.0) < 1e-6 for st in payload["per_step"])
    kinds = {r["kind"] for r in payload["rows"]}
    assert kinds == {"fwd", "loss", "grad", "weight", "optim"}  # the autoencoder has no buffers
    assert {r["kind"] for r in payload["free"]} == {"loss", "weight", "optim"}
    assert not [r for r in payload["rows"] if r["cls"] == "suspect"]
    assert payload["effective"]["A"]["torch_threads"] == 1 and payload["effective"]["B"]["torch_threads"] == 2
    stored = store.analyses(kind="diverge")
    assert list(stored["key"]) == ["cpu-1t|cpu-2t|seed=0|steps=2"]
    assert stored["payload"].iloc[0]["summary"]["verdict"] == s["verdict"]
    assert not list((tmp_path / "w").rglob("step*.npz")), "step files are deleted once compared"
    png = plot_divergence(payload, tmp_path / "div.png")
    assert png.stat().st_size > 10_000


def test_planted_fault_is_beyond_rounding_at_step_1_in_layers_1(tmp_path, capsys):
    db = tmp_path / "s.db"
    code = main(["diverge", str(AE), "--a", "cpu-1t", "--b", "cpu-1t-drop-bias", "--steps", "2", "--store", str(db)])
    out = capsys.readouterr().out
    assert code == 1, out  # like diff: 1 = the configs differ beyond rounding
    assert "verdict: beyond rounding" in out
    assert "first difference: step 1, layers.1 fwd" in out
    assert "operation level: first operation whose mathematics differ: B issues aten.mm.default (forward)" in out
    store = open_store(str(db))
    payload = store.analyses(kind="diverge")["payload"].iloc[0]
    store.close()
    fb = payload["summary"]["first_beyond"]
    assert fb["step"] == 1 and fb["module"] == "layers.1"
    step1 = {(r["kind"], r["name"]): r for r in payload["rows"] if r["step"] == 1}
    # At step 1 the bias is still 0, so only what touches it differs: layers.1 is not called as a
    # module, its bias gets no gradient and is not updated. Everything else has the same bits.
    beyond = sorted(k for k, r in step1.items() if r["cls"] == BEYOND)
    # (B's Adam keeps no state for a parameter without a gradient: its three entries are absent in B)
    assert beyond == [("fwd", "layers.1"), ("grad", "layers.1.bias"), ("optim", "layers.1.bias.exp_avg"),
                      ("optim", "layers.1.bias.exp_avg_sq"), ("optim", "layers.1.bias.step"), ("weight", "layers.1.bias")]
    assert step1[("loss", "loss")]["cls"] == IDENTICAL
    assert "no gradient in B" in step1[("grad", "layers.1.bias")]["note"]


@pytest.mark.skipif(importlib.util.find_spec("devicediff.workloads.prednet") is None,
                    reason="the PredNet workload (devicediff.workloads.prednet) is not installed in this tree")
def test_prednet_aliased_targets_are_beyond_rounding_at_step_1(tmp_path):
    # The original study's bug (DESIGN.md §1): the forward loss is right, the gradients are not.
    study = load_study(HERE / "prednet_tiny.toml")
    payload = diverge(study, "cpu-1t", "cpu-1t-alias", steps=1, workdir=tmp_path / "w")
    s = payload["summary"]
    assert s["verdict"] == BEYOND
    rows = payload["rows"]
    assert all(r["cls"] == IDENTICAL for r in rows if r["kind"] in ("fwd", "loss"))
    fb = s["first_beyond"]
    # The first gradient backward finishes is the prediction conv of layer 0, which feeds the loss.
    assert fb["step"] == 1 and fb["kind"] == "grad" and fb["module"] == "layers.0.conv_p"
    assert fb["ratio"] > 1e4
    # the operation pass names the operation that reads the overwritten buffer (tests/diverge/test_ops.py)
    named = s["ops"]["named"]
    assert (named["kind"], named["op"]) == ("data", "aten.mse_loss_backward.default"), s["ops"]["line"]


def test_unknown_config_is_a_usage_error(capsys):
    assert main(["diverge", str(AE), "--a", "cpu-1t", "--b", "nope", "--store", ":memory:"]) == 2
    assert "no config named 'nope'" in capsys.readouterr().err
    with pytest.raises(StudyError):
        diverge(load_study(AE), "cpu-1t", "cpu-2t", steps=0)


def test_a_side_that_cannot_run_is_reported(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the cuda side would run")
    text = AE.read_text() + '\n[[configs]]\nname = "gpu"\ndevice = "cuda"\n'
    study_file = tmp_path / "with_gpu.toml"
    study_file.write_text(text)
    with pytest.raises(DivergeError, match=r"side A \(gpu\) was skipped: .*CUDA"):
        diverge(load_study(study_file), "gpu", "gpu", steps=1, workdir=tmp_path / "w")


@pytest.mark.gpu
def test_cpu_vs_gpu_is_rounding(tmp_path):
    """On the GPU machine: CPU float32 vs GPU (TF32 off, and PyTorch's default TF32 for cuDNN conv)."""
    study = load_study(HERE / "autoencoder_gpu.toml")
    for b in ("gpu", "gpu-tf32"):
        payload = diverge(study, "cpu-1t", b, steps=3, workdir=tmp_path / b)
        assert payload["summary"]["verdict"] in (ROUNDING, IDENTICAL), payload["summary"]["line"]
        assert payload["effective"]["B"]["device"].startswith("cuda")
    payload = diverge(study, "cpu-1t", "gpu-drop-bias", steps=2, workdir=tmp_path / "f")
    assert payload["summary"]["first_beyond"]["module"] == "layers.1"
