"""Run a study: check everything, expand the matrix into cells, skip what the store already
has, hand the rest to an executor, and write every record into the store.

``preflight`` checks everything a user can get wrong before anything is written: the
workload's parameters (each config's, through its framework), the data, and each config's
environment (the Chainer environment is made here if needed). Resuming is the default: a run
that finished (or failed, or was skipped: a failure is a result) is kept; one left
``running`` or ``interrupted`` by a stopped runner runs again, from its last checkpoint
where one exists.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from devicediff import frameworks
from devicediff.errors import StudyError
from devicediff.executors import Executor, LocalExecutor, Task
from devicediff.fingerprint import host_facts, machine_id
from devicediff.job import Job, Lockstep
from devicediff.progress import Progress
from devicediff.protocol import FAILED, FINISHED, INTERRUPTED, SKIPPED
from devicediff.store.sqlite import artifacts_dir
from devicediff.study import Cell, ExecConfig, Study
from devicediff.workloads import make_workload, resolve_workload_name, twin

if TYPE_CHECKING:  # the store (pandas) loads when a study is run, not when this module is imported
    from devicediff.store import Store


def run_id_for(study: Study, cell: Cell, machine: str) -> str:
    return hashlib.sha256(f"{study.study_id}|{cell.key}|{machine}".encode()).hexdigest()[:16]


def artifacts_root(store_path: str) -> Path:
    """``devicediff.db`` keeps its files in ``devicediff_artifacts/`` beside it."""
    if store_path == ":memory:":
        import tempfile

        return Path(tempfile.mkdtemp(prefix="devicediff_artifacts_"))
    return artifacts_dir(store_path)


def build_job(study: Study, cell: Cell, run_id: str, run_dir: Path, *, lockstep: Lockstep | None = None) -> Job:
    """The one place a job is made: a training run, or (with ``lockstep``) a diverge side,
    which keeps no checkpoints and no weight snapshots."""
    fw = frameworks.get(cell.config.framework)
    return Job(
        run_id=run_id,
        study=study.name,
        workload=resolve_workload_name(study.workload, study.directory),
        workload_params=dict(study.workload_params),
        config=cell.config.to_dict(),
        seed=cell.seed,
        init_seed=cell.init_seed,
        data_seed=cell.data_seed,
        repeat=cell.repeat,
        dropout_seed=cell.dropout_seed,
        noise_seed=cell.noise_seed,
        portable_random=study.portable_random,
        budget=dict(vars(study.budget)),
        artifact_dir=str(run_dir),
        checkpoint_path=None if lockstep else str(run_dir / fw.checkpoint_file),
        snapshots=lockstep is None and study.snapshots,
        lockstep=lockstep,
        torch_python=sys.executable,  # builds initial weights for other frameworks (init_export)
    )


def python_for(config: ExecConfig, *, wheelhouse: str | None = None) -> str:
    """The interpreter of a config's workers: the environment of its ``packages`` (made if
    needed, from ``wheelhouse`` if given), its own ``python``, else its framework's."""
    if config.packages:
        from devicediff.frameworks.envs import python_for_packages

        return python_for_packages(config.packages, wheelhouse=wheelhouse)
    return config.python or frameworks.get(config.framework).python()


def preflight(study: Study, configs: list[str] | None = None, *, wheelhouse: str | None = None,
              check: Callable[[str, dict], bool] | None = None) -> dict[str, str]:
    """Everything checked before the store is touched: each config's interpreter (making the
    Chainer environment if needed), that its framework has a version of the workload, and the
    workload built once per distinct parameter set (parameters, ranges, data): by ``check(name,
    params)`` where it says it did (``LocalExecutor.check_workload``: a prestarted worker of this
    interpreter), else in this process. Returns ``{config: python}``. Raises a
    ``DevicediffError`` (one line)."""
    name = resolve_workload_name(study.workload, study.directory)
    pythons, seen = {}, set()
    for cfg in study.configs:
        if configs and cfg.name not in configs:
            continue
        if cfg.framework != "torch" and twin(name, cfg.framework) is None:
            raise StudyError(f"configs[{cfg.name!r}].framework: workload {study.workload!r} has no {cfg.framework} "
                             f"version; use framework = \"torch\"")
        pythons[cfg.name] = python_for(cfg, wheelhouse=wheelhouse)
        params = frameworks.workload_params({**study.workload_params, **cfg.params})  # every framework's twin takes these
        key = repr(sorted(params.items()))
        if key not in seen:
            seen.add(key)
            if check is None or not check(name, params):
                make_workload(name, params)
    return pythons


@dataclass
class StudyRun:
    study: Study
    machine: str
    started: int = 0
    kept: int = 0
    states: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # run_id -> the done record's timing split
    wall: float = 0.0

    @property
    def failed(self) -> int:
        """Runs of this invocation that failed (a crash, NaN, an error in the workload)."""
        return sum(1 for s in self.states.values() if s == FAILED)


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


def make_task(study: Study, cell: Cell, rid: str, run_dir: Path, python: str) -> Task:
    """The executor's task for one cell (nothing created or recorded)."""
    return Task(
        run_id=rid,
        job=build_job(study, cell, rid, run_dir),
        cpus=cell.config.threads or 1,
        gpus=1 if cell.config.is_gpu else 0,
        log_path=str(run_dir / "worker.log"),
        python=python,
        ray_resources=dict(cell.config.ray_resources),
        label=f"{cell.config.name} seed={cell.seed}" + (f" rep={cell.repeat}" if study.repeats > 1 else ""),
    )


def likely_tasks(study: Study, only_configs: list[str] | None = None, *, store_path: str = "devicediff.db") -> list[Task]:
    """The tasks ``run_study`` will most likely hand its executor, known before preflight and
    without the store (as if nothing had run yet), for starting warm workers ahead of time
    (``LocalExecutor.prestart``). Configs whose interpreter is known only once an environment is
    built (``packages``, another framework's) are left out. A wrong guess costs only the idle
    workers it started."""
    root = artifacts_root(store_path) if store_path != ":memory:" else Path("/nonexistent")
    out = []
    for cell in study.cells():
        cfg = cell.config
        if (only_configs and cfg.name not in only_configs) or cfg.packages or cfg.framework != "torch":
            continue
        if frameworks.get(cfg.framework).environment and not cfg.python:
            continue
        rid = f"likely-{len(out)}"
        out.append(make_task(study, cell, rid, root / rid, cfg.python or sys.executable))
    return out


def _begin(study: Study, store: Store, rid: str, cell: Cell, machine: str, run_dir: Path,
           pythons: dict[str, str]) -> Task:
    """The executor's task for one cell, its run recorded as started in the store."""
    from devicediff.store import RunInfo

    run_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(study, cell, rid, run_dir, pythons.get(cell.config.name) or python_for(cell.config))
    store.begin_run(
        RunInfo(rid, study.study_id, cell.key, cell.config.name, cell.seed, cell.init_seed, cell.data_seed,
                cell.repeat, study.workload, cell.config.to_dict(), machine),
        log_path=task.log_path,
    )
    return task


def run_study(
    study: Study,
    store: Store,
    *,
    store_path: str = "devicediff.db",
    executor: Executor | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
    only_configs: list[str] | None = None,
    pythons: dict[str, str] | None = None,
) -> StudyRun:
    """Run what the store lacks. ``pythons`` is ``preflight``'s answer (computed here if not
    given). On Ctrl-C the runs that had not ended are marked ``interrupted`` and the
    ``KeyboardInterrupt`` goes on to the caller."""
    pythons = pythons if pythons is not None else preflight(study, only_configs)
    executor = executor or LocalExecutor()
    store.put_study(study.study_id, study.name, study.to_dict())
    machine, todo, kept = plan(study, store, retry_failed=retry_failed)
    if only_configs:
        todo = [(rid, c) for rid, c in todo if c.config.name in only_configs]
    root = artifacts_root(store_path)
    result = StudyRun(study, machine, started=len(todo), kept=kept)
    prog = progress or Progress(enabled=False)
    tasks: list[Task] = []
    begun: list[str] = []
    t0 = time.time()
    try:
        # inside the try: a Ctrl-C while runs are being recorded as started marks those interrupted too
        for rid, cell in todo:
            begun.append(rid)
            tasks.append(_begin(study, store, rid, cell, machine, root / rid, pythons))
        prog.begin(study.name, [t.label for t in tasks], kept=kept)
        for task, rec in executor.execute(tasks):
            store.record(task.run_id, rec)
            kind = rec["kind"]
            if kind == "started":
                prog.start(task.label)
            elif kind == "progress":
                prog.step(task.label, rec["step"], rec["total"])
            elif kind == "done":
                result.states[task.run_id] = rec.get("state")
                result.timing[task.run_id] = rec.get("timing")
                prog.finish(task.label, rec.get("state", FAILED), rec.get("error"))
    except KeyboardInterrupt:
        for rid in begun:
            if rid not in result.states:
                store.update_run(rid, state=INTERRUPTED, error="interrupted (Ctrl-C); runs again on resume")
        raise
    finally:
        result.wall = time.time() - t0
        prog.end(result.wall)
    return result
