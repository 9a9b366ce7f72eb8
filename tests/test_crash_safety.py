"""Crash safety: kill the runner at any moment, kill or break a worker, resume.

What must hold, whatever is killed and when:

- running the same command again completes the study;
- no finished run is lost, changed or duplicated, and no metric row is duplicated;
- ``PRAGMA integrity_check`` says ok;
- a worker whose runner died exits at once and writes nothing more;
- a resumed run goes on from its last checkpoint and ends with the same bits as
  an uninterrupted run (the configs here are deterministic);
- a run whose worker dies (SIGKILL, exception, NaN loss) is recorded as failed,
  with its reason, and the other runs go on.

The 20-kill test is ``slow`` (run it with ``pytest -m slow``).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, devicediff

sys.path.insert(0, str(ROOT / "tests" / "executors"))
from synthetic import study_toml  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
LAUNCHER = "import sys; sys.path.pop(0); from devicediff.cli import main; sys.exit(main())"  # as the console script


# -- helpers ---------------------------------------------------------------------------------------


def start_runner(study: Path, db: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    log = open(db.with_suffix(".runner.log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "run", str(study), "--store", str(db), "-q", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=db.parent, env={**ENV, **(env or {})},
    )


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the store the way a second process would, while the runner may be writing."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()


def finished(db: Path) -> dict[str, str]:
    return dict(query(db, "SELECT run_id, final_sha256 FROM runs WHERE state='finished'"))


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.05) -> bool:
    """Wait until ``cond()``; False if the runner exited first (or on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_runner(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the runner; return the workers it had, which must now die on their own."""
    workers = workers_of(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return workers


def assert_orphans_exit(workers: list[psutil.Process], timeout: float = 10.0) -> None:
    gone, alive = psutil.wait_procs(workers, timeout=timeout)
    assert not alive, f"orphaned workers still alive: {[p.pid for p in alive]}"


def assert_store_sound(db: Path) -> None:
    if not db.exists():  # killed before the store was created
        return
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    (n, distinct), = query(db, "SELECT count(*), count(DISTINCT run_id || '|' || step || '|' || name) FROM metrics") or [(0, 0)]
    assert n == distinct
    (runs, cells), = query(db, "SELECT count(*), count(DISTINCT study_id || cell_key || machine) FROM runs") or [(0, 0)]
    assert runs == cells


def run_inprocess(study: Path, db: Path, jobs: int = 1) -> None:
    """An uninterrupted reference store, run from this process."""
    from devicediff.executors import LocalExecutor
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    with open_store(str(db)) as s:
        run_study(load_study(study), s, store_path=str(db), executor=LocalExecutor(jobs=jobs))


def metric_rows(db: Path) -> set[tuple]:
    return set(query(db, "SELECT run_id, step, name, value FROM metrics"))


# -- resume from a checkpoint ---------------------------------------------------------------------------


def test_killed_runner_resumes_from_checkpoint_with_the_same_bits(tmp_path):
    study = tmp_path / "resume.toml"
    study.write_text(study_toml("resume", seeds=1, threads=(1,), steps=60, params={"noisy": True, "step_delay": 0.05},
                                budget={"checkpoint_every": 10, "metric_every": 2, "eval_every_steps": 20}))
    ref = tmp_path / "ref.db"
    run_inprocess(study, ref)

    db = tmp_path / "kill.db"
    trace = tmp_path / "trace.txt"
    env = {"DEVICEDIFF_TEST_TRACE": str(trace)}
    proc = start_runner(study, db, env=env)
    ckpts = lambda: list((tmp_path / "kill_artifacts").glob("*/checkpoint.pt"))  # noqa: E731
    assert wait_for(lambda: ckpts() and query(db, "SELECT 1 FROM metrics WHERE name='train_loss' AND step>=24"), proc)
    workers = kill_runner(proc)
    assert workers, "the runner had no worker to orphan"
    assert_orphans_exit(workers)
    # The orphan wrote nothing after its runner died: the store and the run's files stand still.
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "kill_artifacts").rglob("*")}
    rows = metric_rows(db)
    time.sleep(1.0)
    assert metric_rows(db) == rows
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "kill_artifacts").rglob("*")} == files
    assert query(db, "SELECT state FROM runs") == [("running",)]

    r = devicediff("run", str(study), "--store", str(db), "-q", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert finished(db) == finished(ref) and len(finished(db)) == 1
    assert metric_rows(db) == metric_rows(ref)  # every metric, bit for bit, none twice
    assert query(db, "SELECT attempts FROM runs") == [(2,)]
    assert_store_sound(db)
    steps_per_attempt = {}
    for pid in trace.read_text().split():
        steps_per_attempt[pid] = steps_per_attempt.get(pid, 0) + 1
    first, second = steps_per_attempt.values()
    # A resumed attempt trains 40 steps (from its step-20 checkpoint); the workload draws random
    # numbers, so each attempt's first step also runs the loss once more on a copy of the model
    # (the backend naming the modules that draw: watch_random_modules).
    assert first >= 24 and second <= 60 - 20 + 1, f"resumed run did not start from its checkpoint: {steps_per_attempt}"
    assert not list((tmp_path / "kill_artifacts").glob("*/checkpoint.pt*"))  # cleaned up at the end


# -- a failed worker is a result ----------------------------------------------------------------------------


def test_worker_deaths_are_recorded_and_the_others_go_on(tmp_path):
    # `--set lr=1e6` sets the study's learning rate; the configs that must not diverge set their own.
    sane = {"lr": 0.05}
    configs = [
        {"name": "ok", "threads": 1, "params": sane},
        {"name": "raises", "threads": 1, "params": {**sane, "fail_at_step": 3}},
        {"name": "nan", "threads": 1, "params": {"optimizer": "sgd"}},
        {"name": "killed", "threads": 1, "params": {**sane, "step_delay": 1.0}, "env": {"DD_TEST_ROLE": "victim"}},
    ]
    study = tmp_path / "deaths.toml"
    study.write_text(study_toml("deaths", seeds=1, steps=30, configs=configs))
    db = tmp_path / "d.db"
    proc = start_runner(study, db, "--jobs", "2", "--set", "lr=1e6")

    def victim() -> psutil.Process | None:
        for p in workers_of(proc):
            try:
                if p.environ().get("DD_TEST_ROLE") == "victim":
                    return p
            except psutil.Error:
                pass
        return None

    assert wait_for(lambda: victim() is not None and query(db, "SELECT 1 FROM runs WHERE config='killed' AND fingerprint IS NOT NULL"), proc)
    victim().send_signal(signal.SIGKILL)
    # Exit code 3 (devicediff.cli.EXIT_FAILED_RUNS): the study completed, and some runs failed.
    assert proc.wait(timeout=300) == 3, db.with_suffix(".runner.log").read_text()[-2000:]
    got = {c: (s, e) for c, s, e in query(db, "SELECT config, state, error FROM runs")}
    assert got["ok"][0] == "finished"
    assert got["raises"][0] == "failed" and "planted failure at step 3" in got["raises"][1]
    assert got["nan"][0] == "failed" and "diverged" in got["nan"][1] and ("nan" in got["nan"][1] or "inf" in got["nan"][1])
    assert got["killed"][0] == "failed" and "SIGKILL" in got["killed"][1]
    assert_store_sound(db)
    # A failure is a result: running again keeps them (no attempt is added).
    r = devicediff("run", str(study), "--store", str(db), "--set", "lr=1e6", "-q", cwd=tmp_path)
    assert r.returncode == 3 and query(db, "SELECT sum(attempts) FROM runs") == [(4,)]


# -- the runner killed again and again -------------------------------------------------------------------------


PHASES = ("start", "mid-run", "between-runs", "store-writes")


@pytest.mark.slow
def test_runner_killed_at_random_moments_twenty_times(tmp_path):
    rnd = random.Random(int(os.environ.get("DEVICEDIFF_TEST_SEED", "6")))
    study = tmp_path / "crash.toml"
    study.write_text(study_toml("crash", seeds=2, threads=(1, 2), steps=40,
                                params={"noisy": True, "step_delay": 0.03},
                                budget={"checkpoint_every": 8, "metric_every": 1, "eval_every_steps": 10}))
    ref = tmp_path / "ref.db"
    run_inprocess(study, ref)
    want = finished(ref)
    assert len(want) == 4

    db = tmp_path / "crash.db"
    done_before: dict[str, str] = {}
    kills: dict[str, int] = {p: 0 for p in PHASES}
    cycles = 0
    while sum(kills.values()) < 20 and cycles < 80:
        cycles += 1
        phase = PHASES[cycles % len(PHASES)]
        jobs = "1" if cycles % 3 else "2"
        n_done = len(finished(db))
        proc = start_runner(study, db, "--jobs", jobs)
        if phase == "start":
            if rnd.random() < 0.5:
                time.sleep(rnd.uniform(0.0, 3.0))  # interpreter start, study load, store open
                hit = proc.poll() is None
            else:  # the moment the runner registers this start's runs (begin_run), before workers report
                base = query(db, "SELECT count(*), coalesce(sum(attempts), 0) FROM runs")
                hit = wait_for(lambda: query(db, "SELECT count(*), coalesce(sum(attempts), 0) FROM runs") != base,
                               proc, poll=0.005)
        elif phase == "mid-run":
            hit = wait_for(lambda: query(db, "SELECT 1 FROM metrics m JOIN runs r USING (run_id) "
                                             "WHERE r.state='running' AND m.name='train_loss' LIMIT 1"), proc)
            time.sleep(rnd.uniform(0.0, 0.6))
        elif phase == "between-runs":
            hit = wait_for(lambda: len(finished(db)) > n_done, proc)  # a run just ended; the next is starting
        else:
            before = len(metric_rows(db))
            hit = wait_for(lambda: len(metric_rows(db)) > before + 3, proc, poll=0.01)
            time.sleep(rnd.uniform(0.0, 0.15))
        if proc.poll() is not None:  # the study completed before this kill: start over
            assert proc.returncode == 0, db.with_suffix(".runner.log").read_text()[-2000:]
            assert_store_sound(db)
            if len(finished(db)) == len(want):
                db.unlink()
                for suffix in ("-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                done_before = {}
            continue
        workers = kill_runner(proc)
        if hit:
            kills[phase] += 1
        assert_orphans_exit(workers)
        assert_store_sound(db)
        now = finished(db)
        assert {k: now.get(k) for k in done_before} == done_before, "a finished run was lost or changed"
        done_before = now

    print(f"\nrunner killed {sum(kills.values())} times in {cycles} starts: {kills}")
    assert sum(kills.values()) >= 20 and all(kills[p] >= 3 for p in PHASES), kills
    r = devicediff("run", str(study), "--store", str(db), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert finished(db) == want
    assert metric_rows(db) == metric_rows(ref)
    assert_store_sound(db)
    assert not list((tmp_path / "crash_artifacts").glob("*/checkpoint.pt*"))


# -- checkpoints, directly ------------------------------------------------------------------------------------------


def _ctx(tmp_path: Path, seed: int = 0):
    """A PyTorch backend of the synthetic workload, built in this process."""
    import io

    import torch

    from devicediff.frameworks.torch.backend import TorchBackend
    from devicediff.job import Job
    from devicediff.protocol import RecordWriter

    job = Job(run_id="ckpt", workload=f"{ROOT / 'tests' / 'executors' / 'synthetic.py'}:make", config={"name": "c"},
              init_seed=seed, data_seed=0, budget={"steps": 100}, artifact_dir=str(tmp_path),
              checkpoint_path=str(tmp_path / "checkpoint.pt"))
    threads = torch.get_num_threads()
    try:
        return TorchBackend(job, RecordWriter(io.StringIO()))
    finally:
        torch.set_num_threads(threads)


def test_checkpoints_round_trip_with_weights_only(tmp_path, monkeypatch):
    import torch

    from devicediff.frameworks._driver import load_checkpoint, save_checkpoint
    from devicediff.frameworks.torch.backend import state_sha256

    monkeypatch.delenv("DEVICEDIFF_PARENT_PID", raising=False)
    a = _ctx(tmp_path, seed=0)
    loss = a.model(torch.randn(4, 16)).sum()
    loss.backward()
    a.optimizer.step()
    torch.manual_seed(123)
    save_checkpoint(a, 40)
    expected_rng = torch.get_rng_state()
    (tmp_path / "checkpoint.pt.tmp999").write_bytes(b"left by a killed writer")
    b = _ctx(tmp_path, seed=1)  # different weights until loaded
    torch.manual_seed(7)
    assert load_checkpoint(b) == 40
    assert state_sha256(b.model) == state_sha256(a.model)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert b.optimizer.state_dict()["state"][0]["step"] == a.optimizer.state_dict()["state"][0]["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors and containers only


def test_an_unreadable_checkpoint_is_set_aside_and_the_run_starts_over(tmp_path):
    from devicediff.frameworks._driver import load_checkpoint
    from devicediff.frameworks.torch.backend import state_sha256

    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage, not a torch file")
    c = _ctx(tmp_path)
    before = state_sha256(c.model)
    assert load_checkpoint(c) == 0
    assert state_sha256(c.model) == before
    assert (tmp_path / "checkpoint.pt.unreadable").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_an_orphaned_worker_writes_no_checkpoint(tmp_path, monkeypatch):
    from devicediff.frameworks._driver import save_checkpoint

    monkeypatch.setenv("DEVICEDIFF_PARENT_PID", str(os.getppid() + 1000000))  # not our parent: the runner is gone
    with pytest.raises(SystemExit):
        save_checkpoint(_ctx(tmp_path), 10)
    assert list(tmp_path.iterdir()) == []
