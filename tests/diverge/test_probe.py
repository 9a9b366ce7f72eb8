"""The PyTorch lockstep side of diverge (devicediff.frameworks.torch.lockstep), run in this process."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_job_here

from devicediff.stepfiles import read_step, step_path
from devicediff.frameworks.torch.backend import load_workload
from devicediff.frameworks.torch.lockstep import clone_state, teacher_sync
from devicediff.job import Lockstep
from devicediff.runner import build_job
from devicediff.study import load_study

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def lockstep_run(tmp_path_factory):
    """Three lockstep steps of the small autoencoder's cpu-1t config, in-process."""
    tmp = tmp_path_factory.mktemp("probe")
    study = load_study(HERE / "autoencoder_small.toml")
    cell = study.cell(study.config("cpu-1t"), 0)
    job = build_job(study, cell, "probe-test", tmp, lockstep=Lockstep(steps=3, dir=str(tmp / "steps")))
    records = run_job_here(job)
    return study, job, records, [read_step(step_path(tmp / "steps", s)) for s in (1, 2, 3)]


def test_records_and_files(lockstep_run):
    _, _, records, steps = lockstep_run
    kinds = [r["kind"] for r in records]
    assert kinds.count("lockstep") == 3 and kinds[-1] == "done" and records[-1]["state"] == "finished"
    ls = [r for r in records if r["kind"] == "lockstep"]
    assert [r["step"] for r in ls] == [1, 2, 3] and all(Path(r["path"]).is_file() for r in ls)
    assert {"config", "repeat", "ref64", "free", "gather", "wait", "write", "total"} <= set(ls[0]["timing"])
    s1 = steps[0]
    fwd = [k for k in s1 if k.startswith("fwd/")]
    assert fwd == ["fwd/layers.0", "fwd/layers.1", "fwd/layers.2", "fwd/layers.3", "fwd/<model>"]  # call order
    grads = [k for k in s1 if k.startswith("grad/")]
    assert grads[0].startswith("grad/layers.3.") and grads[-1].startswith("grad/layers.0.")  # backward order
    for k in [k for k in s1 if k.split("/")[0] in ("fwd", "loss", "grad", "weight")]:
        assert s1[k].dtype == np.float32 and s1[f"ref64/{k}"].dtype == np.float64
    assert "free/loss/loss" in s1 and "free/weight/layers.0.weight" in s1


def test_repeat_auto_on_cpu(lockstep_run):
    _, _, _, steps = lockstep_run
    # CPU runs repeat bit for bit, so auto repeats only step 1 and writes no rep/ arrays.
    assert [int(s["meta/repeat"]) for s in steps] == [1, 0, 0]
    assert not [k for s in steps for k in s if k.startswith("rep/")]


def test_float64_reference_matches_an_independent_float64_step(lockstep_run):
    study, job, _, steps = lockstep_run
    wl = load_workload(job)
    model = wl.build_model(0).double()
    opt = wl.make_optimizer(model)
    batch = next(iter(wl.train_batches(0, 0)))
    opt.zero_grad()
    loss = wl.loss(model, type(batch)(batch.data.double()))
    loss.backward()
    opt.step()
    s1 = steps[0]
    assert float(s1["ref64/loss/loss"]) == pytest.approx(loss.item(), rel=1e-14)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(s1[f"ref64/weight/{name}"], p.detach().numpy(), rtol=0, atol=1e-15)


def test_config_step_close_to_reference_and_free_copy_equal_at_step_1(lockstep_run):
    _, _, _, steps = lockstep_run
    s1 = steps[0]
    for k in ("fwd/layers.2", "grad/layers.0.weight", "loss/loss"):
        a, r = s1[k].astype(np.float64), s1[f"ref64/{k}"]
        assert np.linalg.norm(a - r) <= 1e-5 * np.linalg.norm(r)
    # The free-running copy did the very same step from the very same state: same bits.
    for k in s1:
        if k.startswith("weight/"):
            assert s1[k].tobytes() == s1["free/" + k].tobytes(), k


def test_teacher_forcing_starts_each_step_from_the_rounded_reference(lockstep_run):
    _, _, _, steps = lockstep_run
    # Step 2's float64 reference must start from step 1's reference weights rounded to float32;
    # check through the free copy, which starts from the config's own step-1 weights instead:
    # the two states differ (by rounding), so teacher forcing really replaced the state.
    s1, s2 = steps[0], steps[1]
    rounded = s1["ref64/weight/layers.0.weight"].astype(np.float32)
    own = s1["weight/layers.0.weight"]
    assert rounded.tobytes() != own.tobytes()
    assert np.max(np.abs(rounded.astype(np.float64) - own)) < 1e-6


def test_teacher_sync_and_clone_state():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    m64 = copy.deepcopy(m).double()
    opt64 = torch.optim.Adam(m64.parameters(), lr=1e-3)
    opt64.load_state_dict(clone_state(opt.state_dict()))
    with torch.no_grad():
        for p in m64.parameters():
            p.add_(1e-12)  # a float64 state that float32 cannot hold
            opt64.state[p]["exp_avg"].add_(1e-15)
    want = {n: p.detach().clone().float() for n, p in m64.named_parameters()}  # round to nearest
    teacher_sync(m, opt, m64, opt64)
    for (n, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p.double(), p64)  # reference = working copy, exactly
        assert torch.equal(p, want[n])
    s, s64 = opt.state_dict()["state"][0], opt64.state_dict()["state"][0]
    assert s["step"] is not s64["step"]  # never shared: each optimizer counts its own steps
    assert s64["exp_avg"].dtype == torch.float64 and torch.equal(s["exp_avg"].double(), s64["exp_avg"])
    assert s64["exp_avg_sq"].dtype == torch.float64 and torch.equal(s["exp_avg_sq"].double(), s64["exp_avg_sq"])


def test_teacher_sync_before_the_first_step_and_with_buffers():
    """No optimizer state on one side yet: the state is taken over whole (here: cleared);
    integer buffers are copied as they are."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    m64 = copy.deepcopy(m).double()
    opt, opt64 = torch.optim.Adam(m.parameters()), torch.optim.Adam(m64.parameters())
    m(torch.randn(5, 4)).sum().backward()
    opt.step()  # the working optimizer has state, the reference none
    with torch.no_grad():
        m64[1].running_mean.add_(0.5)
        m64[1].num_batches_tracked.fill_(7)
    teacher_sync(m, opt, m64, opt64)
    assert not opt.state and not opt64.state
    assert torch.equal(m[1].running_mean.double(), m64[1].running_mean)
    assert m[1].num_batches_tracked.item() == 7 and m[1].num_batches_tracked.dtype == torch.int64
