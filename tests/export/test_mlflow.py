"""``export_mlflow``: a real store round-tripped through a real local MLflow tracking store,
read back with MLflow's own client."""

from __future__ import annotations

import math

import pandas as pd
import pytest

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from devicediff.errors import UsageError  # noqa: E402
from devicediff.export import mlflow as mlx  # noqa: E402
from devicediff.export.mlflow import export_mlflow  # noqa: E402
from devicediff.runner import run_study  # noqa: E402
from devicediff.store import RunInfo, open_store  # noqa: E402
from devicediff.study import load_study  # noqa: E402

TINY_QUICK = {"train_size": 500, "eval_size": 100, "sizes": [16, 4]}


def _sqlite_uri(path) -> str:
    pytest.importorskip("sqlalchemy")  # MLflow's SQL stores; mlflow-skinny leaves SQLAlchemy out
    return f"sqlite:///{path}"


def read_back(uri: str) -> dict[str, tuple]:
    """{devicediff run id: (MLflow run, {metric: [(step, value), ...]})} over all active runs."""
    c = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    out = {}
    for r in c.search_runs(exps, max_results=1000):
        rid = r.data.tags["devicediff.run_id"]
        assert rid not in out, "two MLflow runs for one devicediff run"
        hist = {k: sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
        out[rid] = (r, hist)
    return out


def store_rows(store, run_id: str) -> dict[str, list]:
    m = store.metrics([run_id])
    return {k: sorted(zip(g["step"].astype(int), g["value"].astype(float))) for k, g in m.groupby("name")}


def same_rows(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        if len(a[k]) != len(b[k]):
            return False
        for (s1, v1), (s2, v2) in zip(a[k], b[k]):
            if s1 != s2 or not (v1 == v2 or (math.isnan(v1) and math.isnan(v2))):
                return False
    return True


# --------------------------------------------------------------------------------------
# The built-in quick study, tiny, trained for real
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("quick")
    path = str(d / "s.db")
    study = load_study("quick", overrides=TINY_QUICK)
    with open_store(path) as s:
        run_study(study, s, store_path=path)
    return path


def test_quick_store_round_trips_through_mlflow(quick_store, tmp_path):
    uri = _sqlite_uri(tmp_path / "mlflow.db")
    with open_store(quick_store) as s:
        runs = s.runs()
        assert len(runs) == 6 and set(runs["state"]) == {"finished"}
        summary = export_mlflow(s, uri)
        assert (summary.created, summary.updated, summary.skipped) == (6, 0, 0)
        assert list(summary.experiments) == [f"quick ({runs['study_id'].iloc[0][:8]})"]
        back = read_back(uri)
        assert set(back) == set(runs["run_id"])
        for _, run in runs.iterrows():
            r, hist = back[run["run_id"]]
            want = store_rows(s, run["run_id"])
            assert sum(map(len, want.values())) > 0
            assert same_rows(hist, want), run["run_id"]
            # config fields as params, flattened
            for k, v in run["config_json"].items():
                assert f"config.{k}" in r.data.params or any(p.startswith(f"config.{k}.") for p in r.data.params)
            assert r.data.params["config.threads"] == str(run["config_json"]["threads"])
            assert r.data.params["seed"] == str(run["seed"])
            assert r.data.params["workload.train_size"] == "500"
            t = r.data.tags
            assert t["config"] == run["config"] and t["seed"] == str(run["seed"])
            assert t["state"] == "finished" and t["devicediff.study_id"] == run["study_id"]
            assert t["reference"] == ("yes" if run["config"] == "cpu-1t" else "no")
            assert t["machine"] == run["machine"]
            assert r.info.run_name == f"{run['config']} seed={run['seed']}"
            assert r.info.status == "FINISHED"
        # MLflow's artifacts beside the SQLite file, not in the current folder
        art = MlflowClient(tracking_uri=uri).list_artifacts(back[runs["run_id"].iloc[0]][0].info.run_id, "devicediff")
        assert [a.path for a in art] == ["devicediff/run.json"]
        assert (tmp_path / "mlartifacts").is_dir()

        again = export_mlflow(s, uri)
        assert (again.created, again.updated, again.skipped) == (0, 0, 6)
        back2 = read_back(uri)
        assert set(back2) == set(back)
        for rid, (r, hist) in back2.items():
            assert r.info.run_id == back[rid][0].info.run_id
            assert hist == back[rid][1]


def test_file_store_round_trip(quick_store, tmp_path, monkeypatch):
    # MLflow 3 keeps the file store in maintenance mode behind this switch; MLflow 2 ignores it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with open_store(quick_store) as s:
        assert export_mlflow(s, uri).created == 6
        assert export_mlflow(s, uri).skipped == 6
        back = read_back(uri)
        assert len(back) == len(s.runs())
        for rid, (_, hist) in back.items():
            assert same_rows(hist, store_rows(s, rid))


# --------------------------------------------------------------------------------------
# A hand-made store: a run that changes state, a failed run, artifacts, verdicts
# --------------------------------------------------------------------------------------

@pytest.fixture
def hand_store(tmp_path):
    study = load_study("quick", overrides=TINY_QUICK)
    sid = study.study_id
    s = open_store(str(tmp_path / "hand.db"))
    s.put_study(sid, study.name, study.to_dict())
    cfg = {c.name: c for c in study.configs}

    def begin(rid: str, config: str, seed: int) -> str:
        s.begin_run(RunInfo(rid, sid, f"{config}|seed={seed}|rep=0", config, seed, seed, seed, 0, "autoencoder",
                            cfg[config].to_dict(), "machine-a"))
        return rid

    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    begin("run-ok", "cpu-1t", 0)
    s.add_metrics("run-ok", [[i, "train_loss", 1.0 / (i + 1)] for i in range(30)] + [[0, "eval_loss", float("nan")]])
    s.add_artifact("run-ok", "prediction_grid", str(grid))
    begin("run-bad", "cpu-2t", 0)
    s.add_metrics("run-bad", [[0, "train_loss", 0.5]])
    s.update_run("run-bad", state="failed", error="ValueError: loss is NaN at step 3")
    yield s, tmp_path
    s.close()


def test_changed_runs_are_updated_never_duplicated(hand_store, monkeypatch):
    s, tmp = hand_store
    monkeypatch.setattr(mlx, "MAX_METRICS_PER_BATCH", 7)  # several log_batch calls per run
    monkeypatch.setattr(mlx, "MAX_PARAMS_TAGS_PER_BATCH", 3)
    uri = _sqlite_uri(tmp / "mlflow.db")

    first = export_mlflow(s, uri)
    assert (first.created, first.updated, first.skipped) == (2, 0, 0)
    back = read_back(uri)
    ok, bad = back["run-ok"][0], back["run-bad"][0]
    assert ok.info.status == "RUNNING" and ok.data.tags["state"] == "running"
    assert bad.info.status == "FAILED" and bad.data.tags["state"] == "failed"
    assert bad.data.tags["error"] == "ValueError: loss is NaN at step 3"
    for rid in ("run-ok", "run-bad"):
        assert same_rows(back[rid][1], store_rows(s, rid))
    arts = [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(ok.info.run_id)]
    assert "grid.png" in arts
    assert len(ok.data.params) > 10  # more params than one batch holds

    # the running run goes on and finishes: brought up to date in place, only new rows added
    s.add_metrics("run-ok", [[i, "train_loss", 1.0 / (i + 1)] for i in range(30, 45)] + [[44, "eval_loss", 0.25]])
    s.update_run("run-ok", state="finished", final_sha256="ab" * 32)
    second = export_mlflow(s, uri)
    assert (second.created, second.updated, second.skipped, second.rebuilt) == (0, 1, 1, 0)
    back2 = read_back(uri)
    assert back2["run-ok"][0].info.run_id == ok.info.run_id
    assert back2["run-ok"][0].info.status == "FINISHED" and back2["run-ok"][0].data.tags["state"] == "finished"
    assert same_rows(back2["run-ok"][1], store_rows(s, "run-ok"))
    assert len(back2["run-ok"][1]["train_loss"]) == 45

    third = export_mlflow(s, uri)
    assert (third.created, third.updated, third.skipped) == (0, 0, 2)

    # a stored value replaced (a resumed run re-ran a step): MLflow cannot edit rows, so the run is rebuilt
    s.add_metrics("run-ok", [[3, "train_loss", 9.0]])
    fourth = export_mlflow(s, uri)
    assert (fourth.updated, fourth.rebuilt) == (1, 1)
    back4 = read_back(uri)
    assert len(back4) == 2 and same_rows(back4["run-ok"][1], store_rows(s, "run-ok"))


def test_verdicts_become_tags_and_follow_changes(hand_store):
    s, tmp = hand_store
    uri = _sqlite_uri(tmp / "mlflow.db")
    v = pd.DataFrame({"config": ["cpu-2t", "cpu-2t"], "metric": ["eval_loss", "train_loss"],
                      "verdict": ["equivalent", "inconclusive"]})
    export_mlflow(s, uri, verdicts=v)
    back = read_back(uri)
    bad = back["run-bad"][0].data.tags
    assert bad["verdict.eval_loss"] == "equivalent" and bad["verdict"] == "inconclusive"
    assert "verdict" not in back["run-ok"][0].data.tags  # the reference has none
    v.loc[1, "verdict"] = "differs"
    again = export_mlflow(s, uri, verdicts=v)
    assert (again.updated, again.skipped, again.rebuilt) == (1, 1, 0)
    tags = read_back(uri)["run-bad"][0].data.tags
    assert tags["verdict.train_loss"] == "differs" and tags["verdict"] == "differs"


def test_one_experiment_and_one_study_on_request(hand_store):
    s, tmp = hand_store
    uri = _sqlite_uri(tmp / "mlflow.db")
    summary = export_mlflow(s, uri, experiment="all devicediff runs", study="quick")
    assert list(summary.experiments) == ["all devicediff runs"] and summary.created == 2
    with pytest.raises(UsageError, match="not in the store"):
        export_mlflow(s, uri, study="no-such-study")


@pytest.mark.parametrize("uri", ["nosuchscheme://somewhere", "sqlite:///{tmp}/a-file/mlflow.db"])
def test_bad_tracking_uri_is_one_line(hand_store, uri):
    s, tmp = hand_store
    (tmp / "a-file").write_text("not a folder")
    with pytest.raises(UsageError) as e:
        export_mlflow(s, uri.format(tmp=tmp))
    msg = str(e.value)
    assert "\n" not in msg and "--tracking-uri" in msg and len(msg) < 500


def test_bad_verdicts_table_is_one_line(hand_store):
    s, tmp = hand_store
    with pytest.raises(UsageError, match="verdicts: columns"):
        export_mlflow(s, _sqlite_uri(tmp / "mlflow.db"), verdicts=pd.DataFrame({"config": ["cpu-2t"]}))


def test_unreachable_tracking_server_fails_fast(hand_store):
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s, _ = hand_store
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="no MLflow tracking server answered"):
        export_mlflow(s, f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 60  # MLflow's own retries would take about 4 minutes
