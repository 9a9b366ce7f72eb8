"""Run two configs in lockstep, each in its own worker, and compare their step files.

Each side is the normal job of its config (``runner.build_job``) plus
``job["lockstep"]``; it runs in ``python -m devicediff.worker`` started by the
local executor (``run_worker`` with ``worker_env``), so threads, device, cuDNN
and TF32 settings hold exactly as in ``devicediff run``, and a side may use
another Python environment (``python =`` in its config, or Chainer). The sides
never talk to each other: each teacher-forces itself to its own float64
reference (docs/diverge.md), so they may run at the same time (when the
machine has cores for both) or one after the other. The parent compares step
``s`` as soon as both files exist and then deletes them. When the verdict is
beyond rounding or suspect, the operation pass (``_op_pass``) runs both sides
again up to the first such step and names the first operation that differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from devicediff.diverge.compare import (
    BEYOND, IDENTICAL, RANDOM, ROUNDING, SUSPECT, SUSPECT_FACTOR, Row, compare_free, compare_step, first, random_pairing,
    start_gap,
)
from devicediff.stepfiles import read_step
from devicediff.executors.base import Task, worker_env
from devicediff.executors.local import LocalExecutor, available_cores
from devicediff.errors import DivergeError, StudyError
from devicediff.job import Lockstep
from devicediff.protocol import FINISHED
from devicediff.study import Cell, Study

SIDES = ("A", "B")
OPS_RECORD = "ops.json"  # what a side's operation pass writes (devicediff.frameworks.torch.ops.RECORD)
CHAINER_OPS_SUMMARY = "ops-summary.json"  # and a Chainer side's summary of it (frameworks.chainer.lockstep.OPS_SUMMARY)
#: fields of a side's ``lockstep`` record kept for the comparison (see ``LockstepSide.info``)
INFO_FIELDS = ("sha256", "parity", "random", "random_modules", "random_devices", "random_generators")
KIND_WORDS = {"fwd": "output of", "loss": "loss", "grad": "gradient of", "weight": "updated weight",
              "buffer": "buffer", "optim": "optimizer state", "scaler": "gradient-scaler state",
              "carry": "carried state"}


def analysis_key(a: str, b: str, seed: int, steps: int) -> str:
    return f"{a}|{b}|seed={seed}|steps={steps}"


def default_workdir(store_path: str | None, study: Study, key: str) -> Path:
    if not store_path or store_path == ":memory:":
        return Path(tempfile.mkdtemp(prefix="devicediff_diverge_"))
    from devicediff.runner import artifacts_root

    tag = hashlib.sha256(f"{study.study_id}|{key}".encode()).hexdigest()[:12]
    return artifacts_root(store_path) / "diverge" / tag


def _task(study: Study, cell: Cell, side: str, workdir: Path, steps: int, repeat: str, free: bool,
          python: str, ops_at: int | None = None) -> Task:
    from devicediff.runner import build_job

    run_dir = workdir / side
    if run_dir.exists():
        shutil.rmtree(run_dir)  # stale step files of an interrupted diverge must not be read
    run_dir.mkdir(parents=True)
    run_id = f"diverge-{side}-" + hashlib.sha256(f"{study.study_id}|{cell.key}|{workdir}".encode()).hexdigest()[:10]
    job = build_job(study, cell, run_id, run_dir,
                    lockstep=Lockstep(steps=int(steps), dir=str(run_dir / "steps"), repeat=repeat, free=bool(free),
                                      ops_at=ops_at))
    cfg = cell.config
    # Cores this side needs, so the executor runs the sides together only when they fit: its
    # threads; a GPU side one (it is not pinned, so its float64 reference may use more); a CPU
    # side without a thread count all of them, as torch would take in a normal run.
    cpus = cfg.threads or (1 if cfg.is_gpu else len(available_cores()))
    return Task(
        run_id=run_id, job=job, cpus=cpus, gpus=1 if cfg.is_gpu else 0,
        log_path=str(run_dir / "worker.log"), python=python, label=f"{side}: {cfg.name}",
    )


def _combined(rows: list[Row], kind: str) -> dict:
    """One number for all tensors of a kind: ‖A−B‖ and each drift over the concatenation."""
    rs = [r for r in rows if r.kind == kind and math.isfinite(r.l2) and math.isfinite(r.magnitude)]
    if not rs:
        return {}
    mag = math.sqrt(sum(r.magnitude**2 for r in rs))
    sq = lambda f: math.sqrt(sum((f(r) * r.magnitude) ** 2 for r in rs)) / mag if mag > 0 else 0.0  # noqa: E731
    return {
        "rel_l2": math.sqrt(sum(r.l2**2 for r in rs)) / mag if mag > 0 else 0.0,
        "err_a": sq(lambda r: r.err_a if math.isfinite(r.err_a) else 0.0),
        "err_b": sq(lambda r: r.err_b if math.isfinite(r.err_b) else 0.0),
    }


def step_summary(step: int, rows: list[Row], free_rows: list[Row], gap: float | None, timing: dict) -> dict:
    worst = max(rows, key=lambda r: r.ratio if not math.isnan(r.ratio) else -1.0, default=None)
    out = {
        "step": step,
        "tensors": len(rows),
        "identical": sum(r.cls == IDENTICAL for r in rows),
        "rounding": sum(r.cls == ROUNDING for r in rows),
        "beyond": sum(r.cls == BEYOND for r in rows),
        "suspect": sum(r.cls == SUSPECT for r in rows),
        "random": sum(r.cls == RANDOM for r in rows),
        "worst": f"{worst.kind} {worst.name}" if worst else None,
        "max_ratio": worst.ratio if worst else None,
        "start_gap": gap,
        "weights": _combined(rows, "weight"),
        "free_weights": _combined(free_rows, "weight"),
        "timing": timing,
    }
    loss = [r for r in free_rows if r.kind == "loss"]
    if loss:
        out["free_loss_diff"] = loss[0].max_abs
        out["free_loss_class"] = loss[0].cls
    fw = [r for r in free_rows if r.kind == "weight"]
    if fw:
        out["free_max_ratio"] = max(r.ratio for r in fw)
    return out


def _describe(r: Row | None, threshold: float | None = None) -> dict | None:
    if r is None:
        return None
    out = {"step": r.step, "kind": r.kind, "name": r.name, "module": r.module, "ratio": r.ratio,
           "rel_l2": r.rel_l2, "note": r.note, "sensitivity": r.sensitivity}
    if threshold and math.isfinite(r.ratio):
        out["margin"] = r.ratio / threshold  # how far past the threshold (beyond) or below it
    return out


def hash_row(step: int, rows: list[Row], sha_a: str | None, sha_b: str | None) -> Row | None:
    """Cross-check of ``identical``: when every recorded weight and buffer of the step has the
    same bits, the sides' state hashes must agree too; if not, something that carries over was
    not recorded, and the step cannot be called identical."""
    if not sha_a or not sha_b or sha_a == sha_b:
        return None
    state = [r for r in rows if r.kind in ("weight", "buffer")]
    if not state or any(r.cls != IDENTICAL for r in state):
        return None
    return Row(step, "state", "sha256", "state", 0, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, 0.0,
               math.nan, math.inf, BEYOND, "state hashes differ although every recorded weight and buffer is "
               "bitwise equal: something that carries over was not recorded")


def precision_word(cfg: dict | None) -> str:
    """What a side's arithmetic is called in messages: bf16/fp16 autocast, TF32, float32."""
    cfg = cfg or {}
    prec = cfg.get("precision") or "fp32"
    if prec != "fp32":
        return prec.replace("-autocast", " autocast")
    if str(cfg.get("device", "cpu")).startswith("cuda") and cfg.get("tf32"):
        return "TF32"
    return "float32"


def suspect_lines(rows: list[Row], names: dict, cfgs: dict | None = None) -> list[str]:
    """One line per side with a suspect tensor (the first, in computation order), e.g. "B's
    gradient of fc2.weight is 1.0e-03 from its own float64 reference; float32 explains <= 3e-07 here"."""
    out = []
    for side in SIDES:
        own = "own_a" if side == "A" else "own_b"
        bound = "bound_a" if side == "A" else "bound_b"
        r = next((r for r in rows if r.cls != IDENTICAL and getattr(r, own) > SUSPECT_FACTOR), None)
        if r is None:
            continue
        err = getattr(r, own) * getattr(r, bound)
        word = KIND_WORDS.get(r.kind, r.kind)
        out.append(f"{side}'s {word} {r.name} (step {r.step}) is {err:.1e} from its own float64 reference; "
                   f"{precision_word((cfgs or {}).get(side))} explains <= {getattr(r, bound):.0e} here")
    return out


def sensitivity(rows: list[Row], step: int) -> dict | None:
    """The smallest relative change to a tensor the threshold would call beyond rounding at
    ``step``: median over its tensors and the least sensitive one."""
    rs = [r for r in rows if r.step == step and r.cls != RANDOM and math.isfinite(r.sensitivity)]
    if not rs:
        return None
    vals = sorted(r.sensitivity for r in rs)
    worst = max(rs, key=lambda r: r.sensitivity)
    return {"step": step, "median": vals[len(vals) // 2], "max": worst.sensitivity, "max_kind": worst.kind,
            "max_name": worst.name, "tensors": len(rs)}


def _largest_own(rows: list[Row], side: str, config: str) -> dict | None:
    """A side's largest own error over its rounding bound, among rows that are not identical
    (a number is never reported for a tensor the table calls identical)."""
    own = "own_a" if side == "A" else "own_b"
    err = "err_a" if side == "A" else "err_b"
    fin = [r for r in rows if r.cls != IDENTICAL and math.isfinite(getattr(r, own))]
    if fin:
        w = max(fin, key=lambda r: getattr(r, own))
        return {"config": config, "own": getattr(w, own), "rel": getattr(w, err), "step": w.step, "kind": w.kind,
                "name": w.name}
    fin = [r for r in rows if r.cls != IDENTICAL and math.isfinite(getattr(r, err))]
    if not fin:
        return None
    w = max(fin, key=lambda r: getattr(r, err))
    return {"config": config, "own": None, "rel": getattr(w, err), "step": w.step, "kind": w.kind, "name": w.name}


def summarize(rows: list[Row], free_rows: list[Row], steps: list[dict], a: str, b: str,
              threshold: float = 100.0, parity: dict | None = None, cfgs: dict | None = None) -> dict:
    fd = first(rows, (ROUNDING, BEYOND, SUSPECT, RANDOM))
    fb = first(rows, (BEYOND,))
    fsus = first(rows, (SUSPECT,))
    frnd = first(rows, (RANDOM,))
    names = {"A": a, "B": b}
    parity_lines = [f"{side}'s reference lacks something: its float32 replay differs from {side} at {p['tensor']}"
                    for side, p in (parity or {}).items() if p]
    sus = suspect_lines(rows, names, cfgs)
    if fb:
        verdict = BEYOND
    elif fsus or parity_lines:
        verdict = SUSPECT
    elif frnd:
        verdict = RANDOM
    else:
        verdict = ROUNDING if fd else IDENTICAL
    nd = {side: any((r.nd_a if side == "A" else r.nd_b) > 0 for r in rows) for side in SIDES}
    focus = (fb or fsus or frnd or fd or (rows[0] if rows else None))
    s = {
        "verdict": verdict,
        "first_difference": _describe(fd),
        "first_beyond": _describe(fb, threshold),
        "first_suspect": _describe(fsus),
        "first_random": _describe(frnd),
        "suspect": sus,
        "parity": parity_lines,
        "sensitivity": sensitivity(rows, focus.step) if focus else None,
        # keyed by side (A, B): the two configs may be the same one, run twice
        "nondeterministic": {"A": nd["A"], "B": nd["B"]},
        "largest_rounding": {side: _largest_own(rows, side, names[side]) for side in SIDES},
        "max_ratio_rounding": max((r.ratio for r in rows if r.cls == ROUNDING), default=0.0),
    }
    if steps and steps[-1].get("free_weights"):
        growth = [st["free_weights"].get("rel_l2") for st in steps]
        s["free_running"] = {"weights_rel_l2": growth, "final": growth[-1]}
    s["line"] = summary_line(s)
    return s


def summary_line(s: dict) -> str:
    fd, fb = s["first_difference"], s["first_beyond"]
    first_txt = f"step {fd['step']}, {fd['name']} {fd['kind']}" if fd else "none (bitwise identical)"
    if fb:
        beyond_txt = f"step {fb['step']}, {fb['kind']} of {fb['name']} (ratio {fb['ratio']:.3g}" + (
            f", {fb['margin']:.3g}x the threshold" if fb.get("margin") else "") + (
            f", {fb['note']})" if fb["note"] else ")")
    else:
        beyond_txt = "never"
    line = f"first difference: {first_txt}; beyond rounding first at: {beyond_txt}; verdict: {s['verdict']}"
    fr = s.get("first_random")
    if s["verdict"] == RANDOM and fr:
        line += f" (step {fr['step']}, {fr['kind']} {fr['name']}: {fr['note']})"
    for extra in list(s.get("parity") or []) + list(s.get("suspect") or []):
        line += f"; {extra}"
    return line


class _Collector:
    """What the two sides report, and the comparison of each step as soon as both have written it
    (the step files are deleted after, unless ``keep_files``)."""

    def __init__(self, steps: int, threshold: float, free: bool, keep_files: bool, on_step):
        self.steps, self.threshold, self.free, self.keep_files, self.on_step = steps, threshold, free, keep_files, on_step
        self.arrived: dict[str, dict[int, str]] = {s: {} for s in SIDES}
        self.timing: dict[str, dict[int, dict]] = {s: {} for s in SIDES}
        self.info: dict[str, dict[int, dict]] = {s: {} for s in SIDES}
        self.parity: dict[str, dict | None] = {}
        self.done: dict[str, dict] = {}
        self.effective: dict[str, dict] = {}
        self.env: dict[str, dict] = {}
        self.rows: list[Row] = []
        self.free_rows: list[Row] = []
        self.per_step: list[dict] = []
        self.prev: dict = {"A": None, "B": None}
        self.compare_time = 0.0
        self.next = 1
        self.unshared: str | None = None  # why an earlier step's draws were not shared, once one was

    def take(self, side: str, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "effective":
            self.effective[side] = rec.get("settings", {})
        elif kind == "env":
            fp = rec.get("fingerprint", {})
            self.env[side] = {k: fp.get(k) for k in ENV_FIELDS if k in fp}
        elif kind == "lockstep":
            step = int(rec["step"])
            self.arrived[side][step] = rec["path"]
            self.timing[side][step] = rec.get("timing", {})
            self.info[side][step] = {k: rec.get(k) for k in INFO_FIELDS if rec.get(k) is not None}
            if step == 1:
                self.parity[side] = rec.get("parity")
            if self.on_step:
                self.on_step(side, step, self.steps)
        elif kind == "done":
            self.done[side] = rec
        while self.next in self.arrived["A"] and self.next in self.arrived["B"]:
            self._compare(self.next)
            self.next += 1

    def _compare(self, n: int) -> None:
        tc = time.perf_counter()
        fa, fb = read_step(self.arrived["A"][n]), read_step(self.arrived["B"][n])
        ia, ib = self.info["A"].get(n, {}), self.info["B"].get(n, {})
        step_rows = compare_step(fa, fb, n, self.threshold, ia, ib, carried=self.unshared)
        why = random_pairing(ia, ib)
        if why and self.unshared is None:
            self.unshared = f"the teacher states carry step {n}'s {why}"
        hr = hash_row(n, step_rows, ia.get("sha256"), ib.get("sha256"))
        if hr is not None:
            step_rows.append(hr)
        step_free = compare_free(fa, fb, n, self.threshold) if self.free else []
        gap = start_gap(self.prev["A"], self.prev["B"])
        self.prev = {"A": _weights_only(fa), "B": _weights_only(fb)}
        self.rows += step_rows
        self.free_rows += step_free
        if not self.keep_files:
            for s in SIDES:
                Path(self.arrived[s][n]).unlink(missing_ok=True)
        dt = time.perf_counter() - tc
        self.compare_time += dt
        self.per_step.append(step_summary(n, step_rows, step_free, gap,
                                          {"A": self.timing["A"].get(n, {}), "B": self.timing["B"].get(n, {}),
                                           "compare": round(dt, 6)}))


ENV_FIELDS = ("cpu_model", "cpu_count", "gpus", "cuda_runtime", "cudnn", "libraries")
RULE = ("ratio = |A-B| / (|A-R_A| + |B-R_B| + |A-A'| + |B-B'| + floor); beyond rounding if ratio > threshold; "
        "suspect if a side's own error (its op replayed in float64 on its own inputs) > "
        f"{SUSPECT_FACTOR:g} x its rounding bound (|A|.|B| x u x reduction length); random if draws not shared")


def _weights_only(arrs: dict) -> dict:
    """What the next step's start gap needs of a step file."""
    return {k: v for k, v in arrs.items() if k.startswith(("ref64/weight/", "weight/"))}


def _check_sides(c: _Collector, cfgs: dict, tasks: dict, steps: int, workdir: Path) -> None:
    for side in SIDES:
        rec = c.done.get(side, {})
        if rec.get("state") != FINISHED:
            what = "was skipped" if rec.get("state") == "skipped" else "failed"
            raise DivergeError(f"side {side} ({cfgs[side].name}) {what}: {rec.get('error') or 'no result'} "
                               f"(log: {tasks[side].log_path})")
    if c.next <= steps:
        raise DivergeError(f"the sides wrote steps up to {c.next - 1} of {steps}; see {workdir}/*/worker.log")


def _op_pass(study: Study, cells: dict, pythons: dict, workdir: Path, step: int, keep_files: bool) -> dict:
    """The operation pass (docs/diverge.md): both sides again up to ``step``, which each records
    operation by operation, then :func:`localise_records`."""
    t0 = time.perf_counter()
    cfgs = {side: cells[side].config for side in SIDES}
    odir = workdir / "ops"
    tasks = {side: _task(study, cells[side], side, odir, step, "never", False, pythons[cfgs[side].name], ops_at=step)
             for side in SIDES}
    side_of = {t.run_id: s for s, t in tasks.items()}
    done: dict[str, dict] = {}
    executor = LocalExecutor(jobs=2, pin_cores=False)
    try:
        for task, rec in executor.execute(list(tasks.values())):
            if rec.get("kind") == "done":
                done[side_of[task.run_id]] = rec
    finally:
        executor.close()
    out = localise_records(cfgs, done, tasks, pythons[cfgs["B"].name], odir / "localised.json")
    if not keep_files:
        shutil.rmtree(odir, ignore_errors=True)
    return {"step": step, **out, "wall": round(time.perf_counter() - t0, 3)}


def localise_records(cfgs: dict, done: dict, tasks: dict, python: str, result: Path) -> dict:
    """What the operation pass found, always with a ``line``: the sides' records (``OPS_RECORD`` in
    each task's lockstep folder) compared by ``python -m devicediff.frameworks.torch.ops localise``
    in B's environment; or why there is nothing to compare."""
    records = {side: Path(tasks[side].job.lockstep.dir) / OPS_RECORD for side in SIDES}
    failed = [s for s in SIDES if done.get(s, {}).get("state") != FINISHED]
    absent = [s for s in SIDES if not records[s].exists()]
    other = [s for s in SIDES if cfgs[s].framework != "torch"]
    if failed:
        s = failed[0]
        return {"line": f"the operation pass failed on side {s} ({cfgs[s].name}): "
                        f"{done.get(s, {}).get('error') or 'no result'}"}
    if absent:
        return {"line": f"side {absent[0]} ({cfgs[absent[0]].framework}) recorded no operations; "
                        "localisation stops at the module"}
    if other:
        return _per_function(cfgs, {s: records[s].parent / CHAINER_OPS_SUMMARY for s in other})
    proc = subprocess.run([python, "-m", "devicediff.frameworks.torch.ops", "localise", str(records["A"].parent),
                           str(records["B"].parent), str(result)],
                          env=worker_env(tasks["B"].job.with_device("cpu")), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"line": f"the operation localisation failed: {last}"}
    return json.loads(result.read_text())


def _per_function(cfgs: dict, summaries: dict[str, Path]) -> dict:
    """A Chainer side's own per-function checks (``frameworks.chainer.ops``: saved arrays changed
    between forward and backward, each node against its float64 replay); PyTorch cannot replay
    Chainer's function nodes, so nothing is compared across the sides at this level."""
    lines, named, suspect = [], None, {}
    for side, path in summaries.items():
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"side {side} ({cfgs[side].name}) wrote no per-function summary")
            continue
        lines.append(f"side {side} ({cfgs[side].name}, chainer), per function node: {s.get('line', '')}")
        first = s.get("first_changed") or s.get("first_suspect")
        if first and named is None:
            named = {"side": side, **first}
        if s.get("suspect"):
            suspect[side] = s["first_suspect"]
    lines.append("Chainer's function nodes are not replayed against the other side's operations")
    return {"line": "; ".join(lines), "named": named, "suspect": suspect}


def diverge(
    study: Study,
    a: str,
    b: str,
    *,
    steps: int = 5,
    seed: int | None = None,
    threshold: float = 100.0,
    store=None,
    store_path: str | None = None,
    workdir: str | os.PathLike | None = None,
    repeat: str = "auto",
    free: bool = True,
    keep_files: bool = False,
    ops: bool = True,
    on_step: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Step configs ``a`` and ``b`` of ``study`` in lockstep for ``steps`` steps and
    classify every difference; return the payload (also stored with
    ``store.put_analysis(study_id, "diverge", key, payload)`` when ``store`` is given).

    ``ops``: when the verdict is beyond rounding or suspect, run the operation pass at the first
    such step (``summary["ops"]``; docs/diverge.md). ``on_step(side, step, total)`` is called as
    each side's step file arrives.
    Raises ``StudyError`` for an unknown config and ``DivergeError`` when a side
    fails or is skipped.
    """
    if steps < 1:
        raise StudyError(f"diverge: --steps must be >= 1, got {steps}")
    if threshold <= 1:
        raise StudyError(f"diverge: --threshold must be > 1 (a ratio), got {threshold}")
    from devicediff.runner import preflight

    seed = study.seeds[0] if seed is None else int(seed)
    cells = {"A": study.cell(study.config(a), seed), "B": study.cell(study.config(b), seed)}
    cfgs = {side: c.config for side, c in cells.items()}
    pythons = preflight(study, [a, b])  # parameters, data and environments, before anything runs
    key = analysis_key(a, b, seed, steps)
    scratch = not workdir and (not store_path or store_path == ":memory:")  # a temporary folder of ours
    workdir = Path(workdir) if workdir else default_workdir(store_path, study, key)
    tasks = {side: _task(study, cells[side], side, workdir, steps, repeat, free, pythons[cfgs[side].name])
             for side in SIDES}
    side_of = {t.run_id: s for s, t in tasks.items()}
    c = _Collector(steps, threshold, free, keep_files, on_step)
    t0 = time.perf_counter()
    # Two at a time when the cores allow, never pinned: a side's thread count comes from its
    # config through worker_env, exactly as in `devicediff run` (which pins only with --jobs > 1).
    executor = LocalExecutor(jobs=2, pin_cores=False)
    try:
        for task, rec in executor.execute(list(tasks.values())):
            c.take(side_of[task.run_id], rec)
    finally:
        executor.close()
    wall = time.perf_counter() - t0
    _check_sides(c, cfgs, tasks, steps, workdir)
    summary = summarize(c.rows, c.free_rows, c.per_step, a, b, threshold, c.parity,
                        {side: cfgs[side].to_dict() for side in SIDES})
    if ops and summary["verdict"] in (BEYOND, SUSPECT):
        at = (summary["first_beyond"] or summary["first_suspect"] or {"step": 1})["step"]  # 1: a parity finding
        summary["ops"] = _op_pass(study, cells, pythons, workdir, at, keep_files)
    if scratch and not keep_files:
        shutil.rmtree(workdir, ignore_errors=True)  # kept above when a side failed: its log is the evidence
    payload = {
        "study": study.name, "study_id": study.study_id, "workload": study.workload, "a": a, "b": b,
        "configs": {a: cfgs["A"].to_dict(), b: cfgs["B"].to_dict()} if a != b else {a: cfgs["A"].to_dict()},
        "seed": seed, "init_seed": cells["A"].init_seed, "data_seed": cells["A"].data_seed, "steps": steps,
        "threshold": threshold, "repeat": repeat, "rule": RULE, "suspect_factor": SUSPECT_FACTOR,
        "rows": [r.to_dict() for r in c.rows], "free": [r.to_dict() for r in c.free_rows], "per_step": c.per_step,
        "summary": summary, "effective": {"A": c.effective.get("A"), "B": c.effective.get("B")}, "env": c.env,
        "wall_time": wall, "compare_time": c.compare_time, "workdir": str(workdir),
    }
    if store is not None:
        store.put_study(study.study_id, study.name, study.to_dict())
        store.put_analysis(study.study_id, "diverge", key, payload)
    return payload
