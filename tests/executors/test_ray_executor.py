"""RayExecutor against a real Ray cluster on loopback, started (and stopped) by these tests.

Marked ``ray``: ``pytest -m ray`` runs only these; they are skipped where Ray is
not installed (``pip install "ray[default]"``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, devicediff

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import study_toml  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster with 2 CPUs and a custom resource ``fast``; yields its address."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="ddray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    ports = [f"--{flag}={free_port()}" for flag in (
        "ray-client-server-port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    log = open(Path(temp) / "start.log", "wb")
    # --block: this process owns the cluster; SIGTERM to it stops every process it started
    # (no `ray stop`, which would stop every Ray instance of this user on the machine).
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         '--resources={"fast": 1}', "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", *ports],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"},
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (Path(temp) / "start.log").read_text()[-3000:]
            assert time.time() < deadline, "Ray head did not come up in 90 s"
            if "block forever" in (Path(temp) / "start.log").read_text():
                break
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_study_on_ray_runs_every_cell_and_matches_local_bits(cluster, tmp_path):
    configs = [
        {"name": "a", "threads": 1},
        {"name": "b", "threads": 1, "ray_resources": {"fast": 1}},
        {"name": "c", "threads": 1, "ray_resources": {"H100": 1}},  # no node has one
    ]
    study = tmp_path / "ray.toml"
    study.write_text(study_toml("ray", seeds=1, steps=20, configs=configs))
    db = tmp_path / "ray.db"
    r = devicediff("run", str(study), "--store", str(db), "--executor", "ray", "--address", cluster, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    from devicediff.executors import LocalExecutor
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    with open_store(str(db)) as s:
        runs = s.runs().set_index("config")
        metrics = s.metrics()
    assert runs.loc["a", "state"] == "finished" and runs.loc["b", "state"] == "finished"
    assert runs.loc["c", "state"] == "skipped" and "H100" in runs.loc["c", "error"]
    for name in ("a", "b"):
        place = runs.loc[name, "effective"]["placement"]
        assert place["executor"] == "ray" and place["shared_filesystem"] is True and place["cpus"] == 1
        assert place["gpu_share"] == 0  # CPU configs ask for no GPU
    assert runs.loc["b", "effective"]["placement"]["ray_resources"] == {"fast": 1}
    assert not metrics.duplicated(["run_id", "step", "name"]).any()
    assert Path(runs.loc["a", "log_path"]).exists()

    local = tmp_path / "local.db"
    with open_store(str(local)) as s:
        run_study(load_study(study), s, store_path=str(local), executor=LocalExecutor(), only_configs=["a"])
        lr = s.runs().set_index("config")
    assert lr.loc["a", "final_sha256"] == runs.loc["a", "final_sha256"] == runs.loc["b", "final_sha256"]


def test_files_come_back_from_a_node_without_the_shared_folder(cluster, tmp_path):
    from devicediff.executors.ray import RayExecutor
    from devicediff.runner import run_study
    from devicediff.store import open_store
    from devicediff.study import load_study

    study = tmp_path / "ship.toml"
    study.write_text(study_toml("ship", seeds=1, threads=(1,), steps=10))
    db = tmp_path / "ship.db"
    ex = RayExecutor(cluster, ship_files=True)
    try:
        with open_store(str(db)) as s:
            run_study(load_study(study), s, store_path=str(db), executor=ex)
            runs, weights = s.runs(), s.weights()
    finally:
        ex.close()
    assert list(runs["state"]) == ["finished"]
    assert runs["effective"][0]["placement"]["shared_filesystem"] is False
    run_dir = tmp_path / "ship_artifacts" / runs["run_id"][0]
    assert len(weights) == 2 and all(Path(p).parent == run_dir and Path(p).is_file() for p in weights["path"])
    assert (run_dir / "worker.log").is_file()
    assert not (run_dir / ".driver-token").exists()
