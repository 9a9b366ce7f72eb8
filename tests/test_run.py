"""`devicediff run` end to end: real MNIST, real worker processes, real SQLite."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from conftest import ROOT, devicediff
from devicediff.store import open_store


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    study = d / "tiny.toml"
    from conftest import TINY

    study.write_text(TINY.format(name="tiny", seeds=2))
    r = devicediff("run", str(study), "--store", str(d / "s.db"), cwd=d)
    assert r.returncode == 0, r.stderr
    return d, study, r


def test_every_cell_trained_and_table_printed(ran):
    d, _, r = ran
    assert "per config" in r.stdout and "cpu-2t" in r.stdout and "verdicts vs cpu-1t" in r.stdout
    assert "next: devicediff report" in r.stdout
    with open_store(str(d / "s.db")) as s:
        runs = s.runs()
        assert len(runs) == 4 and set(runs["state"]) == {"finished"}
        m = s.metrics()
        assert {"train_loss", "eval_loss"} <= set(m["name"])
        # no duplicate (run, step, name) rows, by construction and in fact
        assert not m.duplicated(["run_id", "step", "name"]).any()


def test_equal_footing_init_hash_shared_per_seed(ran):
    d, _, _ = ran
    with open_store(str(d / "s.db")) as s:
        runs = s.runs()
    per_seed = runs.groupby("seed")["init_sha256"].nunique()
    assert (per_seed == 1).all()
    assert runs["init_sha256"].nunique() == 2  # different seeds, different weights


def test_run_records_what_took_effect(ran):
    d, _, _ = ran
    with open_store(str(d / "s.db")) as s:
        runs = s.runs()
    for _, r in runs.iterrows():
        want = r["config_json"]["threads"]
        eff = r["effective"]
        assert eff["torch_threads"] == want
        assert eff["env_threads"]["OMP_NUM_THREADS"] == str(want)
        assert eff["tf32_conv"] is False and eff["device"] == "cpu"
        used = r["threads_used"]
        assert used["available"] and used["threads_active"] >= 1
        fp = r["fingerprint"]
        assert fp["cpu_model"] and "torch" in fp["libraries"] and fp["python"]
        assert "hostname" not in json.dumps(fp).lower()


def test_second_run_adds_nothing(ran):
    d, study, _ = ran
    r = devicediff("run", str(study), "--store", str(d / "s.db"), cwd=d)
    assert r.returncode == 0, r.stderr
    assert "4 run(s) already in the store are kept; 0 to run" in r.stderr
    with open_store(str(d / "s.db")) as s:
        assert len(s.runs()) == 4


def test_export_csv_columns(ran):
    d, _, _ = ran
    r = devicediff("export", "--store", str(d / "s.db"), "--format", "csv", "--out", str(d / "ex"), cwd=d)
    assert r.returncode == 0, r.stderr
    with open(d / "ex" / "runs.csv") as f:
        cols = next(csv.reader(f))
    for c in ("run_id", "workload", "config", "seed", "state", "init_sha256", "final_sha256"):
        assert c in cols
    with open(d / "ex" / "metrics.csv") as f:
        assert next(csv.reader(f)) == ["run_id", "step", "name", "value"]


def test_export_parquet(ran):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    d, _, _ = ran
    r = devicediff("export", "--store", str(d / "s.db"), "--format", "parquet", "--out", str(d / "pq"), cwd=d)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_parquet(d / "pq" / "runs.parquet")) == 4


def test_status_and_env(ran):
    d, _, _ = ran
    r = devicediff("status", "--store", str(d / "s.db"), cwd=d)
    assert r.returncode == 0 and "cpu-1t" in r.stdout
    assert "verdicts vs cpu-1t" in r.stdout  # the same verdicts as the end of `run`
    r = devicediff("env", "--json", cwd=d)
    fp = json.loads(r.stdout)
    assert fp["cpu_count"] >= 1 and fp["machine_id"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[workload]\nname='autoencoder'\n[[configs]]\nname='a'\nreference=true\n[[configs]]\nname='a'\n", "duplicate config name"),
        ("[workload]\nname='autoencoder'\nsizez=[1]\n[[configs]]\nname='a'\nreference=true\n", "workload.sizez: unknown parameter for workload 'autoencoder' (did you mean 'sizes'?)"),
        ("[workload]\nname='autoencoder'\n[seeds]\ncount=0\n[[configs]]\nname='a'\nreference=true\n", "seeds.count"),
        ("[workload]\nname='autoencoder'\nmnist_root='/nonexistent'\n[[configs]]\nname='a'\nreference=true\n", "does not exist"),
    ],
)
def test_bad_study_exit_2_nothing_written(tmp_path, content, needle):
    p = tmp_path / "bad.toml"
    p.write_text(content)
    r = devicediff("run", str(p), "--store", str(tmp_path / "s.db"), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devicediff: error:") and needle in lines[0], r.stderr
    assert not (tmp_path / "s.db").exists()


def test_user_workload_example_runs(tmp_path):
    """The plugin example in examples/ gets every feature: runs, store, table."""
    r = devicediff("run", str(ROOT / "examples" / "linear_regression.toml"), "--store", str(tmp_path / "e.db"),
                   "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open_store(str(tmp_path / "e.db")) as s:
        runs = s.runs()
    assert len(runs) == 6 and set(runs["state"]) == {"finished"}
    assert (runs.groupby("seed")["init_sha256"].nunique() == 1).all()


def test_user_classifier_example_gets_the_churn_verdict(tmp_path):
    """A user's own classifier that saves its held-out predictions gets the churn verdict in the
    terminal (examples/blobs_classifier.py): bfloat16 flips far fewer predictions than a seed."""
    r = devicediff("run", str(ROOT / "examples" / "blobs_classifier.toml"), "--store", str(tmp_path / "b.db"),
                   "--only", "cpu-1t", "--only", "cpu-bf16", "--quiet", cwd=tmp_path, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "predictions vs cpu-1t at the same seed" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("│ cpu-bf16") and "seed change" in ln)
    assert "less than a seed change" in line, r.stdout


def test_unavailable_gpu_config_is_skipped_and_study_goes_on(tiny_study, tmp_path):
    extra = '\n[[configs]]\nname = "gpu"\ndevice = "cuda"\n'
    p = tiny_study("withgpu", seeds=1, extra=extra)
    r = devicediff("run", str(p), "--store", str(tmp_path / "g.db"), "-q", cwd=tmp_path,
                   env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    with open_store(str(tmp_path / "g.db")) as s:
        runs = s.runs().set_index("config")
    assert runs.loc["gpu", "state"] == "skipped" and "CUDA" in runs.loc["gpu", "error"]
    assert runs.loc["cpu-1t", "state"] == "finished"


def test_nan_run_recorded_as_failed(tiny_study, tmp_path):
    p = tiny_study("nan", seeds=1)
    text = p.read_text().replace("eval_size = 500", "eval_size = 500\nlr = 1e12")
    p.write_text(text)
    r = devicediff("run", str(p), "--store", str(tmp_path / "n.db"), "-q", cwd=tmp_path)
    with open_store(str(tmp_path / "n.db")) as s:
        runs = s.runs()
    # Either the loss went non-finite (failed, "diverged") or it saturated: never a crash of the study.
    assert set(runs["state"]) <= {"failed", "finished"}
    failed = runs[runs["state"] == "failed"]
    assert failed.empty or failed["error"].str.contains("diverged").all()
    # A CI job can tell: exit 3 when any run failed or went NaN, 0 otherwise.
    assert r.returncode == (3 if len(failed) else 0), r.stderr
    assert sqlite3.connect(tmp_path / "n.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_workers_ignore_modules_in_the_working_directory(tiny_study, tmp_path):
    """A user's timeit.py or random.py in the folder must not shadow the standard library in workers."""
    (tmp_path / "timeit.py").write_text("raise SystemExit('shadowed timeit imported')\n")
    (tmp_path / "random.py").write_text("raise SystemExit('shadowed random imported')\n")
    p = tiny_study("shadow", seeds=1)
    r = devicediff("run", str(p), "--store", str(tmp_path / "sh.db"), "-q", "--only", "cpu-1t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open_store(str(tmp_path / "sh.db")) as s:
        assert set(s.runs()["state"]) == {"finished"}


def test_set_without_value_is_one_line_error(tiny_study, tmp_path):
    r = devicediff("run", str(tiny_study("bad-set", seeds=1)), "--set", "train_size", "--store", str(tmp_path / "b.db"),
                   cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("devicediff: error: --set 'train_size'")
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize("flag", ["--jobs", "--gpu-slots"])
def test_jobs_and_gpu_slots_must_be_positive(tiny_study, tmp_path, flag):
    store = tmp_path / "s.db"
    r = devicediff("run", str(tiny_study("bad-jobs", seeds=1)), "--store", str(store), flag, "0", cwd=tmp_path)
    assert r.returncode == 2 and f"argument {flag}" in r.stderr and "at least 1" in r.stderr
    assert not store.exists()


def test_ctrl_c_while_runs_are_being_started_marks_the_begun_ones_interrupted(tiny_study, tmp_path, monkeypatch):
    """A Ctrl-C between recording one run as started and the next (a slow machine makes that
    window long) leaves no run 'running': the begun ones become 'interrupted'."""
    from devicediff import runner
    from devicediff.study import load_study

    real, calls = runner._begin, []

    def begin_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_begin", begin_then_interrupt)
    db = tmp_path / "s.db"
    with open_store(str(db)) as s, pytest.raises(KeyboardInterrupt):
        runner.run_study(load_study(tiny_study()), s, store_path=str(db))
    states = [st for (st,) in sqlite3.connect(db).execute("select state from runs")]
    assert sorted(states) == ["interrupted", "interrupted"], states
