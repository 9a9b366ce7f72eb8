"""The one read side (``devicediff.analysis.load``): what status, run's table, the report and
notebooks read, from one loader."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "tests" / "store"))
from study_store import fill, make_study  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "analysis"))
from verdict_stores import fill_metrics, prednet_like  # noqa: E402

import devicediff  # noqa: E402
from devicediff.analysis.load import Results, load_results, verdicts  # noqa: E402
from devicediff.errors import UsageError  # noqa: E402
from devicediff.store import SQLiteStore  # noqa: E402
from devicediff.study import parse_study  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "s.db")
    fill(s, make_study("q"), failed=(("cpu-2t", 2),))
    yield s
    s.close()


def test_one_loader_gives_runs_metrics_finals_and_verdicts(store):
    r = load_results(store, "q")
    assert isinstance(r, Results) and r.name == "q" and r.reference == "cpu-1t" and r.order == ["cpu-1t", "cpu-2t"]
    assert len(r.runs) == 6 and set(r.runs["base_config"]) == {"cpu-1t", "cpu-2t"}
    assert set(r.metrics["name"]) == {"train_loss", "eval_loss"}
    fin = r.finished.set_index(["config", "seed"])
    assert len(fin) == 5 and fin.loc[("cpu-2t", 1), "final_eval_loss"] == pytest.approx(1.6)
    assert r.headline == "final_eval_loss" and r.primary == ["final_eval_loss"] and r.primary_source == "workload"
    v = r.verdicts.set_index(["config", "metric"])
    row = v.loc[("cpu-2t", "final_eval_loss")]
    # +0.5 in both paired seeds: no variance, so the exact sign-flip p (2/2^2 = 0.5), not p = 0
    assert row["verdict"] == "inconclusive" and row["n"] == 2 and row["role"] == "primary"
    assert "+0.5 in every seed" in row["note"] and row["p"] == pytest.approx(0.5)
    with pytest.raises(Exception):
        r.name = "other"  # frozen


def test_verdicts_can_be_skipped_and_problems_are_said(store, tmp_path):
    assert load_results(store, "q", verdicts=False).verdicts is None
    with SQLiteStore(tmp_path / "one.db") as s:
        fill(s, make_study("solo", configs=("cpu-1t",)))
        r = load_results(s, "solo")
    assert r.verdicts is None and "fewer than two configs" in r.verdict_problem


def test_a_study_by_object_id_name_or_row_is_the_same_study(store):
    st = make_study("q")
    ids = {load_results(store, x, verdicts=False).study_id
           for x in (st, st.study_id, "q", store.studies().iloc[0])}
    assert ids == {st.study_id}
    with pytest.raises(UsageError, match="no study 'nope'.*it holds: q"):
        load_results(store, "nope")


def test_a_name_shared_by_two_stored_studies_asks_for_an_id(tmp_path):
    import sqlite3

    db = tmp_path / "two.db"
    with SQLiteStore(db) as s:
        fill(s, make_study("q"))
    con = sqlite3.connect(db)  # as an older devicediff (or a merge) could leave it
    with con:
        con.execute("INSERT INTO studies VALUES ('other-id', 'q', '{}', 0)")
    con.close()
    with SQLiteStore(db) as s, pytest.raises(UsageError, match="names 2 studies.*other-id"):
        load_results(s, "q")


def test_the_report_reads_the_same_verdicts(store):
    from devicediff.report import analyse
    from devicediff.report import data as report_data

    assert not hasattr(report_data, "load_study")  # load_study means the TOML parser only
    d = report_data.load_report_data(store, "q")
    pd.testing.assert_frame_equal(d.verdicts, load_results(store, "q").verdicts)
    pd.testing.assert_frame_equal(analyse(d).verdicts, d.verdicts)
    assert len(d.weights.columns) and "payload" in d.analyses.columns


def test_notebook_api(store):
    with devicediff.open_store(store.path, readonly=True) as s:
        runs, metrics, v = s.runs(), s.metrics(), s.verdicts()
    assert isinstance(runs, pd.DataFrame) and len(runs) == 6 and len(metrics) == 6 * 7 - 7  # the failed run has none
    assert list(v.columns[:2]) == ["study", "study_id"] and set(v["study"]) == {"q"}
    pd.testing.assert_frame_equal(v.drop(columns=["study", "study_id"]), load_results(store, "q").verdicts)
    pd.testing.assert_frame_equal(verdicts(store, "q"), v)


def test_machines_are_kept_apart(tmp_path):
    with SQLiteStore(tmp_path / "m.db") as s:
        st = make_study("q", seeds=2)
        fill(s, st, machine="aaaaaaaa")
        fill(s, st, machine="bbbbbbbb")
        r = load_results(s, st)
    assert r.by_machine and r.reference == "cpu-1t@aaaaaa" and len(r.machines) == 2
    assert r.order == ["cpu-1t@aaaaaa", "cpu-1t@bbbbbb", "cpu-2t@aaaaaa", "cpu-2t@bbbbbb"]


def test_real_runs(tmp_path):
    """A tiny real study, trained through run_study: the loader reads what the runner wrote."""
    from devicediff.executors import LocalExecutor
    from devicediff.runner import run_study
    from devicediff.study import load_study

    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(name="tiny", seeds=3).replace("train_size = 1000", "train_size = 200")
                 .replace("eval_size = 500", "eval_size = 100"))
    study = load_study(p)
    with SQLiteStore(tmp_path / "r.db") as s:
        run_study(study, s, store_path=str(tmp_path / "r.db"), executor=LocalExecutor(jobs=1))
        r = load_results(s, study)
    assert len(r.finished) == 6 and r.finished["final_eval_loss"].notna().all()
    assert r.verdicts is not None and set(r.verdicts["config"]) == {"cpu-2t"}
    assert r.primary == ["final_eval_loss"] and r.primary_source == "workload"  # Autoencoder.primary_metrics
    v = r.verdicts.set_index("metric")
    assert v.loc["final_eval_loss", "role"] == "primary" and v.loc["tail_train_loss", "role"] == "secondary"
    assert v.loc["final_eval_loss", "n"] == 3


# -- roles: primary / secondary / check, through the loader ---------------------------------------


def test_roles_come_from_the_workload_declaration(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        prednet_like(s)
        r = load_results(s, "pn")
    assert r.primary == ["final_eval_mse"] and r.primary_source == "workload"
    assert r.checks == ["final_baseline_mse", "final_baseline_ssim"]
    assert r.verdict_metrics[0] == "final_eval_mse" and r.headline == "final_eval_mse"
    v = r.verdicts.set_index(["config", "metric"])
    roles = v.groupby(level="metric")["role"].first().to_dict()
    assert roles == {"final_eval_mse": "primary", "final_eval_loss": "secondary", "final_eval_ssim": "secondary",
                     "final_baseline_mse": "check", "final_baseline_ssim": "check"}
    assert v.loc[("cpu-2t", "final_eval_mse"), "verdict"] == "differs"
    assert v.loc[("cpu-3t", "final_eval_mse"), "verdict"] == "identical"
    assert v.loc[("cpu-2t", "final_baseline_mse"), "verdict"] == "same on every run: yes"
    # the family: 1 testable primary comparison (cpu-3t identical leaves it), eval_loss an affine copy
    assert v.loc[("cpu-2t", "final_eval_mse"), "in_family"] and not v.loc[("cpu-3t", "final_eval_mse"), "in_family"]
    assert not v.loc[("cpu-2t", "final_eval_loss"), "in_family"]
    assert "confirmatory: Holm over 1 comparisons" in v.loc[("cpu-2t", "final_eval_mse"), "note"]
    # the old column names stay, as aliases, for readers written for the old table
    for new, old in (("ci95_low", "ci_low"), ("ci95_high", "ci_high"), ("p_adj", "p_holm"),
                     ("tost_p_adj", "tost_p_holm")):
        pd.testing.assert_series_equal(r.verdicts[new], r.verdicts[old], check_names=False)


def test_a_study_overrides_the_primary_metric_and_its_margin(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        prednet_like(s, primary=["eval_ssim"], margin=0.05)
        r = load_results(s, "pn")
    assert r.primary == ["final_eval_ssim"] and r.primary_source == "study"
    v = r.verdicts.set_index(["config", "metric"])
    assert v.loc[("cpu-2t", "final_eval_ssim"), "role"] == "primary"
    assert v.loc[("cpu-2t", "final_eval_mse"), "role"] == "secondary"
    # the fixed margin is in the primary metric's units; the others keep the seed-sd margin
    assert v.loc[("cpu-2t", "final_eval_ssim"), "margin"] == 0.05
    assert v.loc[("cpu-2t", "final_eval_ssim"), "margin_source"] == "fixed"
    assert v.loc[("cpu-2t", "final_eval_mse"), "margin_source"] == "seed-sd"


def test_a_workload_without_a_declaration_falls_back_and_says_so(tmp_path):
    wl = tmp_path / "mywl.py"
    wl.write_text("def make(**p):\n    raise RuntimeError('never built here')\n")
    doc = {"name": "u", "reference": "a", "workload": {"name": f"{wl}:make"}, "seeds": {"count": 3},
           "budget": {"epochs": 1}, "configs": [{"name": "a"}, {"name": "b", "threads": 2}]}
    st = parse_study(doc)
    with SQLiteStore(tmp_path / "u.db") as s:
        fill_metrics(s, st, lambda c, seed: {"eval_score": 1.0 + seed + (0.1 * seed if c == "b" else 0)})
        r = load_results(s, "u")
    assert r.primary == ["final_eval_score"] and r.primary_source == "fallback"
    assert "declares none" in r.verdict_note


def test_declared_metrics_reads_the_source_without_importing_it():
    import subprocess

    code = ("import sys; from devicediff.analysis.load import declared_metrics as d; "
            "print(d('autoencoder'), d('prednet'), d('classifier'), d('nope:make')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}).stdout.splitlines()
    assert out[0] == ("(('eval_loss',), ()) (('eval_mse',), ('baseline_mse', 'baseline_ssim')) "
                      "(('eval_accuracy',), ()) None")
    assert out[1] == "False"


def test_per_class_metrics_are_their_own_family(tmp_path):
    doc = {"name": "c", "reference": "a", "workload": {"name": "classifier"}, "seeds": {"count": 4},
           "budget": {"epochs": 1}, "configs": [{"name": "a"}, {"name": "b", "threads": 2}]}
    st = parse_study(doc)

    def metrics(c, seed):
        out = {"eval_accuracy": 0.9 + 0.01 * seed + (0.001 * (seed % 2) if c == "b" else 0)}
        out.update({f"eval_acc_class_{k}": 0.8 + 0.01 * k + 0.002 * seed + (0.001 * seed if c == "b" else 0)
                    for k in range(3)})
        return out

    with SQLiteStore(tmp_path / "c.db") as s:
        fill_metrics(s, st, metrics)
        r = load_results(s, "c")
    assert r.primary == ["final_eval_accuracy"]
    assert not any("acc_class" in m for m in r.verdict_metrics)
    assert not r.verdicts["metric"].str.contains("acc_class").any()
    assert r.per_class is not None and sorted(r.per_class["class"]) == [0, 1, 2]


def test_run_warnings_and_sequential_looks_are_read(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        st = prednet_like(s, seeds=3)
        rid = s.runs(st.study_id)["run_id"].iloc[0]
        s.record(rid, {"kind": "effective", "settings": {"warnings": ["dropout masks differ by device"]}})
        s.put_analysis(st.study_id, "sequential", "max=9|batch=3|look=1", {"look": 1, "seeds": 3, "status": "continue"})
        r = load_results(s, "pn")
    assert list(r.warnings["warning"]) == ["dropout masks differ by device"]
    assert r.sequential is not None and list(r.sequential["look"]) == [1]
