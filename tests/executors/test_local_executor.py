"""LocalExecutor: how it shares out cores and GPUs (fake workers), and that
parallel runs give the same bits as one-at-a-time runs (real workers)."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from devicediff.executors import local as local_mod
from devicediff.executors.base import Task
from devicediff.executors.local import LocalExecutor, place_job
from devicediff.job import Job

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import study_toml  # noqa: E402


def job_for(run_id: str, **config) -> Job:
    return Job(run_id=run_id, workload="w", config=config, init_seed=0, data_seed=0, budget={"steps": 1})


def make_task(i: int, *, threads: int = 1, device: str = "cpu", tmp: Path) -> Task:
    job = job_for(f"r{i}", device=device, threads=threads)
    return Task(run_id=f"r{i}", job=job, cpus=threads, gpus=1 if device.startswith("cuda") else 0,
                log_path=str(tmp / f"r{i}.log"))


class FakeWorkers:
    """Stands in for ``run_worker``: records what each run was given and how many ran at once."""

    def __init__(self, duration: float = 0.05):
        self.duration = duration
        self.lock = threading.Lock()
        self.running: dict[str, dict] = {}
        self.seen: list[dict] = []
        self.max_running = 0
        self.overlaps: list[tuple[set, set]] = []

    def __call__(self, task, env, cores, emit, on_start=None):
        info = {"run_id": task.run_id, "cores": set(cores or []), "cvd": env.get("CUDA_VISIBLE_DEVICES"),
                "device": task.job.device, "omp": env.get("OMP_NUM_THREADS")}
        with self.lock:
            for other in self.running.values():
                if info["cores"] & other["cores"]:
                    self.overlaps.append((info["cores"], other["cores"]))
            self.running[task.run_id] = info
            self.seen.append(info)
            self.max_running = max(self.max_running, len(self.running))
        emit({"kind": "effective", "settings": {"device": task.job.device}})
        time.sleep(self.duration)
        with self.lock:
            del self.running[task.run_id]
        emit({"kind": "done", "state": "finished", "final_sha256": "x"})

    def session(self, first, next_task, env, cores, emit, on_start=None):
        """Stands in for ``run_session``: the warm worker's tasks, one after another."""
        task = first
        while task is not None:
            self(task, env, cores, lambda rec: emit(task, rec))  # noqa: B023 - called at once
            self.sessions.setdefault(id(emit), []).append(task.run_id)
            task = next_task()


@pytest.fixture
def fake(monkeypatch):
    fw = FakeWorkers()
    fw.sessions = {}
    monkeypatch.setattr(local_mod, "run_worker", fw)
    monkeypatch.setattr(local_mod, "run_session", fw.session)
    return fw


def run_all(executor, tasks):
    recs: dict[str, list[dict]] = {}
    for task, rec in executor.execute(tasks):
        recs.setdefault(task.run_id, []).append(rec)
    return recs


def test_cpu_runs_get_disjoint_cores_sized_to_threads(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(local_mod, "available_cores", lambda: list(range(8)))
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: [])
    tasks = [make_task(i, threads=t, tmp=tmp_path) for i, t in enumerate([4, 2, 2, 1, 3, 4, 1, 1])]
    recs = run_all(LocalExecutor(jobs=4), tasks)
    assert set(recs) == {t.run_id for t in tasks}
    assert all(r[-1]["kind"] == "done" for r in recs.values())
    assert not fake.overlaps, f"runs shared cores: {fake.overlaps}"
    by_id = {s["run_id"]: s for s in fake.seen}
    for t in tasks:
        assert len(by_id[t.run_id]["cores"]) == t.cpus
        assert by_id[t.run_id]["omp"] == str(t.cpus)
        assert by_id[t.run_id]["cvd"] == ""  # a CPU run never sees a GPU
    assert 1 < fake.max_running <= 4
    # placement is recorded in the run's effective settings
    eff = [r for r in recs["r0"] if r["kind"] == "effective"][-1]["settings"]
    assert eff["placement"]["cores"] == sorted(by_id["r0"]["cores"]) and eff["placement"]["executor"] == "local"


def test_a_run_bigger_than_the_machine_runs_alone_with_every_core(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(local_mod, "available_cores", lambda: [0, 1])
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: [])
    tasks = [make_task(0, threads=1, tmp=tmp_path), make_task(1, threads=6, tmp=tmp_path), make_task(2, threads=1, tmp=tmp_path)]
    run_all(LocalExecutor(jobs=3), tasks)
    by_id = {s["run_id"]: s for s in fake.seen}
    assert by_id["r1"]["cores"] == {0, 1}
    assert not fake.overlaps


def test_jobs_one_does_not_pin(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: [])
    run_all(LocalExecutor(jobs=1), [make_task(0, threads=1, tmp=tmp_path)])
    assert fake.seen[0]["cores"] == set() and fake.max_running == 1


def test_gpu_runs_share_gpus_by_slots(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(local_mod, "available_cores", lambda: list(range(16)))
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: ["0", "1"])
    fake.duration = 0.1
    tasks = [make_task(i, device="cuda", tmp=tmp_path) for i in range(8)]
    recs = run_all(LocalExecutor(jobs=8, slots_per_gpu=2), tasks)
    assert fake.max_running == 4  # 2 GPUs x 2 slots
    assert {s["cvd"] for s in fake.seen} == {"0", "1"}
    for s in fake.seen:
        assert s["device"] == "cuda:0"  # the one visible GPU
    eff = [r for r in recs["r0"] if r["kind"] == "effective"][-1]["settings"]["placement"]
    assert eff["requested_device"] == "cuda" and eff["gpu"] in ("0", "1")


def test_explicit_cuda_index_pins_that_gpu_and_rewrites_the_device(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(local_mod, "available_cores", lambda: list(range(16)))
    monkeypatch.setattr(local_mod, "visible_gpus", lambda: ["0", "1", "2"])
    tasks = [make_task(i, device="cuda:2", tmp=tmp_path) for i in range(3)] + [make_task(9, device="cuda:7", tmp=tmp_path)]
    recs = run_all(LocalExecutor(jobs=4, slots_per_gpu=1), tasks)
    for s in fake.seen:
        assert s["cvd"] == "2" and s["device"] == "cuda:0"
    assert fake.max_running == 1  # one slot on GPU 2
    place = [r for r in recs["r0"] if r["kind"] == "effective"][-1]["settings"]["placement"]
    assert place == {**place, "requested_device": "cuda:2", "device": "cuda:0", "gpu": "2", "cuda_visible_devices": "2"}
    assert recs["r9"] == [{"kind": "done", "state": "skipped", "error": "config asks for cuda:7 but this machine shows 3 GPU(s)"}]


def test_place_job_leaves_cpu_jobs_alone():
    job = job_for("c", device="cpu")
    assert place_job(job, None) == (job, {"requested_device": "cpu", "device": "cpu"})


def test_closing_early_kills_running_workers(tmp_path, monkeypatch):
    """A parent that stops reading (error, Ctrl-C) takes its workers down with it."""
    task = Task(run_id="s", job=job_for("s", device="cpu"), cpus=1, gpus=0, log_path=str(tmp_path / "s.log"),
                python=sys.executable)
    ex = LocalExecutor(jobs=1)
    monkeypatch.setattr(local_mod, "BOOT", "import time; time.sleep(60)")  # a worker that never reports
    gen = ex.execute([task])
    first = next(gen)  # the placement record: the worker is starting
    assert first[1]["kind"] == "effective"
    deadline = time.time() + 10
    while not ex._procs and time.time() < deadline:
        time.sleep(0.05)
    (proc,) = ex._procs.values()
    gen.close()
    assert proc.wait(timeout=10) == -9


# -- real workers ------------------------------------------------------------------------------


def _shas(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT cell_key, final_sha256 FROM runs WHERE state='finished'").fetchall())
    finally:
        con.close()


def run_inprocess(study_path: Path, db: Path, jobs: int) -> None:
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    with open_store(str(db)) as s:
        run_study(load_study(study_path), s, store_path=str(db), executor=LocalExecutor(jobs=jobs))


def test_jobs_two_gives_the_same_bits_as_one_at_a_time(tmp_path):
    configs = [{"name": "cpu-1t", "threads": 1}, {"name": "cpu-1t-b", "threads": 1}]
    study = tmp_path / "par.toml"
    study.write_text(study_toml("par", seeds=1, configs=configs, params={"noisy": True}))
    run_inprocess(study, tmp_path / "j1.db", jobs=1)
    run_inprocess(study, tmp_path / "j2.db", jobs=2)
    a, b = _shas(tmp_path / "j1.db"), _shas(tmp_path / "j2.db")
    assert len(a) == 2 and a == b
    from devicediff.store import open_store

    with open_store(str(tmp_path / "j2.db")) as s:
        for _, run in s.runs().iterrows():
            eff = run["effective"]
            # pinned: the worker saw exactly as many cores as it has threads
            assert eff["affinity_cores"] == run["config_json"]["threads"]
            assert len(eff["placement"]["cores"]) == run["config_json"]["threads"]

