"""Shared fixtures: tiny real studies (real MNIST, real subprocesses, real SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = """
name = "{name}"
reference = "cpu-1t"
[workload]
name = "autoencoder"
sizes = [32, 8]
batch_size = 50
train_size = 1000
eval_size = 500
[seeds]
count = {seeds}
[budget]
epochs = 1
metric_every = 5
[[configs]]
name = "cpu-1t"
threads = 1
[[configs]]
name = "cpu-2t"
threads = 2
"""


@pytest.fixture
def tiny_study(tmp_path: Path):
    def make(name: str = "tiny", seeds: int = 2, extra: str = "") -> Path:
        p = tmp_path / f"{name}.toml"
        p.write_text(TINY.format(name=name, seeds=seeds) + extra)
        return p

    return make


def devicediff(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as the console script does (no cwd on sys.path)."""
    launcher = "import sys; sys.path.pop(0); from devicediff.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", launcher, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
    )


def run_job_here(job) -> list[dict]:
    """Run one worker job in this process (``worker.run_job``) and return its records; the test
    process's torch thread count is put back afterwards (a job sets its config's)."""
    import io
    import json

    import torch

    from devicediff.protocol import RecordWriter
    from devicediff.worker import run_job

    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        run_job(job, RecordWriter(out))
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in out.getvalue().splitlines()]
