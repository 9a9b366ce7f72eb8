"""Operation-level localisation (issue 14.3): the operation pass records the aten operations of the
first divergent step on both sides and names the first one whose mathematics differ (or that
reads other data), with its module and the line that issued it. Each planted fault of
tests/diverge/faults.py must land on its own operation; true negatives name none.

The fast core records both sides in this process (``worker.run_job`` with ``Lockstep.ops_at``) and
localises in this process; the end-to-end tests go through ``diverge`` and the command line.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from conftest import run_job_here

from devicediff.cli import main
from devicediff.diverge.compare import BEYOND, IDENTICAL, ROUNDING
from devicediff.diverge.lockstep import diverge, localise_records
from devicediff.frameworks.torch.ops import ARRAYS, RECORD, localise, own_error, read_record
from devicediff.job import Job, Lockstep
from devicediff.protocol import FINISHED
from devicediff.runner import build_job
from devicediff.store import open_store
from devicediff.study import load_study

HERE = Path(__file__).parent
FAULTS = HERE / "faults.toml"


def record(study, config: str, step: int, tmp: Path) -> Path:
    """One side's operation pass in this process: the folder holding its record."""
    cell = study.cell(study.config(config), 0)
    folder = tmp / config / "ops"
    job = build_job(study, cell, f"ops-{config}", tmp / config,
                    lockstep=Lockstep(steps=step, dir=str(folder), repeat="never", free=False, ops_at=step))
    recs = run_job_here(job)
    done = recs[-1]
    assert done["kind"] == "done" and done["state"] == FINISHED, done
    assert not list(folder.glob("step*.npz")), "the operation pass writes no step files"
    return folder


def localised(a: str, b: str, step: int, tmp: Path, study_path: Path = FAULTS) -> dict:
    study = load_study(study_path)
    return localise(record(study, a, step, tmp), record(study, b, step, tmp))


# -- the fast core: each planted fault on its operation ------------------------------------------------


@pytest.mark.parametrize("a, b, step, kind, op, phase, module, code", [
    # a single-operation fault: LeakyReLU's slope 0.02 in B, 0.01 in A
    ("leaky", "leaky-slope", 1, "math", "aten.leaky_relu.default", "forward", "act", "self.act(h)"),
    ("clean", "forward-hook", 1, "extra", "aten.mul.Tensor", "forward", "fc2", "register_forward_hook"),
    ("clean", "tensor-hook", 1, "extra", "aten.mul.Tensor", "backward", "fc2", "weight.register_hook"),
    ("clean", "backward-hook", 1, "extra", "aten.mul.Tensor", "backward", "fc2", "register_full_backward_hook"),
    ("clean", "global-flag", 1, "math", "aten.mul.Tensor", "forward", "<model>", 'FLAGS["gain"]'),
    ("clean", "bn-momentum", 1, "math", "aten.native_batch_norm.default", "forward", "bn", "self.bn("),
    ("clean", "weight-decay", 1, "extra", "aten.add.Tensor", "optimizer", None, "weight_decay"),
    ("clean", "adam-beta2", 1, "math", "aten.addcmul_.default", "optimizer", None, "1 - beta2"),
    ("clean", "late-scale", 3, "extra", "aten.mul.Tensor", "forward", "<model>", "h * 1.001"),
    # B applies the first ReLU in place (aten.relu_ where A issues aten.relu: the same mathematics,
    # passed over) before the real fault, fc2's forward hook
    ("clean", "inplace-forward-hook", 1, "extra", "aten.mul.Tensor", "forward", "fc2", "register_forward_hook"),
])


def test_each_planted_fault_lands_on_its_operation(tmp_path, a, b, step, kind, op, phase, module, code):
    r = localised(a, b, step, tmp_path)
    n = r["named"]
    assert n is not None, r["line"]
    assert (n["kind"], n["op"], n["phase"], n["module"]) == (kind, op, phase, module), r["line"]
    assert code in n["source"]["code"], n["source"]
    assert r["step"] == step and not r["suspect"], r["line"]
    assert r["line"].startswith("first operation whose mathematics differ: ") and r["line"].endswith(
        "every operation before it agrees"), r["line"]


def test_the_single_operation_fault_says_which_argument_and_by_how_much(tmp_path):
    r = localised("leaky", "leaky-slope", 1, tmp_path)
    head = "first operation whose mathematics differ: aten.leaky_relu.default (forward) in module act (faults.py:"
    assert r["line"].startswith(head), r["line"]
    assert "inputs [64, 32] float32 (negative_slope 0.01 (A) vs 0.02 (B)): B on A's inputs differs from A by " \
           "1.0e-02 relative; every operation before it agrees" in r["line"], r["line"]
    assert r["agree"] == r["aligned"] - 1 > 0  # the forward operations before it were compared, and agree


def test_bn_momentum_names_the_argument(tmp_path):
    r = localised("clean", "bn-momentum", 1, tmp_path)
    assert r["named"]["args"] == "momentum 0.1 (A) vs 0.12 (B)", r["line"]


@pytest.mark.parametrize("a, b, step, study", [
    ("clean", "clean-2t", 3, FAULTS),  # step 3: the teacher-forced state differs in its last bits
    ("dropout", "dropout-2t", 1, FAULTS),  # dropout draws (paired on the CPU generator)
    ("cpu-1t", "cpu-2t", 1, HERE / "prednet_tiny.toml"),  # a recurrent model, views and copies galore
])


def test_sides_without_faults_name_no_operation_and_no_suspect(tmp_path, a, b, step, study):
    """True negatives (threads 1 vs 2): if the pass ran, every aligned operation would agree on
    A's inputs and read the same data, and each side's own errors stay inside their bounds."""
    r = localised(a, b, step, tmp_path, study)
    assert r["named"] is None and not r["suspect"], r["line"]
    assert r["line"].startswith(f"no operation of step {step} computes different mathematics: ")
    assert r["aligned"] == r["agree"] > 50
    assert all(v["ratio"] < 0.5 for v in r["largest_own"].values()), r["largest_own"]


def test_a_multi_tensor_optimizer_is_said_not_named(tmp_path):
    """Adam(foreach=True), as PyTorch picks it on a GPU, against the per-tensor Adam of the CPU: the
    same update through other operations in another order. The pass compares forward and backward
    and says the optimizer was left to the module level; it names no operation."""
    r = localised("clean", "foreach", 1, tmp_path)
    assert r["named"] is None and not r["suspect"], r["line"]
    assert r["not_compared"].startswith("the optimizer phase was not compared operation by operation: B issues "
                                        "multi-tensor kernels"), r["line"]
    assert r["line"].endswith("(the module level judges its results)") and r["agree"] > 20, r["line"]
    assert r["line"].startswith("no compared operation of step 1 computes different mathematics"), r["line"]


def test_a_broken_kernel_is_off_its_own_rounding_bound(tmp_path):
    """A side whose recorded result of one operation is 1e-4 off its own float64 replay (a broken
    kernel) is suspect at that operation; rounding alone stays inside the bound."""
    folder = record(load_study(FAULTS), "clean", 1, tmp_path)
    header, entries, arrays = read_record(folder)
    arrays = dict(arrays)
    e = next(e for e in entries if e["op"] == "aten.addmm.default")
    assert own_error(e, arrays, header)["err"] < own_error(e, arrays, header)["bound"]
    key = f"{e['i']}.r0"
    arrays[key] = arrays[key] * np.float32(1 + 1e-4)
    own = own_error(e, arrays, header)
    assert own["err"] > own["bound"] and own["err"] == pytest.approx(1e-4, rel=0.05), own
    np.savez(folder / ARRAYS, **arrays)
    r = localise(folder, folder)
    assert r["named"] is None and r["suspect"]["A"]["i"] == e["i"] and r["suspect"]["B"]["i"] == e["i"]
    assert "A's aten.addmm.default (forward) in module fc1 (faults.py:" in r["line"], r["line"]


def test_an_aliased_target_is_named_where_it_is_read(tmp_path):
    """The original study's bug (PredNet, ``alias_targets``): every operation computes the same
    mathematics, but B's MSE backward reads the target buffer after the loop overwrote it. The
    pass traces each input to the operation that produced it (copies are transparent)."""
    r = localised("cpu-1t", "cpu-1t-alias", 1, tmp_path, HERE / "prednet_tiny.toml")
    n = r["named"]
    assert (n["kind"], n["op"], n["phase"], n["input"]) == ("data", "aten.mse_loss_backward.default", "backward", 2), r
    assert "select(1, 4)" in n["from_b"] and "select(1, 4)" not in n["from_a"], r["line"]
    assert r["line"].startswith("first operation reading other data: aten.mse_loss_backward.default (backward)")


def test_a_perturbed_gate_operation_inside_prednet_is_named(tmp_path):
    """``faults.py:prednet_gate``: the forget gate's ``addcmul`` times 1.001 inside the ConvLSTM
    (by a torch function mode); the module level finds it in a gradient, the pass at its line."""
    text = (HERE / "prednet_tiny.toml").read_text().replace('name = "prednet"', 'name = "faults.py:prednet_gate"')
    text += '\n[[configs]]\nname = "gate"\ndevice = "cpu"\nthreads = 1\nparams = { fault = "gate_slope" }\n'
    (tmp_path / "faults.py").write_text((HERE / "faults.py").read_text())
    (tmp_path / "gate.toml").write_text(text)
    r = localised("cpu-1t", "gate", 1, tmp_path / "w", tmp_path / "gate.toml")
    n = r["named"]
    assert (n["kind"], n["op"], n["phase"]) == ("extra", "aten.mul.Tensor", "forward"), r["line"]
    assert (n["source"]["function"], n["source"]["code"]) == ("__torch_function__", "out = out * 1.001"), r["line"]


# -- the parent: when the pass runs, and what it says without records -----------------------------------


def test_the_pass_does_not_run_for_rounding(tmp_path, monkeypatch):
    from devicediff.diverge import lockstep as ls

    def no(*_a, **_k):
        raise AssertionError("the operation pass ran for a rounding verdict")

    monkeypatch.setattr(ls, "_op_pass", no)
    payload = diverge(load_study(FAULTS), "clean", "tiny-eps", steps=1, workdir=tmp_path / "w")
    assert payload["summary"]["verdict"] in (IDENTICAL, ROUNDING) and "ops" not in payload["summary"]


def test_a_side_without_a_record_stops_at_the_module(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / RECORD).write_text("{}")
    cfgs = {"A": types.SimpleNamespace(name="torch-cpu", framework="torch"),
            "B": types.SimpleNamespace(name="chainer-cpu", framework="chainer")}
    tasks = {s: types.SimpleNamespace(job=types.SimpleNamespace(lockstep=Lockstep(steps=1, dir=str(tmp_path / s))))
             for s in "AB"}
    done = {s: {"state": FINISHED} for s in "AB"}
    out = localise_records(cfgs, done, tasks, "python", tmp_path / "out.json")
    assert out == {"line": "side B (chainer) recorded no operations; localisation stops at the module"}
    done["A"] = {"state": "failed", "error": "boom"}
    assert localise_records(cfgs, done, tasks, "python", tmp_path / "out.json")["line"] == (
        "the operation pass failed on side A (torch-cpu): boom")


def test_lockstep_carries_ops_at():
    job = Job(run_id="r", workload="w", config={}, init_seed=0, data_seed=0, budget={},
              lockstep=Lockstep(steps=3, dir=".", ops_at=2))
    assert Job.from_json(job.to_json()).lockstep.ops_at == 2
    with pytest.raises(ValueError, match="ops_at 4"):
        Lockstep(steps=3, dir=".", ops_at=4)


# -- end to end: the command line ---------------------------------------------------------------------


def test_the_command_prints_and_stores_the_operation(tmp_path, capsys):
    db = tmp_path / "s.db"
    code = main(["diverge", str(FAULTS), "--a", "leaky", "--b", "leaky-slope", "--steps", "1", "--store", str(db)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "step 1, operation level: first operation whose mathematics differ: aten.leaky_relu.default (forward) " \
           "in module act (faults.py:" in out.replace("\n", ""), out
    store = open_store(str(db))
    payload = store.analyses(kind="diverge")["payload"].iloc[0]
    store.close()
    ops = payload["summary"]["ops"]
    assert payload["summary"]["verdict"] == BEYOND
    assert (ops["step"], ops["named"]["op"], ops["named"]["module"]) == (1, "aten.leaky_relu.default", "act")
    assert not list(tmp_path.rglob(RECORD)), "the records are deleted once localised"


def test_no_ops_stops_at_the_module(tmp_path, capsys):
    code = main(["diverge", str(FAULTS), "--a", "leaky", "--b", "leaky-slope", "--steps", "1", "--no-ops",
                 "--store", str(tmp_path / "s.db")])
    out = capsys.readouterr().out
    assert code == 1 and "operation level" not in out, out


# -- on the GPU machine: the pass across devices ---------------------------------------------------------

needs_gpu = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("a, b, kind, op, phase, module, code", [
    # CPU float32 against the GPU with the slope changed: the single-operation fault across devices
    ("leaky", "leaky-slope-cuda", "math", "aten.leaky_relu.default", "forward", "act", "self.act(h)"),
    # a parameter's tensor hook, GPU against GPU and CPU against GPU
    ("clean-cuda", "tensor-hook-cuda", "extra", "aten.mul.Tensor", "backward", "fc2", "weight.register_hook"),
    ("clean", "tensor-hook-cuda", "extra", "aten.mul.Tensor", "backward", "fc2", "weight.register_hook"),
])
@pytest.mark.gpu
@needs_gpu
def test_on_the_gpu_a_planted_fault_lands_on_its_operation(tmp_path, a, b, kind, op, phase, module, code):
    r = localised(a, b, 1, tmp_path)
    print(f"\n[ops gpu] {a} vs {b}: {r['line']}")
    n = r["named"]
    assert n is not None, r["line"]
    assert (n["kind"], n["op"], n["phase"], n["module"]) == (kind, op, phase, module), r["line"]
    assert code in n["source"]["code"], n["source"]
    assert not r["suspect"], r["line"]


@pytest.mark.parametrize("a, b, study", [
    ("clean", "clean-cuda", FAULTS),
    ("cpu-1t", "cuda", HERE / "prednet_tiny.toml"),
])
@pytest.mark.gpu
@needs_gpu
def test_on_the_gpu_sides_without_faults_name_nothing_before_the_optimizer_and_no_suspect(tmp_path, a, b, study):
    """CPU float32 against the GPU (TF32 off), no fault: every forward and backward operation agrees
    on A's inputs, and neither side is off its own rounding bound. The optimizer may be issued
    differently (CUDA's ``_foreach_*`` Adam): that is said, never named as a difference."""
    if b == "cuda":
        text = study.read_text() + '\n[[configs]]\nname = "cuda"\ndevice = "cuda"\ntf32 = false\n'
        study = tmp_path / "gpu.toml"
        study.write_text(text)
    r = localised(a, b, 1, tmp_path / "w", study)
    print(f"\n[ops gpu] {a} vs {b}: {r['line']}\n  largest own: {r['largest_own']}")
    assert not r["suspect"], r["line"]
    assert r["named"] is None, r["line"]
    assert r["aligned"] == r["agree"] > 20
