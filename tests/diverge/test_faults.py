"""Planted faults (issues 14 and 19): each lands at the right step, tensor and class; the true
negatives are rounding or identical. The workload is tests/diverge/faults.py (a user's own MLP
with BatchNorm and Adam), each fault planted in config B the way users write them.

The fast core runs both lockstep sides in this process (``worker.run_job``, one after the other)
and compares their step files with the parent's own functions; the slow tests go through the
real ``diverge`` (two worker processes), PredNet included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_job_here

from devicediff.diverge.compare import BEYOND, IDENTICAL, RANDOM, ROUNDING, SUSPECT, compare_step
from devicediff.diverge.lockstep import summarize
from devicediff.job import Lockstep
from devicediff.runner import build_job
from devicediff.stepfiles import read_step, step_path
from devicediff.study import load_study

HERE = Path(__file__).parent
FAULTS = HERE / "faults.toml"


def side(study, config: str, steps: int, tmp: Path) -> tuple[list[dict], list[dict]]:
    """One lockstep side in this process: its step files and its ``lockstep`` records."""
    import json

    cell = study.cell(study.config(config), 0)
    job = build_job(study, cell, f"t-{config}", tmp / config,
                    lockstep=Lockstep(steps=steps, dir=str(tmp / config / "steps"), repeat="never", free=False))
    recs = run_job_here(job)
    done = [r for r in recs if r["kind"] == "done"][-1]
    assert done["state"] == "finished", done
    return ([read_step(step_path(tmp / config / "steps", s)) for s in range(1, steps + 1)],
            [r for r in recs if r["kind"] == "lockstep"])


def pair(a: str, b: str, steps: int, tmp: Path, study_path: Path = FAULTS) -> dict:
    study = load_study(study_path)
    fa, ra = side(study, a, steps, tmp)
    fb, rb = side(study, b, steps, tmp)
    rows = []
    for s in range(steps):
        rows += compare_step(fa[s], fb[s], s + 1, 100.0, ra[s], rb[s])
    parity = {"A": ra[0].get("parity"), "B": rb[0].get("parity")}
    summary = summarize(rows, [], [], a, b, 100.0, parity)
    return {"rows": rows, "summary": summary, "files": (fa, fb), "records": (ra, rb)}


def first(res: dict, cls: str):
    return next((r for r in res["rows"] if r.cls == cls), None)


# -- the fast core --------------------------------------------------------------------------------


def test_batchnorm_momentum_is_found_at_step_1_in_the_running_statistics(tmp_path):
    """Issue 19: a change that touches nothing but the running statistics."""
    res = pair("clean", "bn-momentum", 1, tmp_path)
    fb = first(res, BEYOND)
    assert res["summary"]["verdict"] == BEYOND
    assert (fb.step, fb.kind, fb.name) == (1, "buffer", "bn.running_mean")
    assert all(r.cls == IDENTICAL for r in res["rows"] if r.kind in ("fwd", "loss", "grad", "weight", "optim"))


def test_adam_beta2_is_found_in_the_optimizer_state(tmp_path):
    res = pair("clean", "adam-beta2", 1, tmp_path)
    fb = first(res, BEYOND)
    assert fb is not None and fb.step == 1 and fb.kind == "optim" and fb.name.endswith(".exp_avg_sq"), fb
    assert all(r.cls == IDENTICAL for r in res["rows"] if r.kind in ("fwd", "loss", "grad", "buffer"))


def test_zero_gradient_bias_is_judged_on_the_scale_of_its_operation(tmp_path):
    """fc1 feeds BatchNorm: fc1.bias's gradient is 0 in exact arithmetic; float32 leaves noise.
    Its errors are measured against Σ|g| (the numbers that cancelled), not against a ~0 norm."""
    res = pair("clean", "clean-2t", 1, tmp_path) if torch.get_num_threads() > 1 else pair("clean", "clean", 1, tmp_path)
    row = next(r for r in res["rows"] if r.kind == "grad" and r.name == "fc1.bias")
    assert row.cls in (IDENTICAL, ROUNDING)
    assert row.err_a < 1e-5 and row.own_a < 1.0, row
    fa = res["files"][0][0]
    assert np.abs(fa["ref64/grad/fc1.bias"]).max() < 1e-12  # the exact gradient is ~0 ...
    assert fa["local/grad/fc1.bias"][2] > 1e-6  # ... but the operation's scale is not
    lr = res["summary"]["largest_rounding"]["A"]
    assert lr is None or lr["own"] is None or lr["own"] < 1.0


def test_parameter_tensor_hook_is_beyond_rounding_not_rounding(tmp_path):
    """Issue 14: ``fc2.weight.register_hook(lambda g: g * 1.001)`` in build_model. A deep-copied
    reference dropped the hook and booked the fault as B's own rounding error."""
    res = pair("clean", "tensor-hook", 1, tmp_path)
    fb = first(res, BEYOND)
    assert fb is not None and (fb.step, fb.kind, fb.name) == (1, "grad", "fc2.weight"), fb
    assert res["records"][1][0]["parity"] is None  # the faithful reference has the hook
    row = next(r for r in res["rows"] if r.kind == "grad" and r.name == "fc2.weight")
    assert row.err_b < 1e-6  # B's own error is rounding: its reference computes its mathematics


@pytest.mark.parametrize("config, kind, module", [
    ("forward-hook", "fwd", "fc2"),
    ("global-flag", "fwd", "fc3"),  # the flag scales fc2's output outside any module: fc3 first sees it
    ("backward-hook", "grad", "bn"),  # fc2's input gradient scaled: the first parameter below it is bn's
])


def test_hooks_and_flags_land_on_their_tensor(tmp_path, config, kind, module):
    res = pair("clean", config, 1, tmp_path)
    fb = first(res, BEYOND)
    assert fb is not None and fb.step == 1 and (fb.kind, fb.module) == (kind, module), (fb, res["summary"]["line"])
    assert not [r for r in res["rows"] if r.cls == SUSPECT]


def test_weight_decay_on_one_side_shows_in_the_update_only(tmp_path):
    res = pair("clean", "weight-decay", 1, tmp_path)
    fb = first(res, BEYOND)
    assert fb is not None and fb.kind in ("weight", "optim") and fb.step == 1, fb
    assert all(r.cls == IDENTICAL for r in res["rows"] if r.kind in ("fwd", "loss", "grad"))


def test_a_fault_from_step_3_is_found_at_step_3(tmp_path):
    res = pair("clean", "late-scale", 3, tmp_path)
    fb = first(res, BEYOND)
    assert fb is not None and fb.step == 3 and (fb.kind, fb.name) == ("fwd", "fc3"), fb  # scaled outside any module
    assert all(r.cls == IDENTICAL for r in res["rows"] if r.step < 3)


def test_epsilon_below_float32_resolution_is_not_a_bug(tmp_path):
    res = pair("clean", "tiny-eps", 2, tmp_path)
    assert res["summary"]["verdict"] in (IDENTICAL, ROUNDING), res["summary"]["line"]


def test_an_unfaithful_reference_is_named(tmp_path, monkeypatch):
    """Step 0 parity: a hook added to the working model after build_model (so no faithful copy
    has it) makes the side's float32 replay differ, and the check names the tensor."""
    from devicediff.frameworks.torch import lockstep as ls

    real = ls.TorchLockstep.__init__

    def init(self, backend):
        backend.model.fc2.weight.register_hook(lambda g: g * 1.001)
        real(self, backend)

    monkeypatch.setattr(ls.TorchLockstep, "__init__", init)
    study = load_study(FAULTS)
    _, recs = side(study, "clean", 1, tmp_path)
    assert recs[0]["parity"]["tensor"] == "grad/fc2.weight"
    s = summarize([], [], [], "clean", "clean", 100.0, {"A": None, "B": recs[0]["parity"]})
    assert s["verdict"] == SUSPECT
    assert "B's reference lacks something: its float32 replay differs from B at grad/fc2.weight" in s["line"]


def test_a_side_off_its_own_rounding_bound_is_suspect():
    """A side whose own error is far beyond what its precision explains (a broken kernel, or a
    reference that lacks something) is suspect even when A − B looks like rounding."""
    from devicediff.diverge.compare import compare_tensor
    from devicediff.diverge.lockstep import suspect_lines

    g = np.random.default_rng(0)
    r = g.standard_normal(1000)
    a = r.astype(np.float32)
    b = (r * (1 + 1e-3)).astype(np.float32)
    scale = float(np.linalg.norm(np.abs(r)))
    la = np.array([float(np.linalg.norm(a - r)), 3e-7 * scale, scale])
    lb = np.array([float(np.linalg.norm(b - r)), 3e-7 * scale, scale])
    row = compare_tensor(step=1, kind="grad", name="fc2.weight", A=a, B=b, RA=r, RB=r,  # B's reference lacks its fault
                         LA=la, LB=lb)
    assert row.cls == SUSPECT and "B suspect" in row.note
    line = suspect_lines([row], {"A": "a", "B": "b"})[0]
    assert line.startswith("B's gradient of fc2.weight (step 1) is 1.0e-03 from its own float64 reference; "
                           "float32 explains <= 3e-07 here"), line


def test_random_draws_not_shared_are_random_never_rounding():
    from devicediff.diverge.compare import random_pairing

    a = {"fwd/fc1": np.ones(3, np.float32), "ref64/fwd/fc1": np.ones(3),
         "fwd/drop": np.array([0, 2, 2], np.float32), "ref64/fwd/drop": np.array([0, 2, 2.0]),
         "loss/loss": np.float32(1), "ref64/loss/loss": np.float64(1)}
    b = dict(a)
    b["fwd/drop"] = np.array([2, 0, 2], np.float32)  # another mask, and B's reference drew on the CPU
    b["ref64/fwd/drop"] = np.array([2, 0, 2.0])
    b["loss/loss"] = np.float32(1.5)
    b["ref64/loss/loss"] = np.float64(1.5)
    cpu = {"random": ["cpu: bernoulli_ in module drop (Dropout)"], "random_modules": ["drop"], "random_devices": ["cpu"]}
    gpu = {"random": ["cuda:0: bernoulli_ in module drop (Dropout)"], "random_modules": ["drop"],
           "random_devices": ["cuda:0"]}
    assert random_pairing(cpu, cpu) is None
    rows = {r.name: r for r in compare_step(a, b, 1, info_a=cpu, info_b=gpu)}
    assert rows["fc1"].cls == IDENTICAL
    assert rows["drop"].cls == RANDOM and "drop" in rows["drop"].note
    assert rows["loss"].cls == RANDOM


# -- slow: the whole command, PredNet ----------------------------------------------------------------


@pytest.mark.slow
def test_threads_1_vs_2_are_rounding_and_never_suspect(tmp_path):
    from devicediff.diverge.lockstep import diverge

    payload = diverge(load_study(FAULTS), "clean", "clean-2t", steps=3, workdir=tmp_path / "w")
    assert payload["summary"]["verdict"] in (IDENTICAL, ROUNDING), payload["summary"]["line"]
    assert not [r for r in payload["rows"] if r["cls"] in (SUSPECT, BEYOND)]


@pytest.mark.slow
def test_prednet_single_perturbed_gate_op_is_found_at_step_1(tmp_path):
    """The forget gate's pre-activation 0.1% larger (one op site inside the ConvLSTM): found at
    step 1 in the gradient of the parameter that op reads (module level; docs/diverge.md)."""
    text = (HERE / "prednet_tiny.toml").read_text().replace('name = "prednet"', 'name = "faults.py:prednet_gate"')
    text += '\n[[configs]]\nname = "gate"\ndevice = "cpu"\nthreads = 1\nparams = { fault = "gate_slope" }\n'
    (tmp_path / "faults.py").write_text((HERE / "faults.py").read_text())
    study_file = tmp_path / "gate.toml"
    study_file.write_text(text)
    res = pair("cpu-1t", "gate", 1, tmp_path / "w", study_file)
    fb = first(res, BEYOND)
    assert fb is not None and (fb.step, fb.kind, fb.name) == (1, "grad", "layers.0.peephole_f"), fb
    assert not [r for r in res["rows"] if r.cls == SUSPECT]
    assert {"carry"} <= {r.kind for r in res["rows"]}  # PredNet's recurrent state is compared
    assert res["summary"]["verdict"] == BEYOND


def test_cpu_dropout_draws_are_shared_and_named(tmp_path):
    """Device dropout on the CPU generator, seeded alike every step on both sides and in each
    side's float64 reference: paired, so rounding, and the draw is named in the record."""
    res = pair("dropout", "dropout", 1, tmp_path)
    assert res["summary"]["verdict"] in (IDENTICAL, ROUNDING), res["summary"]["line"]
    rec = res["records"][0][0]
    assert rec["random_modules"] == ["drop"] and rec["random_devices"] == ["cpu"], rec
    assert not [r for r in res["rows"] if r.cls in (SUSPECT, RANDOM, BEYOND)]


@pytest.mark.gpu
def test_gpu_dropout_is_random_and_planted_hook_is_found_on_the_gpu(tmp_path):
    from devicediff.diverge.lockstep import diverge

    study = load_study(FAULTS)
    p = diverge(study, "dropout", "dropout-cuda", steps=2, workdir=tmp_path / "d")
    assert p["summary"]["verdict"] == RANDOM, p["summary"]["line"]
    assert "drop" in p["summary"]["first_random"]["note"]
    p = diverge(study, "clean", "clean-cuda", steps=3, workdir=tmp_path / "c")
    assert p["summary"]["verdict"] in (IDENTICAL, ROUNDING), p["summary"]["line"]  # never suspect
    p = diverge(study, "clean", "tensor-hook-cuda", steps=2, workdir=tmp_path / "h")
    fb = p["summary"]["first_beyond"]
    assert fb and (fb["step"], fb["kind"], fb["name"]) == (1, "grad", "fc2.weight"), p["summary"]["line"]


def test_a_kind_one_side_does_not_record_is_not_compared():
    """A Chainer side writes no carried state, an fp32 side no scaler: not a difference."""
    a = {"fwd/x": np.ones(2, np.float32), "carry/_state.0": np.ones(3, np.float32),
         "scaler/scale": np.float64(65536.0)}
    b = {"fwd/x": np.ones(2, np.float32)}
    assert {r.kind for r in compare_step(a, b, 1)} == {"fwd"}


def test_unshared_draws_of_an_earlier_step_make_every_later_difference_random():
    """Each side's float64 reference draws on its own device: after a step whose draws the sides
    did not share, the teacher states differ through them, so nothing later is judged as rounding
    or beyond it; identical tensors stay identical."""
    a = {"fwd/x": np.ones(2, np.float32), "fwd/y": np.ones(2, np.float32)}
    b = {"fwd/x": np.ones(2, np.float32), "fwd/y": np.full(2, 2.0, np.float32)}
    assert {r.name: r.cls for r in compare_step(a, b, 2)}["y"] != RANDOM
    rows = compare_step(a, b, 2, carried="the teacher states carry step 1's random draws not shared")
    assert {r.name: r.cls for r in rows} == {"x": IDENTICAL, "y": RANDOM}
    assert "step 1" in rows[1].note
