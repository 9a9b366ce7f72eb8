"""Prestarted warm workers (LocalExecutor(prestart=True), what `devicediff run` uses): started ahead
of their slots, adopted by the slot they were made for, giving the same bits as workers started by
their slot; the ones no slot takes are killed; their early output reaches the run's log; a run
does not count the time its worker sat ready as start-up; a failed preflight leaves nothing behind.

Tiny synthetic runs (tests/executors/synthetic.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, devicediff
from devicediff.executors.local import LocalExecutor, available_cores
from devicediff.runner import likely_tasks, run_study
from devicediff.store import open_store
from devicediff.study import load_study

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import study_toml  # noqa: E402

CONFIGS = [{"name": "a", "threads": 1}, {"name": "b", "threads": 1}]


@pytest.fixture
def tmpdir_for_logs(tmp_path, monkeypatch) -> Path:
    """tempfile's folder: a private one, to see that prestarting leaves no file there."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _study(tmp_path: Path, name: str = "pre") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(study_toml(name, seeds=2, steps=12, params={"noisy": True}, configs=CONFIGS))
    return p


def _run(study_path: Path, db: Path, executor: LocalExecutor, *, prestart_first: bool = False, only=None, pause=0.0):
    study = load_study(study_path)
    if prestart_first:
        executor.prestart(likely_tasks(study, only, store_path=str(db)))
        time.sleep(pause)
    with open_store(str(db)) as s:
        res = run_study(study, s, store_path=str(db), executor=executor, only_configs=only)
        runs, metrics = s.runs(), s.metrics()
    out = {}
    for _, r in runs.iterrows():
        m = metrics[metrics["run_id"] == r["run_id"]]
        eff = dict(r["effective"] or {})
        out[r["cell_key"]] = {"state": r["state"], "final": r["final_sha256"], "init": r["init_sha256"],
                              "metrics": sorted(zip(m["step"], m["name"], m["value"])),
                              "worker": (eff.pop("placement", None) or {}).get("worker"),
                              "log": r["log_path"], "timing": res.timing.get(r["run_id"])}
    return out


def test_prestarted_workers_are_adopted_and_give_the_same_bits(tmp_path, tmpdir_for_logs):
    study = _study(tmp_path)
    plain = _run(study, tmp_path / "plain.db", LocalExecutor(jobs=1))
    ex = LocalExecutor(jobs=1, prestart=True)
    pre = _run(study, tmp_path / "pre.db", ex, prestart_first=True, pause=8.0)
    assert set(pre) == set(plain) and len(pre) == 4
    # the first config's worker was prestarted; the second's while the first ran on one of the cores
    assert ex.adopted == (2 if len(available_cores()) > 1 else 1)
    for key in plain:
        p, q = dict(plain[key]), dict(pre[key])
        assert q["state"] == "finished", key
        assert q["worker"]["mode"] == "warm" and q["worker"]["process_run"] == int("seed=1" in key), key
        for k in ("worker", "log", "timing"):
            p.pop(k), q.pop(k)
        assert p == q, key  # final and initial weights, every metric
    # the first run did not count the 8 s its ready worker waited as start-up
    first = pre["a|seed=0|rep=0"]["timing"]
    assert first["startup"] < 8.0, first
    assert not list(tmpdir_for_logs.iterdir())  # early logs have no name: nothing to take over or leave


def test_a_prestarted_worker_no_slot_takes_is_killed(tmp_path, tmpdir_for_logs):
    study = _study(tmp_path, "wrong")
    ex = LocalExecutor(jobs=1, prestart=True)
    ex.prestart(likely_tasks(load_study(study), ["a"], store_path=str(tmp_path / "w.db")))
    (idle,) = ex._idle
    assert idle.proc.poll() is None
    out = _run(study, tmp_path / "w.db", ex, only=["b"])  # config a never runs
    assert {v["state"] for v in out.values()} == {"finished"} and len(out) == 2
    assert ex.adopted == 0
    assert idle.proc.poll() is not None  # killed and reaped
    assert not list(tmpdir_for_logs.iterdir())


def test_early_output_goes_to_a_nameless_file_and_then_to_the_first_runs_log(tmp_path):
    """What a prestarted worker prints before its first job (its stdout: a nameless file) is copied
    into that job's log when it switches to it; no file with a name is ever made for it."""
    log = tmp_path / "run.log"
    code = ("import sys, os; from devicediff.worker import redirect_output; print('said while loading', flush=True); "
            "os.write(2, b'and on stderr\\n'); redirect_output(sys.argv[1], keep_early=True); print('said in the run')")
    with tempfile.TemporaryFile("w+b") as early:
        subprocess.run([sys.executable, "-c", code, str(log)], stdout=early, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert log.read_text() == "said while loading\nand on stderr\nsaid in the run\n"


def test_a_failed_preflight_leaves_no_worker_or_file_behind(tmp_path):
    study = tmp_path / "bad.toml"
    study.write_text('name = "bad"\n[workload]\nname = "autoencoder"\nsizes = [0]\n'
                     '[[configs]]\nname = "a"\nthreads = 1\nreference = true\n')
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = devicediff("run", str(study), "--store", str(tmp_path / "bad.db"), cwd=tmp_path, env={"TMPDIR": str(tmp)})
    assert r.returncode == 2, r.stderr
    assert "autoencoder.sizes" in r.stderr
    assert not (tmp_path / "bad.db").exists()
    assert not list(tmp.iterdir())  # the prestarted worker left no file


def test_a_runner_killed_while_its_workers_load_leaves_no_file(tmp_path, tiny_study):
    study = tiny_study()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.pop(0); from devicediff.cli import main; main()",
                          "run", str(study), "--store", str(tmp_path / "k.db"), "-q"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(tmp)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # its first worker is loading torch
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.5)
    assert not list(tmp.iterdir())


def test_a_prestarted_worker_does_the_preflight_build_with_the_same_errors(tmp_path, tiny_study):
    from devicediff.errors import ParamError
    from devicediff.workloads import make_workload

    study = tiny_study()
    ex = LocalExecutor(jobs=1, prestart=True)
    try:
        ex.prestart(likely_tasks(load_study(study), store_path=str(tmp_path / "x.db")))
        with pytest.raises(ParamError) as here:
            make_workload("autoencoder", {"sizes": [0]})
        with pytest.raises(ParamError) as there:
            ex.check_workload("autoencoder", {"sizes": [0]})
        assert str(there.value) == str(here.value)
        assert ex.check_workload("autoencoder", {"sizes": [32, 8], "train_size": 500}) is True
        assert ex.checked == 1
        assert ex.check_workload(f"{HERE / 'synthetic.py'}:make", {}) is False  # a user's workload: built here
    finally:
        ex.close()
    assert not ex._idle


def test_the_runner_needs_no_torch_and_gets_the_bits_of_isolated_runs(tmp_path, tiny_study):
    """`devicediff run` with its prestarted worker doing the preflight never imports torch itself, and
    its runs (each config's first run in a worker that did that check) equal one process per run."""
    study = tiny_study()
    launcher = ("import sys; sys.path.pop(0); from devicediff.cli import main; code = main(sys.argv[1:]); "
                "print('TORCH IN RUNNER:', 'torch' in sys.modules); sys.exit(code)")
    hashes = {}
    for name, extra in (("warm", []), ("isolated", ["--isolate"])):
        db = tmp_path / f"{name}.db"
        r = subprocess.run([sys.executable, "-c", launcher, "run", str(study), "--store", str(db), "-q", *extra],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"TORCH IN RUNNER: {name == 'isolated'}" in r.stdout  # --isolate: the preflight builds here
        with open_store(str(db)) as s:
            runs = s.runs()
        assert (runs["state"] == "finished").all()
        hashes[name] = dict(zip(runs["cell_key"], runs["final_sha256"]))
    assert hashes["warm"] == hashes["isolated"] and len(hashes["warm"]) == 4
