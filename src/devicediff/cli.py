"""``devicediff``: command-line interface.

Every user error (bad study, bad store, bad data) ends with one line on stderr
naming what is wrong and how to fix it, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from devicediff.console import wide_console
from devicediff.errors import DevicediffError, StudyError, UsageError  # noqa: F401 - UsageError re-exported
from devicediff.study import load_study, parse_overrides, preset_names, preset_text

EXIT_USAGE = 2


def _store(args, *, create: bool = True):
    from devicediff.store import open_store

    return open_store(args.store, create=create)


# -- commands ----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from devicediff.executors import make_executor
    from devicediff.progress import Progress
    from devicediff.runner import preflight, run_study
    from devicediff.summary import print_study

    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data"] = args.data
    study = load_study(args.study, overrides=overrides or None)
    if args.only:
        for name in args.only:
            study.config(name)  # unknown name: StudyError
    preflight(study)
    if args.executor == "ray" and args.jobs != 1:
        print(f"devicediff: note: --jobs {args.jobs} is for the local executor and is ignored with --executor ray, "
              "which runs as many runs at once as the cluster's CPUs and GPUs hold", file=sys.stderr)
    executor = make_executor(args.executor, jobs=args.jobs, slots_per_gpu=args.gpu_slots, address=args.address)
    store = _store(args)
    console = wide_console()
    progress = Progress(enabled=not args.quiet, jobs=args.jobs)
    try:
        run_study(study, store, store_path=args.store, executor=executor, retry_failed=args.retry_failed,
                  progress=progress, only_configs=args.only)
        print_study(console, study, store)
        store_arg = "" if args.store == "devicediff.db" else f" --store {args.store}"
        console.print(f"runs stored in {args.store}; next: devicediff report{store_arg} --out report/", highlight=False)
    finally:
        executor.close()
        store.close()
    return 0


def cmd_status(args) -> int:
    from devicediff.study import study_from_definition
    from devicediff.summary import print_study

    store = _store(args, create=False)
    console = wide_console()
    studies = store.studies()
    if studies.empty:
        console.print("the store holds no studies yet")
    for _, s in studies.iterrows():
        d = s["definition"]
        try:
            study = study_from_definition(s["name"], d)
        except StudyError as e:
            console.print(f"{s['name']}: cannot re-read definition ({e})")
            continue
        print_study(console, study, store, verdicts=False)
    store.close()
    return 0


def cmd_env(args) -> int:
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
    from devicediff.export import export

    store = _store(args, create=False)
    try:
        paths = export(store, Path(args.out), fmt=args.format)
    finally:
        store.close()
    for p in paths:
        print(p)
    return 0


def cmd_report(args) -> int:
    from devicediff.report import write_report

    store = _store(args, create=False)
    try:
        path = write_report(store, Path(args.out), study_name=args.study)
    finally:
        store.close()
    print(path)
    return 0


def cmd_diverge(args) -> int:
    from devicediff.diverge import diverge_cli

    return diverge_cli(args)


def cmd_merge(args) -> int:
    from devicediff.merge import merge_stores

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devicediff", description=__doc__.splitlines()[0].strip("`: "))
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
    r.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    r.set_defaults(func=cmd_run)

    with_store(sub.add_parser("status", help="what the store holds")).set_defaults(func=cmd_status)

    e = sub.add_parser("env", help="this machine's environment fingerprint")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_env)

    pr = sub.add_parser("presets", help="list the built-in studies, or print one")
    pr.add_argument("name", nargs="?")
    pr.set_defaults(func=cmd_presets)

    x = with_store(sub.add_parser("export", help="write runs and metrics as CSV or Parquet"))
    x.add_argument("--format", choices=["csv", "parquet"], default="csv")
    x.add_argument("--out", required=True)
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
    d.set_defaults(func=cmd_diverge)

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
        return 130


if __name__ == "__main__":
    sys.exit(main())
