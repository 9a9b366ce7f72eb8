"""Run a study: expand the matrix into cells, skip what the store already has,
hand the rest to an executor, and write every record into the store.

Resuming is the default: a run that finished (or failed, or was skipped: a
failure is a result) is kept; one left ``running`` by a killed runner runs
again, from its last checkpoint where one exists.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devicediff.executors import Executor, LocalExecutor, Task
from devicediff.fingerprint import host_facts, machine_id
from devicediff.progress import Progress
from devicediff.protocol import FAILED, FINISHED, SKIPPED
from devicediff.store import RunInfo, Store
from devicediff.study import Cell, Study
from devicediff.workloads import resolve_workload_name


def run_id_for(study: Study, cell: Cell, machine: str) -> str:
    return hashlib.sha256(f"{study.study_id}|{cell.key}|{machine}".encode()).hexdigest()[:16]


def artifacts_root(store_path: str) -> Path:
    """``devicediff.db`` keeps its files in ``devicediff_artifacts/`` beside it."""
    if store_path == ":memory:":
        import tempfile

        return Path(tempfile.mkdtemp(prefix="devicediff_artifacts_"))
    p = Path(store_path).resolve()
    return p.with_name(p.stem + "_artifacts")


def build_job(study: Study, cell: Cell, run_id: str, run_dir: Path) -> dict:
    cfg = cell.config.to_dict()
    return {
        "run_id": run_id,
        "study": study.name,
        "workload": resolve_workload_name(study.workload, study.directory),
        "workload_params": study.workload_params,
        "config": cfg,
        "seed": cell.seed,
        "init_seed": cell.init_seed,
        "data_seed": cell.data_seed,
        "repeat": cell.repeat,
        "budget": {k: v for k, v in vars(study.budget).items()},
        "artifact_dir": str(run_dir),
        "checkpoint_path": str(run_dir / "checkpoint.pt"),
        "torch_python": sys.executable,  # builds initial weights for other frameworks (init_export)
    }


def preflight(study: Study) -> None:
    """Build the workload once per distinct parameter set in this process, so a
    bad parameter or unreadable data fails with one line before any run starts
    and before the store is touched."""
    from devicediff.workloads import make_workload

    name = resolve_workload_name(study.workload, study.directory)
    seen = set()
    for cfg in study.configs:
        if cfg.framework != "torch":
            continue  # other frameworks build their own copy; their params are checked in their worker
        params = {**study.workload_params, **cfg.params}
        key = repr(sorted(params.items()))
        if key not in seen:
            seen.add(key)
            make_workload(name, params)


def python_for(cell: Cell) -> str:
    if cell.config.python:
        return cell.config.python
    if cell.config.framework == "chainer":
        from devicediff.frameworks.chainer_env import chainer_python

        return chainer_python()
    return sys.executable


@dataclass
class StudyRun:
    study: Study
    machine: str
    started: int = 0
    kept: int = 0
    states: dict = field(default_factory=dict)


def plan(study: Study, store: Store, *, retry_failed: bool = False, machine: str | None = None):
    """Return ``(machine, todo_cells, kept_count)`` without running anything."""
    machine = machine or machine_id(host_facts())
    existing = store.runs(study.study_id)
    state = dict(zip(existing["run_id"], existing["state"])) if len(existing) else {}
    todo, kept = [], 0
    for cell in study.cells():
        rid = run_id_for(study, cell, machine)
        s = state.get(rid)
        if s == FINISHED or (s in (FAILED, SKIPPED) and not retry_failed):
            kept += 1
        else:
            todo.append((rid, cell))
    return machine, todo, kept


def run_study(
    study: Study,
    store: Store,
    *,
    store_path: str = "devicediff.db",
    executor: Executor | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
    only_configs: list[str] | None = None,
) -> StudyRun:
    executor = executor or LocalExecutor()
    store.put_study(study.study_id, study.name, study.to_dict())
    machine, todo, kept = plan(study, store, retry_failed=retry_failed)
    if only_configs:
        todo = [(rid, c) for rid, c in todo if c.config.name in only_configs]
    root = artifacts_root(store_path)
    tasks: list[Task] = []
    for rid, cell in todo:
        run_dir = root / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        job = build_job(study, cell, rid, run_dir)
        task = Task(
            run_id=rid,
            job=job,
            cpus=cell.config.threads or 1,
            gpus=1 if cell.config.is_gpu else 0,
            log_path=str(run_dir / "worker.log"),
            python=python_for(cell),
            ray_resources=dict(cell.config.ray_resources),
            label=f"{cell.config.name} seed={cell.seed}" + (f" rep={cell.repeat}" if study.repeats > 1 else ""),
        )
        tasks.append(task)
        store.begin_run(
            RunInfo(rid, study.study_id, cell.key, cell.config.name, cell.seed, cell.init_seed, cell.data_seed,
                    cell.repeat, study.workload, cell.config.to_dict(), machine),
            log_path=task.log_path,
        )
    result = StudyRun(study, machine, started=len(tasks), kept=kept)
    prog = progress or Progress(enabled=False)
    prog.begin(study.name, [t.label for t in tasks], kept=kept)
    t0 = time.time()
    try:
        for task, rec in executor.execute(tasks):
            store.record(task.run_id, rec)
            kind = rec["kind"]
            if kind == "started":
                prog.start(task.label)
            elif kind == "progress":
                prog.step(task.label, rec["step"], rec["total"])
            elif kind == "done":
                result.states[task.run_id] = rec.get("state")
                prog.finish(task.label, rec.get("state", FAILED), rec.get("error"))
    finally:
        prog.end(time.time() - t0)
    return result
