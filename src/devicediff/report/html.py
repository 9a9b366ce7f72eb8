"""HTML of the report: view models (plain dicts of strings) and the jinja2 page.

Everything from the study (names, notes, descriptions, error messages, payloads) reaches the
page only through jinja2 with autoescaping on, so a config named ``<script>`` is text. The
view functions format numbers; the template only lays them out.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import pandas as pd

from devicediff.analysis.frames import short_ids
from devicediff.analysis.stats import seeds_phrase
from devicediff.report.data import StudyData

# fingerprint facts shown, in order; anything else (and never a host or user name) is left out
ENV_FACTS = [
    ("CPU", "cpu_model"), ("cores", "_cores"), ("ISA", "cpu_isa"), ("OS / arch", "_os"), ("GPUs", "_gpus"),
    ("GPU driver", "driver"), ("CUDA runtime", "cuda_runtime"), ("cuDNN", "cudnn"), ("Python", "python"),
    ("libraries", "_libs"), ("BLAS / OpenMP", "_blas"), ("torch build", "_torch"), ("devicediff revision", "devicediff_git"),
]
_JSON_LIMIT = 20_000


# ----------------------------------------------------------------------------------------------
# number formatting


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or hasattr(x, "dtype")


def num(x: Any, sig: int = 4) -> str:
    """Compact number: 4 significant digits, scientific notation for tiny and huge values."""
    if x is None or x is pd.NA:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{sig}g}"
    return f"{v:.{max(sig - 1, 1)}e}"


def signed(x: Any, sig: int = 4) -> str:
    s = num(x, sig)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return s
    return "+" + s if v > 0 and math.isfinite(v) else s


def pct(x: Any, sig: int = 3) -> str:
    try:
        v = 100 * float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else signed(v, sig) + "%"


def share(x: Any, sig: int = 3) -> str:
    """A fraction as an unsigned percentage: 0.0785 -> "7.85%"."""
    try:
        v = 100 * float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else num(v, sig) + "%"


def pval(p: Any) -> str:
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    return "< 0.001" if v < 0.001 else f"{v:.3g}"


def p_eq(p: Any) -> str:
    """``p = 0.03`` or ``p < 0.001``, for sentences."""
    t = pval(p)
    return "p " + t if t.startswith("<") else f"p = {t}"


def cell(v: Any, cls: str = "", title: str = "") -> dict:
    return {"v": "" if v is None else str(v), "cls": cls, "title": title}


def table(columns: list, rows: list[list], caption: str = "", subs: list[str] | None = None,
          groups: list[str] | None = None) -> dict:
    """``subs``: per row, an optional line of text shown under it across the whole table.
    ``groups``: per row, a group label; a heading row is shown where it changes."""
    cols = [c if isinstance(c, dict) else {"label": c, "num": False, "title": ""} for c in columns]
    subs = subs or [""] * len(rows)
    groups = groups or [""] * len(rows)
    out, last = [], None
    for r, sub, grp in zip(rows, subs, groups):
        out.append({"cells": [c if isinstance(c, dict) else cell(c) for c in r], "sub": sub,
                    "group": grp if grp and grp != last else ""})
        last = grp
    return {"columns": cols, "caption": caption, "rows": out}


def col(label: str, num_: bool = False, title: str = "") -> dict:
    return {"label": label, "num": num_, "title": title}


def _compact(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str, separators=(", ", ": "))
    return str(v)


# ----------------------------------------------------------------------------------------------
# sections


def _definition(data: StudyData, store_note: str | None) -> list[tuple[str, str]]:
    d = data.definition
    out = [("study", data.name), ("study id", data.study_id), ("workload", d.get("workload", "?"))]
    if d.get("workload_params"):
        out.append(("workload parameters", _compact(d["workload_params"])))
    out.append(("reference config", data.reference + ("" if data.reference == data.reference_config else
                                                     f"  (config {data.reference_config} on its main machine)")))
    seeds = d.get("seeds", [])
    out.append(("seeds", f"{len(seeds)}: {_compact(seeds)}; varying {', '.join(d.get('vary', [])) or 'nothing'}"
                + (f"; {d.get('repeats')} repeats per cell" if (d.get("repeats") or 1) > 1 else "")))
    b = {k: v for k, v in (d.get("budget") or {}).items() if v is not None}
    if b:
        out.append(("budget", ", ".join(f"{k} = {v}" for k, v in b.items())))
    primary = list(getattr(data, "primary", []) or d.get("primary") or [])
    if primary:
        src = {"study": "set by the study", "workload": "declared by the workload",
               "fallback": "the first evaluation metric: none declared"}.get(getattr(data, "primary_source", ""), "")
        out.append(("primary metric", ", ".join(map(str, primary)) + (f" ({src})" if src else "")))
    if d.get("margin") is not None:
        out.append(("equivalence margin", f"±{_compact(d['margin'])}, fixed in advance (absolute)"))
    else:
        out.append(("equivalence margin", f"±{num(d.get('margin_fraction') or 0.5)} × the reference's sd across seeds,"
                                          " derived per metric (not fixed in advance)"))
    if store_note:
        out.append(("store", store_note))
    return out


def _fp_fact(fp: dict, key: str) -> str:
    if key == "_cores":
        c, a = fp.get("cpu_count"), fp.get("cpu_affinity")
        return "" if c is None else f"{c} logical" + (f", {a} usable" if a not in (None, c) else "")
    if key == "_os":
        return " ".join(str(x) for x in (fp.get("os"), fp.get("machine")) if x)
    if key == "_gpus":
        names = fp.get("gpus") or []
        mem, cap = fp.get("gpu_memory_gib") or [], fp.get("gpu_capability") or []
        parts = []
        for i, n in enumerate(names):
            extra = ", ".join(x for x in (f"{mem[i]} GiB" if i < len(mem) else "", f"sm {cap[i]}" if i < len(cap) else "") if x)
            parts.append(f"{n} ({extra})" if extra else str(n))
        return "; ".join(parts) if parts else "none"
    if key == "_libs":
        return ", ".join(f"{k} {v}" for k, v in (fp.get("libraries") or {}).items())
    if key == "_blas":
        parts = []
        for p in fp.get("blas") or []:
            if not isinstance(p, dict):
                continue
            name = p.get("internal_api") or p.get("user_api") or "?"
            ver = p.get("version")
            arch = p.get("architecture")
            parts.append(" ".join(x for x in (name, ver or "", f"({arch})" if arch else "") if x))
        return ", ".join(sorted(set(parts)))
    if key == "_torch":
        tc = fp.get("torch_config") or {}
        return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in tc.items())
    v = fp.get(key)
    if v is None or v == "" or v == []:
        return ""
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _environment(data: StudyData) -> dict | None:
    runs = data.runs
    if runs.empty or "fingerprint" not in runs.columns:
        return None
    envs: dict[str, dict] = {}
    short = short_ids(data.machines) if data.machines else {}
    for _, r in runs.iterrows():
        fp = r["fingerprint"] if isinstance(r["fingerprint"], dict) else None
        if fp is None:
            continue
        facts = tuple(_fp_fact(fp, k) for _, k in ENV_FACTS)
        key = json.dumps([str(r.get("machine")), facts])
        e = envs.setdefault(key, {"machine": r.get("machine"), "facts": facts, "configs": []})
        if r["base_config"] not in e["configs"]:
            e["configs"].append(r["base_config"])
    if not envs:
        return None
    heads = [f"machine {short.get(e['machine'], e['machine'])}: {', '.join(map(str, e['configs']))}" for e in envs.values()]
    rows = []
    for i, (label, _) in enumerate(ENV_FACTS):
        vals = [e["facts"][i] for e in envs.values()]
        if any(vals):
            rows.append([cell(label, "fact")] + [cell(v or "–") for v in vals])
    return table([col("")] + [col(h) for h in heads], rows)


@lru_cache(maxsize=1)
def _config_defaults() -> dict:
    from devicediff.study import ExecConfig

    return {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
            for f in fields(ExecConfig) if f.name != "name"}


def _settings(cfg: dict) -> str:
    """The config's settings that differ from the defaults (params included: they change *what*
    is computed and must always be visible)."""
    if not isinstance(cfg, dict):
        return ""
    defaults = _config_defaults()
    parts = []
    for k, v in cfg.items():
        if k in ("name", "note", "ray_resources", "python"):
            continue
        default = list(defaults[k]) if isinstance(defaults.get(k), tuple) else defaults.get(k)  # stored as JSON lists
        if k in ("device", "threads") or (k in defaults and v != default) or (k not in defaults and v not in (None, {}, [])):
            parts.append(f"{k}={_compact(v)}")
    if cfg.get("python"):
        parts.append(f"python={cfg['python']}")
    return " · ".join(parts)


_EFFECTIVE_SKIP = {"blas_pools", "cuda_visible_devices", "cublas_workspace_config", "env_threads"}
_EFFECTIVE_ALWAYS = ("device", "torch_threads")


def _effective_items(eff: Any) -> dict[str, str]:
    if not isinstance(eff, dict):
        return {}
    out = {k: str(v) for k, v in eff.items()
           if k not in _EFFECTIVE_SKIP and not isinstance(v, (dict, list)) and v is not None}
    pools = eff.get("blas_pools")
    if isinstance(pools, list) and pools:
        out["BLAS threads"] = "/".join(str(p.get("num_threads")) for p in pools if isinstance(p, dict))
    return out


def _effective_cells(effs: dict[str, Any]) -> dict[str, dict]:
    """Per config, the settings that took effect, showing only what differs between configs
    (plus device and threads); the full list is in the cell's tooltip."""
    items = {c: _effective_items(e) for c, e in effs.items()}
    keys = list(dict.fromkeys(k for d in items.values() for k in d))
    varying = [k for k in keys if len({d.get(k) for d in items.values()}) > 1 or k in _EFFECTIVE_ALWAYS]
    if len(items) < 2:
        varying = keys
    out = {}
    for c, d in items.items():
        shown = " · ".join(f"{k}={d[k]}" for k in varying if k in d)
        out[c] = cell(shown, "small", " · ".join(f"{k}={v}" for k, v in d.items()))
    return out


_PRECISION_KEYS = ("precision", "compile", "compile_mode", "cuda_graphs")


def _versions_cell(g: pd.DataFrame) -> dict:
    """Library versions of a config's runs (fingerprint ``libraries``; several sets joined by " / ")
    and the precision / compile mode in effect when set (not fp32, not eager)."""
    sets = []
    for fp in g["fingerprint"] if "fingerprint" in g else []:
        libs = fp.get("libraries") if isinstance(fp, dict) else None
        if isinstance(libs, dict) and libs:
            txt = ", ".join(f"{k} {v}" for k, v in libs.items() if v)
            if txt not in sets:
                sets.append(txt)
    extra = []
    eff = next((e for e in (g["effective"] if "effective" in g else []) if isinstance(e, dict)), {})
    for k in _PRECISION_KEYS:
        v = eff.get(k)
        if v not in (None, False, "", "fp32", "none", [], {}):
            extra.append(f"{k} {'on' if v is True else v}")
    return cell(" · ".join([" / ".join(sets)] * bool(sets) + extra), "small")


def _counts(g: pd.DataFrame) -> str:
    c = g["state"].value_counts().to_dict()
    s = str(c.get("finished", 0))
    for k in ("failed", "skipped", "running"):
        if c.get(k):
            s += f" +{c[k]} {k}"
    return s


def _configs_table(data: StudyData, a) -> dict | None:
    if data.runs.empty:
        return None
    rows = []
    hm = a.headline
    desc = a.describe.get(hm) if hm else None
    desc = desc.set_index("config") if desc is not None and len(desc) else None
    effs = {}
    for cfg in data.order:
        g = data.runs[data.runs["config"] == cfg]
        if len(g):
            fin = g[g["state"] == "finished"]
            effs[cfg] = fin.iloc[0]["effective"] if len(fin) else g.iloc[0]["effective"]
    eff_cells = _effective_cells(effs)
    for cfg in data.order:
        g = data.runs[data.runs["config"] == cfg]
        if g.empty:
            continue
        first = g.iloc[0]
        fin = g[g["state"] == "finished"]
        cj = first["config_json"] if isinstance(first["config_json"], dict) else {}
        t = fin["train_time"].astype(float).mean() if len(fin) and "train_time" in fin else math.nan
        name = cfg + ("  (reference)" if cfg == data.reference else "")
        flag = "⚠ " if cfg in a.warnings else ""
        row = [cell(flag + name, "cfg ref" if cfg == data.reference else "cfg"), cell(_settings(cj), "small"),
               _versions_cell(fin if len(fin) else g),
               eff_cells.get(cfg, cell("")), cell(cj.get("note", ""), "small"), cell(_counts(g), "num")]
        if hm:
            if desc is not None and cfg in desc.index:
                r = desc.loc[cfg]
                row.append(cell(f"{num(r['mean'])} ± {num(r['sd'])}", "num"))
            else:
                row.append(cell("–", "num"))
        row.append(cell(num(t, 3) + (" s" if math.isfinite(t) else ""), "num"))
        rows.append(row)
    cols = [col("config"), col("settings (non-default)"),
            col("libraries · precision", False, "library versions from the runs' fingerprints; precision and compile mode in effect, when set"),
            col("took effect (what differs; hover for all)", False, "settings the worker reported as in effect, first finished run"), col("note"),
            col("runs", True)]
    if hm:
        cols.append(col(f"{hm} mean ± sd", True, "over first runs, one per seed"))
    cols.append(col("train time", True, "mean wall time of the training loop"))
    return table(cols, rows)


def _verdict_class(v: str) -> str:
    v = str(v)
    if v.startswith("same on every run"):
        return "ok" if v.endswith("yes") else "bad"
    return {"equivalent": "ok", "identical": "ok", "differs": "bad", "inconclusive": "warn"}.get(v, "")


def _ci(lo: Any, hi: Any) -> str:
    return f"[{signed(lo)}, {signed(hi)}]"


MARGIN_SOURCES = {"fixed": "fixed in advance", "seed-sd": "derived from the reference's seed sd"}


def _margin_text(r, fraction: Any = None) -> str:
    """"±0.0012 = 0.52% of the reference mean, derived from the reference's seed sd (0.5 × sd)"."""
    src = str(r.get("margin_source", "") or "")
    how = MARGIN_SOURCES.get(src, src)
    if src == "seed-sd" and fraction is not None:
        how += f" ({num(fraction, 3)} × sd)"
    m_pct = r.get("margin_pct")
    pct_txt = f" = {num(m_pct, 3)}% of the reference mean" if _isnum(m_pct) and math.isfinite(float(m_pct)) else ""
    return f"margin ±{num(r.get('margin'))}{pct_txt}, {how}" if how else f"margin ±{num(r.get('margin'))}{pct_txt}"


def _seeds_cell(a, r) -> dict:
    got = a.seeds_needed.get((r["config"], r["metric"])) if r["verdict"] == "inconclusive" else None
    if not got:
        return cell("–", "num muted")
    n, goal, note = got
    if n is None or n is pd.NA or (isinstance(n, float) and math.isnan(n)):
        return cell(note or "–", "num muted", f"for {goal}" if goal else "")
    return cell(f"{int(n)}", "num", f"seeds for a decided '{goal}' verdict at 80% power (alpha / family size)")


def _verdict_rows(a, v: pd.DataFrame, fraction: Any) -> tuple[list, list, list]:
    rows, subs, groups = [], [], []
    for _, r in v.iterrows():
        groups.append(f"{r['metric']}  —  {_margin_text(r, fraction)}")
        flag = r["config"] in a.warnings
        rel = (float(r["diff"]) / abs(float(r["mean_ref"]))) if _isnum(r.get("mean_ref")) and r["mean_ref"] else math.nan
        rows.append([
            cell(("⚠ " if flag else "") + str(r["config"]), "cfg flag" if flag else "cfg",
                 "its runs recorded warnings: see the banner above" if flag else ""),
            cell(r["verdict"], "verdict " + _verdict_class(r["verdict"])),
            cell(r["n"], "num"),
            cell(signed(r.get("diff")), "num", f"mean of the reference = {num(r.get('mean_ref'))}"),
            cell(pct(rel), "num"),
            cell(_ci(r.get("ci90_low"), r.get("ci90_high")), "num"),
            cell(_ci(r.get("ci95_low"), r.get("ci95_high")), "num"),
            cell(pval(r.get("p_adj")), "num", f"unadjusted p = {pval(r.get('p'))}"),
            cell(pval(r.get("tost_p_adj")), "num", f"unadjusted TOST p = {pval(r.get('tost_p'))}"),
            cell(f"±{num(r.get('margin'))}", "num", MARGIN_SOURCES.get(str(r.get("margin_source")), "")),
            _seeds_cell(a, r),
        ])
        note = str(r.get("note", "") or "")
        if flag:
            note = "pairing by seed may not hold (run warnings)" + ("; " + note if note else "")
        subs.append(note)
    return rows, subs, groups


def _verdict_table(a, role: str, fraction: Any = None) -> dict | None:
    v = a.verdicts
    if v is None or v.empty or "role" not in v.columns:
        return None
    v = v[v["role"] == role]
    if v.empty:
        return None
    cols = [col("config"), col("verdict"), col("n", True, "paired seeds"),
            col("diff", True, "mean over seeds of config − reference, paired by seed"),
            col("% of ref", True, "diff / |mean of the reference|"),
            col("90% CI", True, "t interval of the mean difference; the one TOST uses: inside ±margin = equivalent"),
            col("95% CI", True, "t interval of the mean difference; ±∞ when n is too small for a zero-variance difference"),
            col("p (Holm)", True, "paired t test, Holm-adjusted within this family"),
            col("TOST p (Holm)", True, "equivalence at ±margin, Holm-adjusted within this family"),
            col("margin ±", True), col("seeds needed", True, "inconclusive rows: seeds for a decided verdict at 80% power")]
    rows, subs, groups = _verdict_rows(a, v, fraction)
    if role != "primary":  # planning is for the confirmatory question
        cols, rows = cols[:-1], [r[:-1] for r in rows]
    return table(cols, rows, subs=subs, groups=groups)


def _checks_table(a) -> dict | None:
    v = a.verdicts
    if v is None or v.empty or "role" not in v.columns:
        return None
    v = v[v["role"] == "check"]
    if v.empty:
        return None
    rows = []
    for metric, g in v.groupby("metric", sort=False):
        yes = [c for c, x in zip(g["config"], g["verdict"]) if str(x).endswith("yes")]
        no = [c for c in g["config"] if c not in yes]
        txt = "yes" if not no else "no: " + ", ".join(map(str, no))
        rows.append([cell(metric, "cfg"), cell(txt, "ok" if not no else "bad"), cell(num(g["mean_ref"].iloc[0]), "num")])
    return table([col("metric"), col("same data on every run?", False, "data-only metrics: checked, never tested"),
                  col("reference mean", True)], rows)


def _bitwise_table(data: StudyData, a) -> dict | None:
    b = a.bitwise
    if b is None or b.empty:
        return None
    rank = {c: i for i, c in enumerate(data.order)}
    b = b.assign(_o=b["config"].map(lambda c: rank.get(c, len(rank)))).sort_values("_o")
    rows = []
    for _, r in b.iterrows():
        rep = r["repeatable"]
        if rep is None or (isinstance(rep, float) and math.isnan(rep)):
            rep_txt, rep_cls = "n/a (no repeats)", "muted"
        else:
            rep_txt, rep_cls = ("yes" if rep else "no"), ("ok" if rep else "bad")
        eq = bool(r["bitwise_equal_to_reference"])
        match = str(r["matches_reference"])
        if r["config"] == data.reference:
            m_txt, m_cls = f"{match} (itself)", "muted"
        else:
            m_txt, m_cls = match, ("ok" if eq else "warn")
        init = "yes" if r["init_hashes_per_seed_shared"] else "no"
        rows.append([cell(r["config"], "cfg"), cell(r["runs"], "num"), cell(rep_txt, rep_cls), cell(m_txt, m_cls),
                     cell(init, "ok" if r["init_hashes_per_seed_shared"] else "bad")])
    return table([col("config"), col("finished runs", True),
                  col("repeatable?", False, "re-runs of the same (config, seed) end with the same bits"),
                  col(f"final weights = {data.reference}'s bits", False, "seeds whose final weights hash equals the reference's"),
                  col("one initial weights hash per seed", False)], rows)


def _noise_table(a, metrics: list[str] | None = None) -> dict | None:
    n = a.noise
    if n is None or n.empty:
        return None
    if metrics is not None:
        n = n[n["metric"].isin(metrics)]
        if n.empty:
            return None
    rows, groups = [], []
    for _, r in n.iterrows():
        groups.append(str(r["metric"]))
        rows.append([cell(r["config"], "cfg"), cell(r["n_seeds"], "num"), cell(num(r["seed_sd"]), "num"),
                     cell(r["n_repeat_groups"], "num"), cell(num(r["impl_sd"]), "num"), cell(num(r["ratio"]), "num"),
                     cell(r["n_nan"], "num")])
    return table([col("config"), col("seeds", True), col("seed sd", True, "sd across seeds (first runs)"),
                  col("repeated cells", True), col("implementation sd", True, "pooled sd of re-runs of one cell"),
                  col("impl / seed", True), col("non-finite", True)], rows, groups=groups)


def _weights_table(data: StudyData, a) -> dict | None:
    s = a.wd_summary
    if s is None or s.empty:
        return None
    rows = []
    last = s.sort_values("step").groupby("config").tail(1)
    rank = {c: i for i, c in enumerate(data.order)}
    last = last.assign(_o=last["config"].map(lambda c: rank.get(c, len(rank)))).sort_values("_o")
    for _, r in last.iterrows():
        label = r["config"] + (" (its repeats)" if r["config"] == data.reference else "")
        rows.append([cell(label, "cfg"), cell(r["step"], "num"), cell(f"{r['n_equal']}/{r['n']}", "num"),
                     cell(num(r["median_rel"], 3), "num"), cell(num(r["max_rel"], 3), "num"),
                     cell(f"{r['n_known']}/{r['n']}", "num")])
    return table([col("config"), col("last step", True), col("bitwise equal", True), col("median rel. L2", True),
                  col("max rel. L2", True),
                  col("distance known", True, "bitwise equal, or measured from both snapshot files")], rows)


def _failures(data: StudyData) -> dict | None:
    runs = data.runs
    if runs.empty:
        return None
    bad = runs[runs["state"] != "finished"]
    if bad.empty:
        return None
    rows = []
    for _, r in bad.iterrows():
        reason = r["error"] if isinstance(r["error"], str) and r["error"] else (
            "unfinished: interrupted, or still running" if r["state"] == "running" else "")
        rows.append([cell(r["config"], "cfg"), cell(r["seed"], "num"), cell(r["repeat"], "num"),
                     cell(r["state"], "bad" if r["state"] == "failed" else "warn"), cell(r.get("attempts", ""), "num"),
                     cell(reason, "pre")])
    return table([col("config"), col("seed", True), col("repeat", True), col("state"), col("attempts", True),
                  col("reason")], rows)


def _machines_table(data: StudyData, a) -> dict | None:
    """Configs across machines: one row per (config, machine); bits compared with the same
    config's run of the same seed on its first (reference) machine."""
    runs = data.runs
    if runs.empty or len(data.machines) < 2:
        return None
    short = short_ids(data.machines)
    fin = runs[runs["state"] == "finished"]
    hm = a.headline
    pr = data.finished
    rows = []
    for base in pd.unique(runs["base_config"]):
        g = fin[fin["base_config"] == base]
        ms = list(pd.unique(runs.loc[runs["base_config"] == base, "machine"]))
        if data.reference_machine in ms:
            ms.remove(data.reference_machine)
            ms.insert(0, data.reference_machine)
        anchor = g[(g["machine"] == ms[0]) & (g["repeat"] == 0)].drop_duplicates("seed").set_index("seed")["final_sha256"]
        for i, m in enumerate(ms):
            gm = g[(g["machine"] == m) & (g["repeat"] == 0)]
            if i == 0:
                bits = "(first machine)"
            else:
                same = [anchor.get(s) == h for s, h in zip(gm["seed"], gm["final_sha256"]) if s in anchor.index]
                bits = f"{sum(same)}/{len(same)}" if same else "n/a"
            val = "–"
            if hm and hm in pr.columns:
                ids = set(gm["run_id"])
                v = pr.loc[pr["run_id"].isin(ids), hm].astype(float)
                v = v[v.notna()]
                if len(v):
                    val = f"{num(v.mean())} ± {num(v.std(ddof=1) if len(v) > 1 else float('nan'))}"
            fp = next((x for x in runs.loc[runs["machine"] == m, "fingerprint"] if isinstance(x, dict)), {})
            where = "; ".join(x for x in (_fp_fact(fp, "cpu_model"), _fp_fact(fp, "_gpus") if fp.get("gpus") else "") if x)
            rows.append([cell(base, "cfg"), cell(short.get(m, m)), cell(where, "small"),
                         cell(_counts(runs[(runs["base_config"] == base) & (runs["machine"] == m)]), "num"),
                         cell(val, "num"), cell(bits, "num")])
    cols = [col("config"), col("machine"), col("hardware"), col("runs", True)]
    cols.append(col(f"{hm} mean ± sd" if hm else "metric", True))
    cols.append(col("final bits = same config on its first machine", True))
    return table(cols, rows)


def _headline_fact(metric: str, r) -> str:
    mean = float(r["mean_ref"]) if _isnum(r.get("mean_ref")) else math.nan
    rel = float(r["diff"]) / abs(mean) if mean else math.nan
    rel_m = float(r["margin"]) / abs(mean) if mean else math.nan
    if r["verdict"] == "identical":
        return f"{metric}: bitwise identical to the reference in every seed"
    if r["verdict"] == "equivalent":
        return f"{metric}: equivalent (difference {pct(rel)}, margin ±{pct(rel_m)[1:]})"
    if r["verdict"] == "differs":
        return f"{metric}: differs by {pct(rel)} ({p_eq(r['p_adj'])}, Holm-adjusted)"
    return f"{metric}: {r['verdict']} ({pct(rel)}, {p_eq(r['p_adj'])})"


def _key_facts(data: StudyData, a) -> list[dict]:
    """One line per config: verdict on the headline metric, bits, weight distance, failures."""
    out = []
    v = a.verdicts
    bits = a.bitwise.set_index("config") if a.bitwise is not None and len(a.bitwise) else None
    wd = a.wd_summary
    for cfg in data.order:
        items, cls = [], ""
        if cfg == data.reference:
            continue
        if v is not None and a.headline and len(v):
            r = v[(v["config"] == cfg) & (v["metric"] == a.headline)]
            if len(r):
                r = r.iloc[0]
                cls = _verdict_class(r["verdict"])
                items.append(_headline_fact(a.headline, r))
        if cfg in a.warnings:
            items.append("its runs recorded warnings (see above): the pairing by seed may not hold")
            cls = "warn" if cls != "bad" else cls
        if bits is not None and cfg in bits.index:
            b = bits.loc[cfg]
            if b["matches_reference"] != "n/a":
                k, n = str(b["matches_reference"]).split("/")
                if k == n and n != "0":
                    items.append(f"final weights bitwise identical to the reference's {seeds_phrase(int(n))}")
                elif k == "0":
                    items.append(f"final weights differ in bits from the reference's {seeds_phrase(int(n))}")
                else:
                    items.append(f"final weights bitwise identical to the reference's in {k} of {n} seeds")
        if wd is not None and len(wd):
            w = wd[wd["config"] == cfg].sort_values("step")
            if len(w) and w["n_known"].iloc[-1] and w["n_equal"].iloc[-1] < w["n"].iloc[-1]:
                items.append(f"weights differ by {num(w['median_rel'].iloc[-1], 2)} (relative L2, median) at step "
                             f"{w['step'].iloc[-1]}")
        g = data.runs[data.runs["config"] == cfg]
        nbad = int((g["state"].isin(["failed", "skipped"])).sum()) if len(g) else 0
        if nbad:
            items.append(f"{nbad} run{'s' if nbad > 1 else ''} failed or skipped")
            cls = cls or "warn"
        if items:
            out.append({"config": cfg, "items": items, "cls": cls})
    return out


_DIVERGE_FACTS = ("workload", "seed", "steps", "threshold", "repeat", "rule")
_DIVERGE_HIDE = ("workdir",)  # local paths: not the reader's business, and may name a user


def _diverge_view(a, figs) -> list[dict]:
    """``devicediff diverge`` payloads: title, verdict, summary line, the main facts, and the
    whole payload (minus local paths) in a collapsed block. Unknown shapes still render."""
    out = []
    for dv, fig in zip(a.diverge, figs.get("diverge", [])):
        p = dv["payload"]
        facts, verdict, line, title = [], "", "", dv["key"]
        if isinstance(p, dict):
            if "a" in p and "b" in p:
                title = f"{p['a']} vs {p['b']}"
            summ = p.get("summary") if isinstance(p.get("summary"), dict) else {}
            verdict = str(summ.get("verdict", "") or "")
            line = str(summ.get("line", "") or "")
            keys = [k for k in _DIVERGE_FACTS if k in p] + [
                k for k, v in p.items() if k not in _DIVERGE_FACTS and k not in _DIVERGE_HIDE and k not in ("a", "b")
                and not isinstance(v, (dict, list))]
            facts = [(k, _compact(p[k])) for k in keys][:20]
            for k in ("first_difference", "first_beyond"):
                v = summ.get(k)
                if isinstance(v, dict):
                    facts.append((k.replace("_", " "), ", ".join(f"{kk} {num(vv) if _isnum(vv) else vv}"
                                                                 for kk, vv in v.items() if vv not in (None, ""))))
            ops = summ.get("ops")
            if isinstance(ops, dict) and ops.get("line"):
                facts.append(("operation", f"step {ops.get('step')}: {ops['line']}"))
            shown = {k: v for k, v in p.items() if k not in _DIVERGE_HIDE}
        else:
            shown = p
        text = json.dumps(shown, indent=1, default=str, sort_keys=True)
        if len(text) > _JSON_LIMIT:
            text = text[:_JSON_LIMIT] + f"\n… ({len(text) - _JSON_LIMIT} more characters)"
        cls = {"identical": "ok", "rounding": "ok", "beyond rounding": "bad", "suspect": "bad", "random": "warn"}.get(verdict, "warn" if verdict else "")
        out.append({"title": title, "key": dv["key"], "verdict": verdict, "verdict_cls": cls, "line": line,
                    "facts": facts, "json": text, "image": fig.get("image"), "error": fig.get("error")})
    return out


def _png_size(uri: str) -> tuple[int, int] | None:
    """(width, height) from a PNG data URI's IHDR chunk."""
    import base64
    import struct

    try:
        head = base64.b64decode(uri.split(",", 1)[1][:48])
        return struct.unpack(">II", head[16:24])
    except (ValueError, IndexError, struct.error):
        return None


def _grids_view(a, figs) -> dict | None:
    """Prediction grids of one seed under each config. Wide grids (a row of frames) are stacked,
    so the same frame of every config lines up in one column; others sit side by side."""
    if not a.grids:
        return None
    entries = figs.get("grids", [])
    sizes = [_png_size(e["image"]["uri"]) for e in entries if e.get("image")]
    wide = any(s and s[0] > 2.5 * s[1] for s in sizes)
    return {"seed": a.grids.get("seed"), "entries": entries, "stack": wide}


def _warnings_view(data: StudyData, a) -> list[dict]:
    """One banner per config whose runs recorded warnings (e.g. random draws on the device:
    configs on other devices are not paired by seed)."""
    out = []
    for cfg in [c for c in data.order if c in a.warnings] + sorted(set(a.warnings) - set(data.order)):
        runs = data.runs[data.runs["config"] == cfg]
        n = sum(1 for e in runs["effective"] if isinstance(e, dict) and e.get("warnings"))
        out.append({"config": cfg, "warnings": a.warnings[cfg], "runs": f"{n} of {len(runs)} runs"})
    return out


def _looks_view(a) -> dict | None:
    """``run --until-decided``: how many looks were taken, with the seeds and decisions of each."""
    lk = a.looks
    if not lk:
        return None
    seeds = [str(x["seeds"]) for x in lk["looks"] if x.get("seeds") is not None]
    line = f"{lk['n_looks']} look{'s' if lk['n_looks'] != 1 else ''} taken"
    if lk.get("planned"):
        line += f" of at most {lk['planned']}"
    if seeds:
        line += f", at {', '.join(seeds)} seeds"
    if lk.get("max_seeds"):
        line += f" (at most {lk['max_seeds']} seeds)"
    configs = list(dict.fromkeys(c for x in lk["looks"] for c in x["decisions"]))
    rows = [[cell(x["look"], "num"), cell("–" if x.get("seeds") is None else x["seeds"], "num")]
            + [cell(x["decisions"].get(c, ""), _verdict_class(x["decisions"].get(c, ""))) for c in configs]
            for x in lk["looks"]]
    t = table([col("look", True), col("seeds", True)] + [col(c) for c in configs], rows) if configs else None
    return {"line": line + ".", "table": t}


def _churn_table(p) -> dict | None:
    c = p.churn
    if c is None or c.empty:
        return None
    cls = {"more": "bad", "less": "ok", "inconclusive": "warn"}
    rows, subs = [], []
    for _, r in c.iterrows():
        rows.append([cell(r["config"], "cfg"), cell(r["verdict"], "verdict " + cls.get(r["verdict"], "")),
                     cell(r["n"], "num"), cell(share(r["churn_mean"]), "num", f"min {share(r['churn_min'])}, max {share(r['churn_max'])}"),
                     cell(share(r["floor_mean"]), "num", f"{r['n_floor_pairs']} reference seed pairs"),
                     cell(num(r["ratio"], 3), "num"), cell(pval(r["p_more_holm"]), "num"), cell(pval(r["p_less_holm"]), "num")])
        subs.append(str(r.get("note", "") or ""))
    return table([col("config"), col("verdict", False, "more / less than a seed change, or inconclusive"),
                  col("n", True, "paired seeds"), col("churn", True, "mean over seeds, vs the reference at the same seed"),
                  col("seed churn", True, "the reference vs itself at another seed"), col("ratio", True),
                  col("p more (Holm)", True, "one-sided sign-flip test: churn above the seed floor"),
                  col("p less (Holm)", True, "one-sided sign-flip test: churn below the seed floor")], rows, subs=subs)


def _per_class_rows(p) -> dict | None:
    pc = p.per_class
    if pc is None or pc.empty:
        return None
    hit = pc[pc["verdict"] == "differs"]
    rows = [[cell(r["config"], "cfg"), cell(r["class"], "num"), cell(r["n"], "num"), cell(share(r["mean_ref"]), "num"),
             cell(signed(100 * r["diff"], 3) + " pp", "num"), cell(pval(r["p_holm"]), "num"), cell(r["note"], "small")]
            for _, r in hit.iterrows()]
    return table([col("config"), col("class", True), col("n", True), col("reference accuracy", True),
                  col("difference", True, "percentage points"), col("p (Holm)", True, "over every config × class"),
                  col("note")], rows) if rows else None


def _disagree_table(p, reference: str, configs: list[str]) -> dict | None:
    d = p.disagree
    if d is None or d.empty:
        return None
    shown = [c for c in configs if f"pred_{c}" in d.columns]
    rows = [[cell(int(r["index"]), "num"), cell("–" if r.get("label") is None or pd.isna(r.get("label")) else int(r["label"]), "num"),
             cell(f"{100 * r['share']:.0f}%", "num")] + [cell("–" if pd.isna(r[f"pred_{c}"]) else int(r[f"pred_{c}"]), "num") for c in shown]
            for _, r in d.iterrows()]
    return table([col("input #", True), col("true class", True), col("flipped", True, "(config, seed) pairs predicting another class than the reference")]
                 + [col(c + (" (reference)" if c == reference else ""), True) for c in shown], rows)


def _predictions_view(data: StudyData, a, figs: dict) -> dict | None:
    p = a.predictions
    if p is None:
        return None
    differs = 0 if p.per_class is None or p.per_class.empty else int((p.per_class["verdict"] == "differs").sum())
    n_cells = 0 if p.per_class is None else len(p.per_class)
    return {"n_inputs": p.n_inputs, "churn_fig": figs.get("churn"), "churn": _churn_table(p),
            "heatmap": figs.get("per_class"), "per_class": _per_class_rows(p),
            "per_class_line": (f"{differs} of {n_cells} config × class cells differ (Holm over the {n_cells})"
                               if n_cells else ""),
            "grid": figs.get("disagree"), "image_note": p.image_note,
            "disagree": _disagree_table(p, data.reference, data.order)}


def _efficiency_view(a) -> dict | None:
    e = a.efficiency
    if not e:
        return None
    res = e.get("result") or {}
    head = next((res[k] for k in ("efficiency", "ratio", "fraction") if _isnum(res.get(k))), None)
    facts = [(str(k).replace("_", " "), num(v, 3) if _isnum(v) else _compact(v)) for k, v in res.items()
             if not isinstance(v, (dict, list)) or len(_compact(v)) < 300]
    line = (f"Σ(train + eval) / (wall × slots) = {pct(head)[1:] if float(head) >= 0 else pct(head)}"
            if head is not None else "")
    return {"line": line, "wall": f"{num(e['wall'], 3)} s", "slots": e["slots"], "source": e["source"], "facts": facts}


def study_view(data: StudyData, a, figs: dict, *, show_id: bool = False, store_note: str | None = None) -> dict:
    machines = data.machines
    if len(machines) <= 1:
        where = "On this machine"
    elif data.by_machine:
        where = f"Across {len(machines)} machines (each config on each machine counted apart)"
    else:
        where = f"On {len(machines)} machines"
    lead = None
    if a.headline and a.headline in a.sentences:
        lead = f"{where}, {a.sentences[a.headline]}."
    others = [(m, a.sentences[m]) for m in a.metrics[1:] if m in a.sentences]
    runs = data.runs
    n_fin = int((runs["state"] == "finished").sum()) if len(runs) else 0
    curves = [{"metric": m, "image": figs.get("curves", {}).get(m)} for m in a.curves]
    env = _environment(data)
    return {
        "anchor": f"s-{data.study_id}",
        "name": data.name,
        "study_id": data.study_id,
        "show_id": show_id,
        "description": data.definition.get("description", "") or "",
        "definition": _definition(data, store_note),
        "environment": env,
        "env_wide": env is not None and len(env["columns"]) > 2,
        "n_runs": len(runs),
        "n_finished": n_fin,
        "n_configs": len(data.order),
        "n_seeds": int(runs["seed"].nunique()) if len(runs) else 0,
        "reference": data.reference,
        "lead": lead,
        "others": others,
        "facts": _key_facts(data, a),
        "warnings": _warnings_view(data, a),
        "forest": figs.get("verdicts_primary"),
        "forest_secondary": figs.get("verdicts_secondary"),
        "verdicts": _verdict_table(a, "primary", data.definition.get("margin_fraction")),
        "verdicts_secondary": _verdict_table(a, "secondary", data.definition.get("margin_fraction")),
        "checks": _checks_table(a),
        "primary_metrics": a.of_role("primary"),
        "looks": _looks_view(a),
        "predictions": _predictions_view(data, a, figs),
        "efficiency": _efficiency_view(a),
        "configs": _configs_table(data, a),
        "curves": curves,
        "weights": figs.get("weights"),
        "weights_table": _weights_table(data, a),
        "bitwise": _bitwise_table(data, a),
        "init_warning": (f"{len(a.init_check)} seed(s) do not share one initial-weights hash across configs:"
                         " the configs did not start from the same weights."
                         if a.init_check is not None and len(a.init_check) else None),
        "noise": _noise_table(a, a.metrics[:1]),
        "noise_more": _noise_table(a, a.metrics[1:]) if len(a.metrics) > 1 else None,
        "grids": _grids_view(a, figs),
        "diverge": _diverge_view(a, figs),
        "failures": _failures(data),
        "machines": _machines_table(data, a),
        "problems": a.problems,
    }


# ----------------------------------------------------------------------------------------------
# page


def _env() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = num
    return env


def render_page(studies: list[dict], *, store_name: str | None = None, generated: str = "") -> str:
    from devicediff import __version__

    src = resources.files("devicediff.report").joinpath("report.html").read_text(encoding="utf-8")
    tpl = _env().from_string(src)
    return tpl.render(studies=studies, store_name=store_name, generated=generated, version=__version__)
