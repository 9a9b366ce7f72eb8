"""Executors run tasks (one worker process each) and stream back their records.

``Executor.execute(tasks)`` yields ``(task, record)`` pairs in the parent's
thread, so the parent stays the only writer of the store. Every task ends with
exactly one ``done`` record, synthesised by the executor if the worker died.
"""

from __future__ import annotations

import os
import signal
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import devicediff
from devicediff.job import Job

SRC_DIR = str(Path(devicediff.__file__).resolve().parent.parent)


@dataclass
class Task:
    run_id: str
    job: Job
    cpus: int  # cores this run needs (its threads; 1 for GPU runs)
    gpus: int  # 0 or 1
    log_path: str
    python: str = sys.executable
    ray_resources: dict = field(default_factory=dict)
    label: str = ""


class Executor(ABC):
    @abstractmethod
    def execute(self, tasks: list[Task]) -> Iterator[tuple[Task, dict]]:
        """Run every task; yield its records as they arrive."""

    def close(self) -> None:
        pass


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def worker_env(job: Job, *, base: dict | None = None, gpu_index: int | None = None) -> dict:
    """Environment for a run's worker, fixed before the framework loads."""
    cfg = job.config
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = SRC_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if cfg.get("threads"):
        for k in _THREAD_VARS:
            env[k] = str(cfg["threads"])
    if cfg.get("deterministic"):
        # Required by cuBLAS for deterministic results (PyTorch "Reproducibility" notes).
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if str(cfg.get("device", "cpu")).startswith("cuda"):
        if gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run must not touch a GPU
    env.update(cfg.get("env", {}))
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory, or killed)" if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {code} before reporting a result"


def log_tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
