"""The command line as a newcomer meets it (issue #12's first-hour table, one test per row):
bad input is one line, exit 2, nothing written; exit codes a CI job can use; studies told apart
by content; paths relative to the study file; progress; --version."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, devicediff

QUICK_SMALL = ["--set", "train_size=300", "--set", "eval_size=100", "--set", "sizes=[16, 4]"]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devicediff: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- workload parameters, checked before anything is written ---------------------------------------


@pytest.mark.parametrize("kv,needles", [
    ("batch_size=abc", ["workload.batch_size", "whole number", "'abc'"]),
    ("lr=abc", ["workload.lr", "a number", "'abc'"]),
    ("lr=NaN", ["workload.lr", "not a finite number"]),
    ("lr=-1", ["lr must be > 0", "-1"]),
    ("sizes=[1,2", ["workload.sizes", "list"]),
    ("batch_size=2.5", ["workload.batch_size", "whole number", "2.5"]),
    ("no_such_param=1", ["workload.no_such_param", "unknown parameter"]),
])
def test_bad_workload_parameters_are_one_line_and_write_nothing(tmp_path, kv, needles):
    r = devicediff("run", "quick", "--store", str(tmp_path / "s.db"), "-q", "--set", kv, cwd=tmp_path)
    one_line_error(r, *needles)
    assert not (tmp_path / "s.db").exists() and not list(tmp_path.iterdir())


def test_bad_prednet_variant_is_one_line(tmp_path):
    r = devicediff("run", "quick-prednet", "--store", str(tmp_path / "s.db"), "--set", "variant=bogus", cwd=tmp_path)
    one_line_error(r, "variant", "bogus")
    assert not (tmp_path / "s.db").exists()


def test_a_chainer_environment_that_cannot_be_used_is_one_line_and_writes_nothing(tmp_path):
    r = devicediff("run", "seed-replication", "--store", str(tmp_path / "s.db"), "--only", "chainer-cpu-fresh",
                   cwd=tmp_path, env={"DEVICEDIFF_CHAINER_PYTHON": "/nonexistent/python"})
    one_line_error(r, "DEVICEDIFF_CHAINER_PYTHON")
    assert not (tmp_path / "s.db").exists()


def test_framework_options_are_checked_when_the_study_is_read(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(TWO_CONFIGS.replace('framework = "torch"', 'framework = "chainer"\ncompile = true'))
    one_line_error(devicediff("run", str(p), "--store", str(tmp_path / "s.db"), cwd=tmp_path),
                   "compile", "chainer framework has no compile option")
    assert not (tmp_path / "s.db").exists()


TWO_CONFIGS = """
name = "two"
reference = "a"
[workload]
name = "autoencoder"
sizes = [16, 4]
train_size = 300
eval_size = 100
[seeds]
count = 1
[budget]
epochs = 1
[[configs]]
name = "a"
threads = 1
[[configs]]
name = "b"
framework = "torch"
threads = 1
"""


# -- exit codes ------------------------------------------------------------------------------------


BROKEN_WORKLOAD = '''
from devicediff.workloads.autoencoder.workload import Autoencoder


class Broken(Autoencoder):
    def loss(self, model, batch):
        raise RuntimeError("a bug in my loss")


def make(**params):
    return Broken(**params)
'''


def test_a_study_whose_runs_all_fail_exits_3(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_WORKLOAD)
    p = tmp_path / "s.toml"
    p.write_text(TWO_CONFIGS.replace('name = "autoencoder"', 'name = "broken.py:make"'))
    r = devicediff("run", str(p), "--store", str(tmp_path / "s.db"), "-q", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "2 run(s) failed" in r.stderr
    runs = sqlite3.connect(tmp_path / "s.db").execute("select state, error from runs").fetchall()
    assert [s for s, _ in runs] == ["failed", "failed"] and all("a bug in my loss" in e for _, e in runs)


def test_interrupt_marks_unfinished_runs_interrupted_and_exits_130(tmp_path):
    db = tmp_path / "s.db"
    p = tmp_path / "s.toml"
    p.write_text(TWO_CONFIGS.replace("count = 1", "count = 3").replace("epochs = 1", "epochs = 20"))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.pop(0); from devicediff.cli import main; sys.exit(main())",
         "run", str(p), "--store", str(db), "-q"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a run is under way
        time.sleep(0.5)
        if db.exists():
            try:
                if sqlite3.connect(db).execute("select count(*) from runs where state='running'").fetchone()[0]:
                    break
            except sqlite3.Error:
                pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    states = {s for (s,) in sqlite3.connect(db).execute("select state from runs")}
    assert "running" not in states and "interrupted" in states
    r = devicediff("status", "--store", str(db), cwd=tmp_path)
    assert r.returncode == 0 and "interrupted" in r.stdout


# -- identity, paths, per-seed numbers ------------------------------------------------------------------


@pytest.mark.slow
def test_same_name_other_parameters_is_refused_with_the_way_out(tmp_path):
    db = str(tmp_path / "s.db")
    assert devicediff("run", "quick", "--store", db, "-q", *QUICK_SMALL, cwd=tmp_path).returncode == 0
    r = devicediff("run", "quick", "--store", db, "-q", *QUICK_SMALL, "--set", "train_size=400", cwd=tmp_path)
    one_line_error(r, "train_size", "--name")
    r = devicediff("run", "quick", "--store", db, "-q", *QUICK_SMALL, "--set", "train_size=400",
                   "--name", "quick-400", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    status = devicediff("status", "--store", db, "--per-seed", cwd=tmp_path)
    assert status.returncode == 0 and "quick-400" in status.stdout and "seed" in status.stdout


def test_status_reads_a_study_with_a_relative_workload_path_from_anywhere(tmp_path):
    study_dir = tmp_path / "proj"
    study_dir.mkdir()
    (study_dir / "wl.py").write_text(
        "from devicediff.workloads.autoencoder.workload import Autoencoder\n"
        "def make(**p):\n    return Autoencoder(**p)\n")
    (study_dir / "s.toml").write_text(TWO_CONFIGS.replace('name = "autoencoder"', 'name = "wl.py:make"'))
    db = str(tmp_path / "s.db")
    assert devicediff("run", "proj/s.toml", "--store", db, "-q", cwd=tmp_path).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = devicediff("status", "--store", db, cwd=elsewhere)
    assert r.returncode == 0 and "cannot re-read" not in r.stdout, r.stdout
    assert "a (ref)" in r.stdout and "│ b " in r.stdout


# -- small things ------------------------------------------------------------------------------------


def test_version_and_help():
    r = devicediff("--version")
    assert r.returncode == 0 and r.stdout.startswith("devicediff ")
    h = devicediff("--help").stdout
    assert "command-line interface" not in h and "``" not in h


def test_diverge_shows_progress_when_not_on_a_terminal(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(TWO_CONFIGS)
    r = devicediff("diverge", str(p), "--a", "a", "--b", "b", "--steps", "2", "--store", str(tmp_path / "d.db"),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "A step 1/2" in r.stderr and "B step 2/2" in r.stderr


def test_snapshots_can_be_turned_off(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("snapshots = false\n" + TWO_CONFIGS)
    assert devicediff("run", str(p), "--store", str(tmp_path / "s.db"), "-q", cwd=tmp_path).returncode == 0
    assert not list(tmp_path.glob("s_artifacts/*/weights_step*.npy"))
    paths = sqlite3.connect(tmp_path / "s.db").execute("select path from weights").fetchall()
    assert paths and all(p is None for (p,) in paths)  # hashes still recorded, no files
