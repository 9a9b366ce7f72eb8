"""The Chainer framework: its environment, shared initial weights, the reused
frame buffers of the original loop, and `devicediff run` with Chainer configs.

Tests marked ``chainer`` need the Chainer 7.8.1 environment; the first one
makes it (about half a minute with PyPI reachable, then cached under
~/.cache/devicediff). Code that needs chainer runs in that environment's
interpreter, in a subprocess; this process (torch, numpy 2) checks it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, devicediff
from devicediff.frameworks.chainer import env as chainer_env
from devicediff.frameworks.chainer import init_export
from devicediff.frameworks.torch.backend import flat_weights, state_sha256
from devicediff.workloads import make_workload

SRC = str(ROOT / "src")
TINY_AE = dict(sizes=[32, 8], batch_size=50, train_size=500, eval_size=200)
TINY_PN = dict(variant="chainer-lineage", layers=3, channels=[1, 4, 8], height=16, width=16, window=6,
               sequence_length=13, sequences=4, test_sequences=2, eval_batch_size=2)


@pytest.fixture(scope="session")
def chainer_py() -> str:
    try:
        return chainer_env.chainer_python()
    except chainer_env.ChainerEnvError as e:
        pytest.skip(f"no Chainer environment: {e}")


def in_chainer(py: str, code: str, payload: dict | None = None, timeout: float = 300) -> dict:
    """Run ``code`` in the Chainer interpreter with ``payload`` as ``P``; it must print one JSON line last."""
    env = {**os.environ, "PYTHONPATH": SRC, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    prog = "import sys, json\nsys.path.pop(0)\nP = json.loads(sys.stdin.read())\n" + code
    r = subprocess.run([py, "-c", prog], input=json.dumps(payload or {}), capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def job(workload: str, params: dict, init_seed: int = 0, data_seed: int = 0, **cfg) -> dict:
    """A ``devicediff.job.Job`` as the dict the Chainer side rebuilds it from (``Job.from_dict``)."""
    return {"run_id": "t", "workload": workload, "workload_params": params,
            "config": {"name": "c", "framework": "chainer", **cfg}, "init_seed": init_seed, "data_seed": data_seed,
            "torch_python": sys.executable, "budget": {"steps": 2}}


# ------------------------------------------------------------------------------------------
# Environment (no Chainer needed)
# ------------------------------------------------------------------------------------------


def test_named_interpreter_must_exist(monkeypatch):
    monkeypatch.setenv(chainer_env.PYTHON_ENV, "/nonexistent/python")
    with pytest.raises(chainer_env.ChainerEnvError) as e:
        chainer_env.chainer_python()
    assert "\n" not in str(e.value) and chainer_env.PYTHON_ENV in str(e.value)


def test_failed_creation_is_one_line_and_leaves_no_ready_env(tmp_path):
    venv = tmp_path / "chainer-x"
    with pytest.raises(chainer_env.ChainerEnvError) as e:
        chainer_env.create_env(venv, base_python="/bin/false")
    msg = str(e.value)
    assert "\n" not in msg and "python -m venv" in msg and "chainer-x.install.log" in msg
    assert not chainer_env.is_ready(venv)


def test_python_312_is_refused_with_the_reason(tmp_path):
    fake = tmp_path / "python3.12"
    fake.write_text("#!/bin/sh\necho 3 12\n")
    fake.chmod(0o755)
    with pytest.raises(chainer_env.ChainerEnvError) as e:
        chainer_env.create_env(tmp_path / "chainer-y", base_python=str(fake))
    assert "\n" not in str(e.value) and "numpy.distutils" in str(e.value) and chainer_env.BASE_ENV in str(e.value)


# ------------------------------------------------------------------------------------------
# Hashing: the numpy restatement of the PyTorch backend's state_sha256
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("autoencoder", TINY_AE), ("prednet", TINY_PN)])
def test_array_hash_equals_torch_hash(name, params):
    model = make_workload(name, params).build_model(7)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert init_export.state_sha256_arrays(arrays) == state_sha256(model)
    flat = init_export.flat_weights_arrays({k: v for k, v in arrays.items()})
    assert flat.dtype == flat_weights(model).dtype and np.array_equal(flat, flat_weights(model))


def test_export_strips_chainer_only_params(tmp_path):
    meta = init_export.export("autoencoder", {**TINY_AE, "frame_buffers": "fresh"}, 3, tmp_path)
    assert meta["sha256"] == state_sha256(make_workload("autoencoder", TINY_AE).build_model(3))
    assert (tmp_path / init_export.NPZ).is_file()


# ------------------------------------------------------------------------------------------
# Chainer side
# ------------------------------------------------------------------------------------------


@pytest.mark.chainer
def test_environment_versions(chainer_py):
    v = chainer_env.check(chainer_py)
    assert v.startswith("chainer 7.8.1 numpy 1."), v


INIT = """
from pathlib import Path
from devicediff.frameworks.chainer.backend import load_twin, state_sha256
from devicediff.job import Job
out = {}
for name, j in P["jobs"].items():
    wl, model, meta = load_twin(Job.from_dict(j), Path(P["dir"]) / name)
    out[name] = state_sha256(model)
print(json.dumps(out))
"""


@pytest.mark.chainer
def test_init_hash_equal_across_frameworks(chainer_py, tmp_path):
    """The same init seed gives the same initial weights, hashed the same way, in Chainer and PyTorch."""
    jobs = {"ae5": job("autoencoder", TINY_AE, init_seed=5), "pn2": job("prednet", TINY_PN, init_seed=2),
            "pn3": job("prednet", TINY_PN, init_seed=3)}
    got = in_chainer(chainer_py, INIT, {"jobs": jobs, "dir": str(tmp_path)})
    assert got["ae5"] == state_sha256(make_workload("autoencoder", TINY_AE).build_model(5))
    pn = make_workload("prednet", TINY_PN)
    assert got["pn2"] == state_sha256(pn.build_model(2))
    assert got["pn3"] == state_sha256(pn.build_model(3)) != got["pn2"]


GRADS = """
from devicediff.frameworks.chainer.gradients import frame_buffer_gradients
from devicediff.job import Job
print(json.dumps(frame_buffer_gradients(Job.from_dict(P))))
"""

FRESH_VS_TORCH = """
from pathlib import Path
import numpy as np
import chainer
from devicediff.frameworks.chainer.backend import load_twin
from devicediff.frameworks.chainer.common import FrameFeeder, torch_name
from devicediff.job import Job
from devicediff.workloads.prednet.chainer import ssim
wl, model, meta = load_twin(Job.from_dict(P["job"]), Path(P["dir"]))
batch = next(iter(wl.train_batches(0, 0)))
loss = wl.loss(model, batch, FrameFeeder("fresh", np)); model.cleargrads(); loss.backward()
g = {torch_name(k): p.grad for k, p in model.namedparams()}
np.savez(Path(P["dir"]) / "chainer_grads.npz", batch=batch.data, **g)
z = np.load(P["ssim_in"])
print(json.dumps({"loss": float(loss.array), "ssim": ssim(z["x"], z["y"]).tolist()}))
"""


@pytest.mark.chainer
def test_reused_buffers_keep_the_loss_and_change_the_gradients(chainer_py):
    """The original loop on CPU: the same forward loss as fresh buffers, other gradients."""
    r = in_chainer(chainer_py, GRADS, job("prednet", TINY_PN, init_seed=1))
    assert r["loss_identical"] and r["frames_in_window"] == 6
    assert r["grad_rel_l2"] > 0.05, r["grad_rel_l2"]
    # The control: the autoencoder's loop calls backward before the buffer is overwritten.
    r = in_chainer(chainer_py, GRADS, job("autoencoder", TINY_AE, init_seed=1))
    assert r["loss_identical"] and r["grad_rel_l2"] == 0.0


@pytest.mark.chainer
def test_fresh_buffers_match_pytorch(chainer_py, tmp_path):
    """Chainer with fresh buffers computes PyTorch's loss and gradients (float32 rounding
    apart), on the same batch; the numpy SSIM equals the PyTorch workload's."""
    from devicediff.workloads.prednet import ssim as torch_ssim

    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 16, 16), dtype=np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape).astype(np.float32), 0, 1)
    np.savez(tmp_path / "ssim_in.npz", x=x, y=y)
    r = in_chainer(chainer_py, FRESH_VS_TORCH,
                   {"job": job("prednet", TINY_PN, init_seed=4), "dir": str(tmp_path), "ssim_in": str(tmp_path / "ssim_in.npz")})
    np.testing.assert_allclose(r["ssim"], torch_ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy(), rtol=1e-12, atol=1e-13)

    wl = make_workload("prednet", TINY_PN)
    model = wl.build_model(4)
    batch = next(iter(wl.train_batches(0, 0)))
    z = np.load(tmp_path / "chainer_grads.npz")
    assert np.array_equal(batch.data.numpy(), z["batch"])
    loss = wl.loss(model, batch)
    loss.backward()
    assert abs(loss.item() - r["loss"]) <= 1e-6 * abs(loss.item())
    num = sum(float(((p.grad.double() - torch.from_numpy(z[n]).double()) ** 2).sum()) for n, p in model.named_parameters())
    den = sum(float((p.grad.double() ** 2).sum()) for _, p in model.named_parameters())
    assert (num / den) ** 0.5 < 1e-5


RESUME = """
from devicediff.frameworks import _driver
from devicediff.job import Job
from devicediff.protocol import RecordWriter
from devicediff.worker import run_job
import io

def go(j, crash_after_checkpoint=False):
    buf = io.StringIO()
    saved = _driver.save_checkpoint
    def save_then_crash(b, step):
        saved(b, step)
        raise KeyboardInterrupt("killed")
    if crash_after_checkpoint:
        _driver.save_checkpoint = save_then_crash
    try:
        run_job(Job.from_dict(j), RecordWriter(buf))
    except KeyboardInterrupt:  # recorded as failed, then passed on (a warm worker must stop)
        pass
    finally:
        _driver.save_checkpoint = saved
    return [json.loads(l) for l in buf.getvalue().splitlines()]

straight = go(P["a"])
go(P["b"], crash_after_checkpoint=True)
resumed = go(P["b"])
import os
os.makedirs(P["c"]["artifact_dir"], exist_ok=True)
with open(P["c"]["checkpoint_path"], "wb") as f:
    f.write(b"PK not a checkpoint")
garbage = go(P["c"])
done = lambda recs: [r for r in recs if r["kind"] == "done"][0]
print(json.dumps({"straight": done(straight), "resumed": done(resumed), "garbage": done(garbage)}))
"""


@pytest.mark.chainer
def test_checkpoint_resume_gives_the_same_bits(chainer_py, tmp_path):
    def j(d):
        x = job("autoencoder", {**TINY_AE, "train_size": 200}, init_seed=2, threads=1)
        x.update(budget={"epochs": 2, "metric_every": 2}, artifact_dir=str(tmp_path / d),
                 checkpoint_path=str(tmp_path / d / "checkpoint.npz"))
        return x

    r = in_chainer(chainer_py, RESUME, {"a": j("a"), "b": j("b"), "c": j("c")})
    assert r["straight"]["state"] == r["resumed"]["state"] == "finished"
    assert r["resumed"]["resumed_from"] == 4 and r["straight"]["resumed_from"] == 0
    assert r["straight"]["final_sha256"] == r["resumed"]["final_sha256"]
    # An unreadable checkpoint is set aside; the run starts over from the same initial weights.
    assert r["garbage"]["resumed_from"] == 0 and r["garbage"]["final_sha256"] == r["straight"]["final_sha256"]
    assert (tmp_path / "c" / "checkpoint.npz.unreadable").is_file()


# ------------------------------------------------------------------------------------------
# End to end: `devicediff run` with Chainer configs
# ------------------------------------------------------------------------------------------

STUDY = """
name = "{name}"
reference = "torch-cpu"
[workload]
{workload}
[seeds]
count = 2
[budget]
{budget}
[[configs]]
name = "torch-cpu"
threads = 1
[[configs]]
name = "chainer-reused"
framework = "chainer"
threads = 1
params = {{ frame_buffers = "reused" }}
[[configs]]
name = "chainer-fresh"
framework = "chainer"
threads = 1
params = {{ frame_buffers = "fresh" }}
"""


@pytest.mark.chainer
@pytest.mark.parametrize("wname", ["autoencoder", "prednet"])
def test_devicediff_run_stores_chainer_runs(chainer_py, tmp_path, wname):
    if wname == "autoencoder":
        wl = 'name = "autoencoder"\nsizes = [32, 8]\nbatch_size = 50\ntrain_size = 500\neval_size = 200'
        budget = "epochs = 1\nmetric_every = 5"
    else:
        wl = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"name": "prednet", **TINY_PN}.items())
        budget = "steps = 4\nmetric_every = 2\neval_every_steps = 2"
    study = tmp_path / "s.toml"
    study.write_text(STUDY.format(name=f"chainer-{wname}", workload=wl, budget=budget))
    r = devicediff("run", str(study), "--store", str(tmp_path / "s.db"), "-q", "-j", "2", cwd=tmp_path,
                   env={chainer_env.PYTHON_ENV: chainer_py})
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(tmp_path / "s.db")
    runs = con.execute("select run_id, config, seed, state, error, init_sha256, final_sha256, effective from runs").fetchall()
    assert len(runs) == 6
    assert all(state == "finished" for _, _, _, state, _, _, _, _ in runs), [(c, e) for _, c, _, _, e, _, _, _ in runs]
    by_seed: dict = {}
    for rid, cfg, seed, _, _, init, final, eff in runs:
        by_seed.setdefault(seed, {})[cfg] = init
        n = con.execute("select count(*) from metrics where run_id = ? and name = 'train_loss'", (rid,)).fetchone()[0]
        assert n >= 2
        assert con.execute("select count(*) from weights where run_id = ?", (rid,)).fetchone()[0] >= 2
        if cfg.startswith("chainer"):
            eff = json.loads(eff)
            assert eff["framework"] == "chainer" and eff["asarray_aliases_host_buffer"] == (cfg == "chainer-reused")
    for seed, inits in by_seed.items():
        assert len(set(inits.values())) == 1, inits  # one init hash per seed, across frameworks
    assert by_seed[0]["torch-cpu"] != by_seed[1]["torch-cpu"]
    if wname == "prednet":
        import matplotlib.image

        arts = con.execute("select path from artifacts where name = 'prediction_grid'").fetchall()
        assert len(arts) == 6
        img = matplotlib.image.imread(arts[0][0])
        assert img.shape[0] > 16 and img.shape[1] > 16


ADAM = """
import numpy as np, chainer
from devicediff.frameworks.chainer.common import make_adam
out = {}
for formula in ("pytorch", "chainer"):
    p = chainer.Parameter(np.array(P["w"], np.float32))
    link = chainer.Link()
    with link.init_scope():
        link.w = p
    opt = make_adam(formula, 1e-3)
    opt.setup(link)
    for g in P["grads"]:
        p.grad = np.array(g, np.float32)
        opt.update()
    out[formula] = p.array.tolist()
print(json.dumps(out))
"""


@pytest.mark.chainer
def test_adam_formulas(chainer_py):
    """``adam = "pytorch"`` is torch.optim.Adam to float32 rounding; Chainer's own Adam
    differs visibly for gradients near eps / sqrt(1 - beta2^t)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=6).astype(np.float32)
    grads = [(rng.normal(size=6) * np.array([1, 1e-2, 1e-4, 1e-5, 1e-6, 1e-7])).astype(np.float32) for _ in range(3)]
    r = in_chainer(chainer_py, ADAM, {"w": w.tolist(), "grads": [g.tolist() for g in grads]})
    t = torch.nn.Parameter(torch.from_numpy(w.copy()))
    opt = torch.optim.Adam([t], lr=1e-3)
    for g in grads:
        t.grad = torch.from_numpy(g)
        opt.step()
    ref = t.detach().numpy()
    np.testing.assert_allclose(r["pytorch"], ref, rtol=0, atol=1e-7)
    assert np.max(np.abs(np.array(r["chainer"]) - ref)) > 1e-5  # the 1e-6, 1e-7 gradients move less


@pytest.mark.chainer
def test_diverge_finds_the_reused_buffer_bug_at_step_one(chainer_py, tmp_path, monkeypatch):
    """`devicediff diverge` against PyTorch: Chainer with fresh buffers (and PyTorch's Adam
    formula) differs by rounding only; with the original loop's reused buffers the first
    step's gradients are beyond rounding."""
    from devicediff.diverge.lockstep import diverge
    from devicediff.study import load_study

    monkeypatch.setenv(chainer_env.PYTHON_ENV, chainer_py)
    wl = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"name": "prednet", **{**TINY_PN, "window": 4}}.items())
    study = tmp_path / "d.toml"
    study.write_text(STUDY.format(name="chainer-diverge", workload=wl, budget="steps = 2")
                     .replace('frame_buffers = "reused"', 'frame_buffers = "reused", adam = "pytorch"')
                     .replace('frame_buffers = "fresh"', 'frame_buffers = "fresh", adam = "pytorch"'))
    s = load_study(study)
    fresh = diverge(s, "torch-cpu", "chainer-fresh", steps=2, workdir=tmp_path / "f")["summary"]
    assert fresh["verdict"] in ("rounding", "identical"), fresh["line"]
    reused = diverge(s, "torch-cpu", "chainer-reused", steps=1, workdir=tmp_path / "r")["summary"]
    fb = reused["first_beyond"]
    assert reused["verdict"] == "beyond rounding" and fb["step"] == 1 and fb["kind"] == "grad", reused["line"]
    # the operation pass: the Chainer side's own per-function check names the loss's backward
    ops = reused["ops"]
    assert ops["step"] == 1 and ops["named"]["side"] == "B", ops["line"]
    assert ops["named"]["op"] == "MeanSquaredError" and ops["named"]["index"] == 1, ops["line"]
    assert "per function node: step 1: saved input 1 of MeanSquaredError" in ops["line"], ops["line"]
    assert "mean_squared_error" in ops["named"]["code"]
