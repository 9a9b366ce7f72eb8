"""Warm workers (one process runs a config's cells one after another) give the bits of one
process per run, on every config axis this CPU machine has; the reset between runs is what makes
them equal; a worker that dies loses only its run; configs that cannot be reset run isolated.

Tiny synthetic runs (tests/executors/synthetic.py): the cost is process start-up, about 20
processes in all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devicediff.executors import local as local_mod
from devicediff.executors.base import Task, worker_env
from devicediff.executors.local import LocalExecutor, run_worker
from devicediff.executors.warm import isolation_reason, run_session, warm_key
from devicediff.job import Job, Lockstep
from devicediff.worker import NO_RESET_ENV

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import study_toml  # noqa: E402

WORKLOAD = f"{HERE / 'synthetic.py'}:make"
# What a run reports that may differ between two processes without the run differing.
VOLATILE = ("placement",)


def settings(eff: dict) -> dict:
    """Effective settings to compare: without the placement; BLAS pools in a fixed order (the
    order threadpoolctl lists them in varies from process to process, whatever ran before)."""
    out = {k: v for k, v in eff.items() if k not in VOLATILE}
    if isinstance(out.get("blas_pools"), list):
        out["blas_pools"] = sorted(out["blas_pools"], key=lambda p: json.dumps(p, sort_keys=True))
    return out


def make_job(tmp: Path, run_id: str, config: dict, seed: int = 0, **params) -> Job:
    d = tmp / run_id
    d.mkdir(parents=True, exist_ok=True)
    return Job(run_id=run_id, workload=WORKLOAD, workload_params={"noisy": True, **params},
               config={"name": run_id, "threads": 1, **config}, init_seed=seed, data_seed=seed,
               budget={"steps": 12, "metric_every": 4, "eval_every_steps": 6}, artifact_dir=str(d), snapshots=False)


def make_task(job: Job, tmp: Path) -> Task:
    return Task(run_id=job.run_id, job=job, cpus=1, gpus=0, log_path=str(tmp / f"{job.run_id}.log"))


def outcome(recs: list[dict]) -> dict:
    """What must be equal between a warm and an isolated run: state, hashes, metrics, settings."""
    done = [r for r in recs if r["kind"] == "done"][-1]
    eff = [r for r in recs if r["kind"] == "effective"][-1]["settings"]
    return {
        "state": (done["state"], done.get("error")),
        "final": done.get("final_sha256"),
        "init": [r["sha256"] for r in recs if r["kind"] == "init"],
        "metrics": sorted(tuple(row) for r in recs if r["kind"] == "metrics" for row in r["rows"]),
        "effective": settings(eff),
    }


def env_for(job: Job) -> dict:
    # deterministic configs add CUBLAS_WORKSPACE_CONFIG; give every process the same environment
    return worker_env(job, base={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})


def run_isolated(jobs: list[Job], tmp: Path) -> dict[str, dict]:
    out = {}
    for job in jobs:
        recs: list[dict] = []
        run_worker(make_task(job, tmp / "iso"), env_for(job), None, recs.append)
        out[job.run_id] = outcome(recs)
    return out


def run_warm(jobs: list[Job], tmp: Path, env: dict | None = None) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """All ``jobs`` in one warm worker, in this order; returns outcomes and raw records."""
    recs: dict[str, list[dict]] = {}
    tasks = [make_task(j, tmp / "warm") for j in jobs]
    rest = iter(tasks[1:])
    run_session(tasks[0], lambda: next(rest, None), {**env_for(jobs[0]), **(env or {})}, None,
                lambda t, r: recs.setdefault(t.run_id, []).append(r))
    return {k: outcome(v) for k, v in recs.items()}, recs


def worker_info(recs: list[dict]) -> dict:
    """The worker a run ran in (the executor merges it into every later ``effective`` record)."""
    return [r for r in recs if r["kind"] == "effective" and "worker" in r["settings"].get("placement", {})][-1][
        "settings"]["placement"]["worker"]


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for d in ("iso", "warm"):
        (tmp_path / d).mkdir()
    return tmp_path


# -- through the executor, every CPU axis ------------------------------------------------------------


CPU_AXES = [
    {"name": "cpu-2t", "threads": 2},
    {"name": "deterministic", "threads": 1, "deterministic": True},
    {"name": "matmul-medium", "threads": 1, "matmul_precision": "medium"},
    {"name": "bf16-autocast", "threads": 1, "precision": "bf16-autocast"},
]


def _study_runs(study_path: Path, db: Path, jobs: int = 2, **executor) -> dict[str, dict]:
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    with open_store(str(db)) as s:
        run_study(load_study(study_path), s, store_path=str(db), executor=LocalExecutor(jobs=jobs, pin_cores=True, **executor))
        runs = s.runs()
        metrics = s.metrics()
    out = {}
    for _, r in runs.iterrows():
        m = metrics[metrics["run_id"] == r["run_id"]]
        eff = r["effective"] or {}
        out[r["cell_key"]] = {
            "state": (r["state"], r["error"]), "final": r["final_sha256"], "init": r["init_sha256"],
            "metrics": sorted(zip(m["step"], m["name"], m["value"])),
            "effective": settings(eff),
            "worker": (eff.get("placement") or {}).get("worker"),
        }
    return out


def test_warm_workers_give_the_bits_of_one_process_per_run_on_every_cpu_axis(tmp_path):
    study = tmp_path / "axes.toml"
    study.write_text(study_toml("axes", seeds=2, steps=12, params={"noisy": True}, configs=CPU_AXES,
                                budget={"eval_every_steps": 6}))
    warm = _study_runs(study, tmp_path / "warm.db", jobs=1)  # one slot: each config's two cells in one worker
    isolated = _study_runs(study, tmp_path / "isolated.db", isolate=True)
    assert set(warm) == set(isolated) and len(warm) == 2 * len(CPU_AXES)
    for key in warm:
        w, i = dict(warm[key]), dict(isolated[key])
        assert i.pop("worker")["mode"] == "isolated"
        assert w.pop("worker")["mode"] == "warm", key
        assert w["state"][0] == "finished", (key, w["state"])
        assert w == i, key  # final weights, every metric and every setting that took effect
    # every config's second cell really ran in a process that had run the first
    runs_in_process = sorted(warm[f"{c['name']}|seed={s}|rep=0"]["worker"]["process_run"] for c in CPU_AXES for s in (0, 1))
    assert runs_in_process == [0] * len(CPU_AXES) + [1] * len(CPU_AXES)
    assert warm["bf16-autocast|seed=0|rep=0"]["effective"].get("precision") == "bf16-autocast"


def test_compile_warm_equals_isolated(tmp_path):
    """torch.compile on the CPU (inductor writes C++): the second run recompiles after the reset."""
    study = tmp_path / "compile.toml"
    study.write_text(study_toml("compiled", seeds=2, steps=8, params={"noisy": True},
                                configs=[{"name": "compiled", "threads": 1, "compile": True}]))
    warm = _study_runs(study, tmp_path / "warm.db")
    if any(v["state"][0] == "skipped" for v in warm.values()):
        pytest.skip(f"compile unavailable here: {next(iter(warm.values()))['state'][1]}")
    isolated = _study_runs(study, tmp_path / "isolated.db", isolate=True)
    for key in warm:
        w, i = dict(warm[key]), dict(isolated[key])
        w.pop("worker"), i.pop("worker")
        assert w["state"][0] == "finished" and w == i, key


# -- the reset, run by run ------------------------------------------------------------------------------


def test_the_reset_stops_one_run_leaking_into_the_next(dirs):
    """One worker runs a plain job after each of several configs that would leak into it without the
    reset (matmul precision, deterministic mode, autocast, the cuDNN benchmark flag, a workload that
    leaves float64 as the default dtype); every plain run must equal the plain job in a fresh
    process. The same order without the reset gives other bits."""
    leaky = [
        make_job(dirs, "medium", {"matmul_precision": "medium"}),
        make_job(dirs, "deterministic", {"deterministic": True}),
        make_job(dirs, "bf16", {"precision": "bf16-autocast"}),
        # A study refuses cudnn_benchmark on the CPU (a no-op there); a job still sets the flag.
        make_job(dirs, "benchmark", {"cudnn_benchmark": True}),
        make_job(dirs, "leaky", {}, leak=True),
    ]
    plain = make_job(dirs, "plain", {})
    after = [plain.with_(run_id=f"after-{j.run_id}", artifact_dir=str(dirs / f"after-{j.run_id}")) for j in leaky]
    order = [plain] + [j for pair in zip(leaky, after) for j in pair]
    warm, recs = run_warm(order, dirs)
    (reference,) = run_isolated([plain], dirs).values()
    assert [worker_info(recs[j.run_id])["process_run"] for j in order] == list(range(len(order)))
    assert all(o["state"][0] == "finished" for o in warm.values()), {k: o["state"] for k, o in warm.items()}
    assert reference["state"][0] == "finished"
    for j in [plain, *after]:
        assert warm[j.run_id] == reference, j.run_id

    for f in (dirs / "warm").iterdir():
        f.unlink()
    # (The backend itself puts back the flags a config sets, frameworks.torch.backend.reset_process_state;
    # what a workload leaves behind only the worker's reset puts back.)
    leaked, _ = run_warm([leaky[4], after[4]], dirs, env={NO_RESET_ENV: "1"})
    assert leaked["after-leaky"]["init"] != reference["init"]  # a float64 model


def test_a_worker_that_dies_loses_only_its_run(tmp_path):
    """SIGKILL the warm worker in its second run: that run fails, the third runs in a fresh worker."""
    study_dir = tmp_path
    jobs = [make_job(study_dir, f"s{i}", {"name": "slow"}, seed=i, step_delay=0.05) for i in range(3)]
    tasks = [make_task(j, study_dir) for j in jobs]
    got: dict[str, list[dict]] = {}
    for task, rec in LocalExecutor(jobs=1).execute(tasks):
        got.setdefault(task.run_id, []).append(rec)
        if rec["kind"] == "started" and rec.get("process_run") == 1:
            os.kill(rec["pid"], signal.SIGKILL)
    states = {k: [r for r in v if r["kind"] == "done"] for k, v in got.items()}
    assert [len(states[t.run_id]) for t in tasks] == [1, 1, 1]
    assert states["s0"][0]["state"] == "finished" and states["s2"][0]["state"] == "finished"
    assert states["s1"][0]["state"] == "failed" and "SIGKILL" in states["s1"][0]["error"]
    w0, w2 = worker_info(got["s0"]), worker_info(got["s2"])
    assert w2["pid"] != w0["pid"] and w2["process_run"] == 0


# -- which configs stay warm ------------------------------------------------------------------------------


def _task(config: dict, **job) -> Task:
    j = Job(run_id="r", workload="w", config={"name": "c", **config}, init_seed=0, data_seed=0,
            budget={"steps": 1}, **job)
    return Task(run_id="r", job=j, cpus=1, gpus=1 if str(config.get("device", "")).startswith("cuda") else 0,
                log_path="/dev/null")


@pytest.mark.parametrize("config, job, isolated", [
    ({}, {}, False),
    ({"threads": 4, "deterministic": True, "matmul_precision": "high", "tf32": False}, {}, False),
    ({"compile": True}, {}, False),
    ({"precision": "bf16-autocast", "grad_noise": {"relative": 1e-7}}, {}, False),
    ({"cudnn_benchmark": True}, {}, False),  # CPU: nothing to cache
    ({"python": "/opt/old/bin/python", "packages": ["torch==2.4.1"]}, {}, False),  # its own torch, still warm
    ({"device": "cuda", "cudnn_benchmark": True}, {}, True),
    ({"device": "cuda", "cuda_graphs": True}, {}, True),
    ({"compile": "reduce-overhead"}, {}, True),
    ({"compile": "max-autotune"}, {}, True),
    ({"framework": "chainer"}, {}, True),
    ({}, {"lockstep": Lockstep(steps=2, dir="/tmp/x")}, True),
])
def test_isolation_rule(config, job, isolated):
    reason = isolation_reason(_task(config, **job))
    assert (reason is not None) == isolated, reason


def test_warm_key_separates_what_is_fixed_at_process_start():
    a, b = _task({"threads": 1}), _task({"threads": 2})
    assert warm_key(a) == warm_key(_task({"threads": 1})) != warm_key(b)


def test_fallback_configs_run_one_process_per_run_and_say_so(monkeypatch, tmp_path):
    """Fake workers: a cuda_graphs config never reaches a warm session; its placement says why."""
    sessions, singles = [], []

    def single(task, env, cores, emit, on_start=None):
        singles.append(task.run_id)
        emit({"kind": "effective", "settings": {}})
        emit({"kind": "done", "state": "finished"})

    def session(first, next_task, env, cores, emit, on_start=None):
        task = first
        while task is not None:
            sessions.append(task.run_id)
            emit(task, {"kind": "effective", "settings": {"placement": {"worker": {"mode": "warm", "process_run": 0}}}})
            emit(task, {"kind": "done", "state": "finished"})
            task = next_task()

    monkeypatch.setattr(local_mod, "run_worker", single)
    monkeypatch.setattr(local_mod, "run_session", session)
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: ["0"])
    tasks = []
    for i, cfg in enumerate([{"name": "graphs", "device": "cuda", "cuda_graphs": True}] * 2 + [{"name": "plain"}] * 2):
        t = _task(cfg)
        tasks.append(Task(**{**t.__dict__, "run_id": f"r{i}", "log_path": str(tmp_path / f"r{i}.log")}))
    ex = LocalExecutor(jobs=1)
    recs: dict[str, list[dict]] = {}
    for task, rec in ex.execute(tasks):
        recs.setdefault(task.run_id, []).append(rec)
    assert singles == ["r0", "r1"] and sessions == ["r2", "r3"]
    worker = [r for r in recs["r0"] if r["kind"] == "effective"][-1]["settings"]["placement"]["worker"]
    assert worker["mode"] == "isolated" and "cuda_graphs" in worker["reason"]
    assert set(ex.fallbacks) == {"graphs"}
    done = [r for r in recs["r2"] if r["kind"] == "done"][0]
    assert "store" in done["timing"]  # the parent's time on this run's records


def test_isolate_runs_every_run_in_a_fresh_process(monkeypatch, tmp_path):
    singles = []

    def single(task, env, cores, emit, on_start=None):
        singles.append(task.run_id)
        emit({"kind": "done", "state": "finished"})

    monkeypatch.setattr(local_mod, "run_worker", single)
    monkeypatch.setattr(local_mod, "run_session", lambda *a, **k: pytest.fail("a warm session with --isolate"))
    tasks = [Task(**{**_task({}).__dict__, "run_id": f"r{i}", "log_path": str(tmp_path / "l")}) for i in range(3)]
    list(LocalExecutor(isolate=True).execute(tasks))
    assert singles == ["r0", "r1", "r2"]


# -- the single-job mode ---------------------------------------------------------------------------------------


def test_single_job_mode_reads_a_job_written_over_several_lines(tmp_path):
    """``python -m devicediff.worker < job.json`` as before: one job, then the end of input."""
    job = make_job(tmp_path, "one", {})
    r, w = os.pipe()
    env = {**env_for(job), "DEVICEDIFF_RECORD_FD": str(w)}
    proc = subprocess.run([sys.executable, "-m", "devicediff.worker"], input=json.dumps(json.loads(job.to_json()), indent=2),
                          text=True, env=env, pass_fds=(w,), capture_output=True, timeout=120)
    os.close(w)
    with os.fdopen(r) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert proc.returncode == 0, proc.stderr
    done = recs[-1]
    assert done["kind"] == "done" and done["state"] == "finished", done
    assert set(done["timing"]) >= {"startup", "import", "setup", "train", "eval", "checkpoint", "finish"}
