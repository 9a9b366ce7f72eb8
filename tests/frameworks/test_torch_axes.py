"""The axes a PyTorch config can turn (docs/axes.md): precision, compile, CUDA graphs and gradient
noise, run in process through the one training driver on a tiny real-MNIST autoencoder; one end-to-end
``devicediff run`` for bf16 on the CPU. GPU tests are marked ``gpu``."""

from __future__ import annotations

import io
import json
import sqlite3
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import devicediff  # noqa: E402
from devicediff.errors import StudyError  # noqa: E402
from devicediff.frameworks import _driver  # noqa: E402
from devicediff.frameworks.torch.backend import (  # noqa: E402
    GradNoise, TorchBackend, check_precision, random_draw_notes,
)
from devicediff.job import Job  # noqa: E402
from devicediff.protocol import RecordWriter, Skip, read_records  # noqa: E402
from devicediff.study import parse_study  # noqa: E402

TINY_PARAMS = {"sizes": [16, 4], "batch_size": 20, "train_size": 200, "eval_size": 100}
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def make_job(tmp_path, config: dict, *, steps: int = 6, params: dict | None = None, **fields) -> Job:
    return Job(run_id="t", workload="autoencoder", config={"name": "c", "device": "cpu", "threads": 1, **config},
               init_seed=0, data_seed=0, budget={"steps": steps, "metric_every": 1},
               workload_params={**TINY_PARAMS, **(params or {})}, artifact_dir=str(tmp_path / "art"),
               snapshots=False, **fields)


def train(job: Job) -> tuple[TorchBackend, list[dict]]:
    """Train ``job`` in this process; return the backend and its records."""
    out = io.StringIO()
    b = TorchBackend(job, RecordWriter(out))
    _driver.train(b, time.perf_counter())
    return b, list(read_records(out.getvalue().splitlines()))


def effective(records: list[dict]) -> dict:
    return [r for r in records if r["kind"] == "effective"][-1]["settings"]


def final_sha(records: list[dict]) -> str:
    done = records[-1]
    assert done["kind"] == "done" and done["state"] == "finished", done
    return done["final_sha256"]


# -- precision -------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu_trains_and_records_its_precision(tmp_path):
    _, fp32 = train(make_job(tmp_path, {}))
    _, bf16 = train(make_job(tmp_path, {"precision": "bf16-autocast"}))
    eff = effective(bf16)
    assert eff["precision"] == "bf16-autocast" and eff["autocast_dtype"] == "bfloat16"
    assert eff["eval_precision"] == "fp32" and "grad_scaler" not in eff
    assert effective(fp32)["precision"] == "fp32" and effective(fp32)["autocast_dtype"] is None
    assert final_sha(bf16) != final_sha(fp32)  # bf16 matmuls round differently


def test_fp16_is_refused_on_the_cpu():
    doc = {"workload": {"name": "autoencoder"}, "reference": "a",
           "configs": [{"name": "a"}, {"name": "b", "precision": "fp16-autocast"}], "budget": {"steps": 1}}
    with pytest.raises(StudyError, match="fp16-autocast needs a GPU"):
        parse_study(doc)
    with pytest.raises(Skip, match="needs a GPU"):  # a job built by hand meets the worker's own check
        check_precision("fp16-autocast", torch.device("cpu"))


def test_bf16_cpu_end_to_end_through_devicediff_run(tiny_study, tmp_path):
    extra = '[[configs]]\nname = "cpu-bf16"\nthreads = 1\nprecision = "bf16-autocast"\n'
    study = tiny_study("bf16", seeds=1, extra=extra)
    r = devicediff("run", str(study), "--store", str(tmp_path / "s.db"), "--only", "cpu-1t", "--only", "cpu-bf16",
                   "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = sqlite3.connect(tmp_path / "s.db").execute("select state, effective, config_json from runs").fetchall()
    by_name = {json.loads(c)["name"]: (s, json.loads(e)) for s, e, c in rows}
    state, eff = by_name["cpu-bf16"]
    assert state == "finished" and eff["precision"] == "bf16-autocast" and eff["autocast_dtype"] == "bfloat16"


# -- compile ---------------------------------------------------------------------------------------------


def test_compile_mode_is_recorded_or_skipped_with_the_reason(tmp_path):
    """In a worker process of its own, as in a study (inductor in this test process would meet
    whatever other tests imported, e.g. distutils)."""
    study = tmp_path / "c.toml"
    study.write_text(
        'name = "c"\nreference = "eager"\nseeds = 1\n[workload]\nname = "autoencoder"\nsizes = [16, 4]\n'
        'train_size = 300\neval_size = 100\n[budget]\nsteps = 3\n[[configs]]\nname = "eager"\nthreads = 1\n'
        '[[configs]]\nname = "compiled"\nthreads = 1\ncompile = true\n')
    r = devicediff("run", str(study), "--store", str(tmp_path / "c.db"), "-q", cwd=tmp_path)
    rows = dict(sqlite3.connect(tmp_path / "c.db").execute(
        "select config, json_object('state', state, 'error', error, 'effective', json(effective)) from runs"))
    compiled = json.loads(rows["compiled"])
    if compiled["state"] == "skipped":
        assert "C++ compiler" in compiled["error"]
        return
    assert r.returncode == 0, r.stderr
    assert compiled["state"] == "finished" and compiled["effective"]["compile"] == "default"
    assert json.loads(rows["eager"])["effective"]["compile"] in (False, None)
    detail = compiled["effective"]["compile_detail"]  # what was compiled, recorded with the run
    assert detail["graphs"] >= 1 and detail["graph_breaks"] == 0 and detail["frames_not_compiled"] == 0, detail
    assert not any(w.startswith("compile:") for w in compiled["effective"]["warnings"])
    assert "compile_detail" not in json.loads(rows["eager"])["effective"]


def test_compile_report_names_graph_breaks_and_code_left_uncompiled():
    """A model Dynamo splits (a print) and a function it gives up on (its recompile limit): the run's record
    says so, rather than calling a partly eager run compiled (real Dynamo, its eager backend)."""
    from devicediff.frameworks.torch.backend import compile_report, dynamo_counts

    def split(x):
        y = x * 2
        print("", end="")  # Dynamo cannot trace print: a graph break
        return y.sin()

    def scaled(x, k):
        return x * k

    before = dynamo_counts()
    try:
        torch.compile(split, backend="eager")(torch.ones(3))
        with torch._dynamo.config.patch(recompile_limit=1):
            f = torch.compile(scaled, backend="eager", dynamic=False)
            for k in range(3):
                assert torch.equal(f(torch.ones(2), k), torch.full((2,), float(k)))
        detail, warnings = compile_report(before, dynamo_counts())
    finally:
        torch._dynamo.reset()
    assert detail["graph_breaks"] >= 1 and any("print" in r for r in detail["break_reasons"]), detail
    assert detail["frames_not_compiled"] >= 1 and any("recompile limit" in r for r in detail["not_compiled_reasons"])
    assert any("part of the model ran uncompiled" in w for w in warnings)
    assert any("graph break" in w for w in warnings)
    assert compile_report(dynamo_counts(), dynamo_counts()) == (
        {"graphs": 0, "graph_breaks": 0, "break_reasons": {}, "frames_not_compiled": 0, "not_compiled_reasons": {}}, [])


def test_compile_report_counts_several_reasons_of_one_kind():
    """Two different graph-break reasons in one run, and two raw reasons that shorten to the same line."""
    from devicediff.frameworks.torch.backend import compile_report

    base = {"frames": 0, "compiled": 0, "graphs": 0, "breaks": {}, "given_up": {}}
    now = {"frames": 3, "compiled": 3, "graphs": 4, "given_up": {},
           "breaks": {"print\nExplanation: cannot trace": 1, "item()": 2,
                      "print\nExplanation: cannot trace\nHint: other text": 3}}
    detail, warnings = compile_report(base, now)
    assert detail["break_reasons"] == {"print: cannot trace": 4, "item()": 2}
    assert detail["graph_breaks"] == 6 and warnings == [
        "compile: 6 graph break(s) (print: cannot trace; item()): the model was compiled in pieces, "
        "with uncompiled Python between them"]


def test_cuda_graphs_refused_where_the_step_cannot_be_captured(tmp_path):
    job = make_job(tmp_path, {"device": "cpu"})
    b = TorchBackend(job, RecordWriter(io.StringIO()))
    b.use_lr = True
    from devicediff.frameworks.torch.backend import graph_obstacle

    assert "learning-rate schedule" in graph_obstacle(b)


# -- gradient noise ----------------------------------------------------------------------------------


def test_grad_noise_is_reproducible_and_changes_the_weights(tmp_path):
    noisy = {"grad_noise": {"relative": 1e-3}}
    _, a = train(make_job(tmp_path, noisy, noise_seed=5))
    _, b = train(make_job(tmp_path, noisy, noise_seed=5))
    _, c = train(make_job(tmp_path, noisy, noise_seed=6))
    _, clean = train(make_job(tmp_path, {}))
    assert final_sha(a) == final_sha(b)  # same seed, same bits
    assert len({final_sha(a), final_sha(c), final_sha(clean)}) == 3
    eff = effective(a)
    assert eff["grad_noise"] == 1e-3 and eff["grad_noise_detail"]["seed"] == 5


def test_grad_noise_identical_for_one_and_two_threads(tmp_path):
    model = torch.nn.Linear(300, 200)
    draws = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        draws[n] = [GradNoise(model, 1e-7, 3).draw(name, p.shape, 11) for name, p in model.named_parameters()]
    for x, y in zip(draws[1], draws[2]):
        assert torch.equal(x, y)
    noisy = {"grad_noise": {"relative": 1e-3}}
    _, one = train(make_job(tmp_path, {**noisy, "threads": 1}))
    _, two = train(make_job(tmp_path, {**noisy, "threads": 2}))
    _, one_clean = train(make_job(tmp_path, {"threads": 1}))
    _, two_clean = train(make_job(tmp_path, {"threads": 2}))
    # Where this model's arithmetic is the same for 1 and 2 threads, so is the noisy run's.
    if final_sha(one_clean) == final_sha(two_clean):
        assert final_sha(one) == final_sha(two)


def test_grad_noise_definition_per_element():
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = torch.linspace(-1, 1, 1000)
    p.grad[500] = 0.0
    g0 = p.grad.clone()
    noise = GradNoise(torch.nn.ParameterDict({"w": p}), 0.1, 0)
    noise.apply(step=0)
    z = noise.draw("w", (1000,), 0)
    assert torch.allclose(p.grad, g0 + 0.1 * g0.abs() * z, rtol=0, atol=1e-6)  # addcmul rounds once
    assert p.grad[500] == 0  # no gradient, no noise
    assert 0.08 < float(((p.grad - g0)[g0 != 0] / g0.abs()[g0 != 0]).std()) < 0.12


# -- random draws: the recorded notes ------------------------------------------------------------------


def test_cpu_dropout_is_info_not_a_warning(tmp_path):
    _, recs = train(make_job(tmp_path, {}, params={"dropout": 0.2}))
    eff = effective(recs)
    assert eff["warnings"] == []
    assert eff["random_draws"]["generators"] == ["cpu"]
    assert "drops.0: Dropout" in eff["random_draws"]["modules"]
    assert "CPU generator" in eff["random_draws"]["cpu"]


def test_no_dropout_draws_nothing_and_keeps_its_bits(tmp_path):
    _, plain = train(make_job(tmp_path, {}))
    _, zero = train(make_job(tmp_path, {}, params={"dropout": 0.0}))
    assert final_sha(plain) == final_sha(zero)
    assert effective(plain)["random_draws"] == {"generators": []} and effective(plain)["warnings"] == []


def test_device_generator_draws_are_warned():
    info, warnings = random_draw_notes(["cpu", "cuda:0"], [("drops.0", "Dropout")])
    assert info["generators"] == ["cpu", "cuda:0"] and "cpu" in info
    assert warnings == ["cuda:0: draws random numbers on the device during training (module drops.0: Dropout); "
                        "configs on other devices are not paired"]


# -- on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16-autocast"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_autocast_runs(tmp_path, precision):
    _, recs = train(make_job(tmp_path, {"device": "cuda", "precision": precision}, steps=20))
    eff = effective(recs)
    assert eff["precision"] == precision and final_sha(recs)
    assert ("grad_scaler" in eff) == (precision == "fp16-autocast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp16_checkpoint_resume_keeps_the_scaler(tmp_path):
    job = make_job(tmp_path, {"device": "cuda", "precision": "fp16-autocast"}, steps=8)
    _, whole = train(job)
    assert final_sha(whole) == final_sha(_resumed(tmp_path, job, at=4))


def _resumed(tmp_path, job: Job, at: int) -> list[dict]:
    """Train ``at`` steps, checkpoint, then a fresh backend resumes to the end: its records."""
    ck = str(tmp_path / "ck.pt")
    job = job.with_(checkpoint_path=ck)
    b = TorchBackend(job, RecordWriter(io.StringIO()))
    for step, batch in _driver.batches_from(b.workload, job.data_seed, b.steps_per_epoch, 0, at):
        b.train_step(step, batch)
    b.write_checkpoint(ck, at)
    return train(job)[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graphs_capture_and_match_eager_capturable(tmp_path):
    _, graphed = train(make_job(tmp_path, {"device": "cuda", "cuda_graphs": True, "deterministic": True}, steps=8))
    eff = effective(graphed)
    assert eff["cuda_graphs"] is True and eff["cuda_graphs_detail"]["captured_at_step"] == 3
    _, noisy = train(make_job(tmp_path, {"device": "cuda", "cuda_graphs": True, "grad_noise": {"relative": 1e-3}},
                              steps=8))
    assert final_sha(noisy) != final_sha(graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_device_dropout_is_warned(tmp_path):
    _, recs = train(make_job(tmp_path, {"device": "cuda"}, params={"dropout": 0.2}))
    warnings = effective(recs)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("cuda:0: draws random numbers on the device")
    assert "drops.0: Dropout" in warnings[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_grad_noise_same_draws_as_cpu(tmp_path):
    model = torch.nn.Linear(64, 32)
    cpu = GradNoise(model, 1e-7, 1)
    gpu_noise = GradNoise(model.to("cuda"), 1e-7, 1)
    for (name, p), (_, q) in zip(cpu.params, gpu_noise.params):
        assert np.array_equal(cpu.draw(name, p.shape, 4).numpy(), gpu_noise.draw(name, q.shape, 4).numpy())
