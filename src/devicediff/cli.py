"""The devicediff command-line interface.

Every user error (bad study, bad store, bad data) ends with one line on stderr
naming what is wrong and how to fix it, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from devicediff import __version__

from devicediff.console import wide_console
from devicediff.errors import DevicediffError, StudyError, UsageError  # noqa: F401 - UsageError re-exported
from devicediff.study import load_study, parse_overrides, preset_names, preset_text

# Exit codes (README): 0 every run finished (or was skipped for want of a device); 1 diverge found a
# difference beyond rounding, 4 a side outside its own rounding bound (suspect), 5 differing random
# draws (diverge.EXIT_CODES); 2 a usage error (nothing written); 3 some run failed or went NaN;
# 130 interrupted (Ctrl-C: unfinished runs are marked interrupted and resume).
EXIT_USAGE, EXIT_FAILED_RUNS, EXIT_INTERRUPTED = 2, 3, 130


def _store(args, *, create: bool = True, readonly: bool = False):
    from devicediff.store import open_store

    return open_store(args.store, create=create, readonly=readonly)


# -- commands ----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    t_cmd = time.perf_counter()
    import atexit
    import gc
    import threading

    # This process imported torch, pandas and scipy: at exit, freeze what exists so that the
    # interpreter's exit collections skip it (about 1-2 s on the 2-core machine; 0.3 s left).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)

    from devicediff.executors import make_executor
    from devicediff.progress import Progress
    from devicediff.runner import likely_tasks, preflight, run_study

    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data"] = args.data
    study = load_study(args.study, overrides=overrides or None)
    if args.name:
        study = dataclasses.replace(study, name=args.name)
    if args.only:
        for name in args.only:
            study.config(name)  # unknown name: StudyError
    executor = None
    try:
        if args.executor == "local":
            # Warm workers load torch while this process does its preflight (docs/parallel.md).
            executor = make_executor("local", jobs=args.jobs, slots_per_gpu=args.gpu_slots, isolate=args.isolate,
                                     prestart=True)
            executor.prestart(likely_tasks(study, args.only, store_path=args.store))
        # The store's and the final table's modules (pandas, scipy: 1-2 s) load while this process
        # waits for the preflight and the runs; an error there is raised again where they are used.
        imports = threading.Thread(target=_import_quietly, args=("devicediff.store", "devicediff.tables"), daemon=True)
        imports.start()
        # The workload is built for the preflight in a prestarted worker where one can: this
        # process then never imports torch.
        pythons = preflight(study, args.only, wheelhouse=args.wheelhouse,
                            check=executor.check_workload if executor is not None else None)
        if args.executor == "ray" and args.jobs != 1:
            print(f"devicediff: note: --jobs {args.jobs} is for the local executor and is ignored with --executor ray, "
                  "which runs as many runs at once as the cluster's CPUs and GPUs hold", file=sys.stderr)
        if executor is None:
            executor = make_executor(args.executor, jobs=args.jobs, slots_per_gpu=args.gpu_slots,
                                     address=args.address, isolate=args.isolate)
        store = _store(args)
        console = wide_console()
        progress = Progress(enabled=not args.quiet, jobs=args.jobs)
        try:
            if args.until_decided:
                from devicediff.decide import look_line, run_until_decided

                run_until_decided(study, store, max_seeds=args.max_seeds, batch=args.batch, executor=executor,
                                  progress=progress, store_path=args.store, retry_failed=args.retry_failed,
                                  only_configs=args.only, pythons=pythons,
                                  on_look=lambda p: console.print(look_line(p), highlight=False))
            else:
                res = run_study(study, store, store_path=args.store, executor=executor, retry_failed=args.retry_failed,
                                progress=progress, only_configs=args.only, pythons=pythons)
                show_efficiency(console, store, study, res, time.perf_counter() - t_cmd, args.jobs)
            for name, why in getattr(executor, "fallbacks", {}).items():
                console.print(f"config {name}: one process per run ({why})", highlight=False)
            imports.join()
            from devicediff.tables import print_study

            print_study(console, study, store)
            store_arg = "" if args.store == "devicediff.db" else f" --store {args.store}"
            console.print(f"runs stored in {args.store}; next: devicediff report{store_arg} --out report/", highlight=False)
            failed = failed_runs(store, study, args.only)
        finally:
            store.close()
    finally:
        if executor is not None:
            executor.close()
    if failed:
        print(f"devicediff: {failed} run(s) failed or diverged (see the table above and each run's worker.log); "
              f"exit {EXIT_FAILED_RUNS}", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return 0


def _import_quietly(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - whoever needs the module imports it again and sees the error
            return


def show_efficiency(console, store, study, res, wall: float, slots: int) -> None:
    """Σ(train + eval) ÷ (wall × slots) of this invocation, printed and stored for the report."""
    from devicediff.analysis.efficiency import describe, efficiency

    runs = store.runs(study.study_id)
    runs = runs[runs["run_id"].isin(list(res.states))].copy()
    if runs.empty:
        return
    runs["timing"] = runs["run_id"].map(res.timing)
    e = efficiency(runs, wall, slots)
    console.print(describe(e), highlight=False)
    store.put_analysis(study.study_id, "efficiency", f"{time.time():.3f}", e)


def failed_runs(store, study, only: list[str] | None) -> int:
    """Runs of ``study`` in the store (its selected configs) whose state is ``failed``."""
    runs = store.runs(study.study_id)
    if only and len(runs):
        runs = runs[runs["config"].isin(only)]
    return int((runs["state"] == "failed").sum()) if len(runs) else 0


def cmd_status(args) -> int:
    from devicediff.tables import print_per_seed, print_study

    store = _store(args, create=False, readonly=True)
    console = wide_console()
    try:
        studies = store.studies()
        if studies.empty:
            console.print("the store holds no studies yet")
        for _, s in studies.iterrows():
            print_study(console, s["study_id"], store)
            if args.per_seed:
                print_per_seed(console, s["study_id"], store)
    finally:
        store.close()
    return 0


def cmd_plan(args) -> int:
    from devicediff.tables import print_plan

    study = load_study(args.study) if args.study.endswith(".toml") else args.study
    store = _store(args, create=False, readonly=True)
    try:
        print_plan(wide_console(), study, store)
    finally:
        store.close()
    return 0


def cmd_env(args) -> int:
    if args.action == "build":
        if not args.study:
            raise UsageError("env build: give a study, e.g. devicediff env build upgrade-check")
        from devicediff.frameworks.envs import build_environments

        build_environments(load_study(args.study), wheelhouse=args.wheelhouse)
        return 0
    from devicediff.fingerprint import fingerprint, host_facts, machine_id

    try:
        import torch  # noqa: F401 - so the fingerprint includes torch, CUDA and cuDNN
    except ImportError:
        pass
    fp = fingerprint()
    fp["machine_id"] = machine_id(host_facts())
    if args.json:
        print(json.dumps(fp, indent=2, default=str))
        return 0
    console = wide_console()
    for k, v in fp.items():
        console.print(f"[bold]{k}[/bold]: {v}", highlight=False)
    return 0


def cmd_presets(args) -> int:
    console = wide_console()
    if args.name:
        if args.name not in preset_names():
            raise StudyError(f"preset {args.name!r} unknown; choose one of {preset_names()}")
        print(preset_text(args.name))
        return 0
    for name in preset_names():
        study = load_study(name)
        text = " ".join(study.description.split())
        desc = text.split(". ")[0].rstrip(".") + "." if text else ""
        console.print(f"[bold]{name}[/bold]: {len(study.configs)} configs × {len(study.seeds)} seeds — {desc}", highlight=False)
    return 0


def cmd_export(args) -> int:
    if args.format == "mlflow":
        if not args.tracking_uri:
            raise UsageError("--format mlflow needs --tracking-uri URI (e.g. sqlite:///mlflow.db or http://host:5000)")
    elif not args.out:
        raise UsageError(f"--format {args.format} needs --out DIR")
    store = _store(args, create=False, readonly=True)
    try:
        if args.format == "mlflow":
            from devicediff.analysis.load import verdicts
            from devicediff.export.mlflow import export_mlflow

            print(export_mlflow(store, args.tracking_uri, experiment=args.experiment, study=args.study,
                                verdicts=verdicts(store, args.study)))
            return 0
        from devicediff.export import export

        paths = export(store, Path(args.out), fmt=args.format)
    finally:
        store.close()
    for p in paths:
        print(p)
    return 0


def cmd_report(args) -> int:
    from devicediff.report import write_report

    store = _store(args, create=False, readonly=True)
    try:
        path = write_report(store, Path(args.out), study_name=args.study)
    finally:
        store.close()
    print(path)
    return 0


def cmd_diverge(args) -> int:
    """Print the tables and the summary line, store the payload; exit 0 (identical or rounding),
    1 (beyond rounding), 4 (suspect), 5 (random) or 2 (a side could not run: ``DivergeError``)."""
    from devicediff.diverge import EXIT_CODES, diverge, print_divergence

    study = load_study(args.study, overrides=parse_overrides(args.set) or None)
    study.config(args.a)  # unknown names fail here, before anything runs
    study.config(args.b)
    console = wide_console()
    store = _store(args)
    try:
        with step_reporter(f"diverge: {args.a} (A) and {args.b} (B) in lockstep, {args.steps} steps") as on_step:
            payload = diverge(study, args.a, args.b, steps=args.steps, seed=args.seed, threshold=args.threshold,
                              store=store, store_path=args.store, ops=not args.no_ops, on_step=on_step)
    finally:
        store.close()
    print_divergence(console, payload)
    return EXIT_CODES[payload["summary"]["verdict"]]


@contextmanager
def step_reporter(title: str):
    """``on_step(side, step, total)`` for long work: a live line on a terminal, else one line
    per step on stderr (CI logs), so progress shows either way."""
    err = wide_console(stderr=True)
    seen: dict[str, int] = {}
    t0 = time.perf_counter()

    def text(total: int) -> str:
        return (f"{title}: A step {seen.get('A', 0)}/{total}, B step {seen.get('B', 0)}/{total} "
                f"({time.perf_counter() - t0:.0f} s)")

    if err.is_terminal:
        with err.status(title) as status:
            def on_step(side: str, step: int, total: int) -> None:
                seen[side] = step
                status.update(text(total))

            yield on_step
    else:
        print(f"{title}: starting both sides", file=sys.stderr, flush=True)

        def on_step(side: str, step: int, total: int) -> None:
            seen[side] = step
            print(text(total), file=sys.stderr, flush=True)

        yield on_step


def cmd_chainer_gradients(args) -> int:
    """The first window of a study's Chainer config with reused vs fresh frame buffers, as JSON."""
    from devicediff.executors.base import worker_env
    from devicediff.runner import build_job, preflight

    study = load_study(args.study, overrides=parse_overrides(args.set) or None)
    cfgs = [c for c in study.configs if c.framework == "chainer" and (args.config is None or c.name == args.config)]
    if not cfgs:
        raise UsageError(f"study {study.name!r} has no Chainer config{' named ' + repr(args.config) if args.config else ''}")
    seed = study.seeds[0] if args.seed is None else args.seed
    cell = study.cell(cfgs[0], seed)
    python = preflight(study, [cfgs[0].name])[cfgs[0].name]
    with tempfile.TemporaryDirectory(prefix="devicediff_gradients_") as tmp:
        job = build_job(study, cell, "gradients", Path(tmp))
        r = subprocess.run([python, "-m", "devicediff.frameworks.chainer.gradients"], input=job.to_json(),
                           text=True, env=worker_env(job))
    return r.returncode


def cmd_merge(args) -> int:
    from devicediff.store.merge import merge_stores

    added = merge_stores([str(p) for p in args.stores], args.out)
    print(f"merged into {args.out}: {added} new run(s)")
    return 0


# -- parser ----------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:  # long: one block per command, read as a table
    p = argparse.ArgumentParser(prog="devicediff", description="Does the hardware or software configuration change "
                                "what my network learns? Train a workload under a matrix of execution configs and seeds, "
                                "get a verdict, and find where two configs part ways.")
    p.add_argument("--version", action="version", version=f"devicediff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_store(sp):
        sp.add_argument("--store", default="devicediff.db", help="SQLite store file (default: devicediff.db)")
        return sp

    r = with_store(sub.add_parser("run", help="train every run of a study (resumes)"))
    r.add_argument("study", nargs="?", default="quick", help="a .toml study file or a preset name (default: quick)")
    r.add_argument("--jobs", "-j", type=positive_int, default=1, help="runs at once (CPU runs get disjoint cores)")
    r.add_argument("--gpu-slots", type=positive_int, default=1,
                   help="runs sharing one GPU (with --executor ray: each GPU run asks for 1/N of a GPU)")
    r.add_argument("--executor", choices=["local", "ray"], default="local")
    r.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    r.add_argument("--data", default=None, help="override the workload's data (e.g. a video file or folder)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a workload parameter")
    r.add_argument("--only", action="append", metavar="CONFIG", help="run only these configs (repeatable)")
    r.add_argument("--retry-failed", action="store_true", help="run failed and skipped runs again")
    r.add_argument("--until-decided", action="store_true",
                   help="add seeds in batches until every config's primary verdict is decided (group-sequential)")
    r.add_argument("--max-seeds", type=positive_int, default=30, help="with --until-decided: at most this many seeds")
    r.add_argument("--batch", type=positive_int, default=3, help="with --until-decided: seeds added per look")
    r.add_argument("--wheelhouse", metavar="DIR", help="build package environments (packages = [...]) from these wheels only")
    r.add_argument("--name", default=None, help="store the study under this name (e.g. a variant of a preset)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    r.add_argument("--isolate", action="store_true",
                   help="a fresh worker process for every run (default: one warm worker per config and slot)")
    r.set_defaults(func=cmd_run)

    st = with_store(sub.add_parser("status", help="what the store holds, and the verdicts"))
    st.add_argument("--per-seed", action="store_true", help="also a config x seed table of the primary metric")
    st.set_defaults(func=cmd_status)

    pl = with_store(sub.add_parser("plan", help="seeds each config needs for a decided primary verdict, from a pilot"))
    pl.add_argument("study", help="study name or id in the store, or a .toml file")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("env", help="this machine's environment fingerprint; `env build STUDY` makes a study's environments")
    e.add_argument("--json", action="store_true")
    e.add_argument("action", nargs="?", choices=["build"], help="build: make every environment STUDY's configs need")
    e.add_argument("study", nargs="?", help="with build: a study file or preset")
    e.add_argument("--wheelhouse", metavar="DIR", help="with build: install from these local wheels only")
    e.set_defaults(func=cmd_env)

    pr = sub.add_parser("presets", help="list the built-in studies, or print one")
    pr.add_argument("name", nargs="?")
    pr.set_defaults(func=cmd_presets)

    x = with_store(sub.add_parser("export", help="runs, metrics and verdicts as CSV or Parquet, or into MLflow"))
    x.add_argument("--format", choices=["csv", "parquet", "mlflow"], default="csv")
    x.add_argument("--out", help="folder for the tables (csv, parquet)")
    x.add_argument("--tracking-uri", help="MLflow tracking URI (with --format mlflow), e.g. sqlite:///mlflow.db")
    x.add_argument("--experiment", help="MLflow experiment for every run (default: one per study)")
    x.add_argument("--study", help="only this study (name or id)")
    x.set_defaults(func=cmd_export)

    rep = with_store(sub.add_parser("report", help="write report.html and PNG plots"))
    rep.add_argument("--out", required=True)
    rep.add_argument("--study", default=None, help="study name (default: every study in the store)")
    rep.set_defaults(func=cmd_report)

    d = with_store(sub.add_parser("diverge", help="step two configs in lockstep: where do they part ways?"))
    d.add_argument("study")
    d.add_argument("--a", required=True, help="config A (e.g. the reference)")
    d.add_argument("--b", required=True, help="config B")
    d.add_argument("--steps", type=positive_int, default=5)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--threshold", type=float, default=100.0, help="beyond-rounding factor (default 100)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a workload parameter")
    d.add_argument("--no-ops", action="store_true",
                   help="stop at the module: skip the operation pass that names the first operation that differs")
    d.set_defaults(func=cmd_diverge)

    g = sub.add_parser("chainer-gradients",
                       help="reused vs fresh frame buffers: gradient error of a Chainer config's first window")
    g.add_argument("study", help="a .toml study file or a preset name with a Chainer config")
    g.add_argument("--config", default=None, help="the Chainer config (default: the first)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a workload parameter")
    g.set_defaults(func=cmd_chainer_gradients)

    m = sub.add_parser("merge", help="merge stores from several machines")
    m.add_argument("stores", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except DevicediffError as e:
        print(f"devicediff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("devicediff: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
