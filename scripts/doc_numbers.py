"""The study numbers that README.md, docs/results.md and docs/replication.md quote, recomputed from
the stores in docs/data/ with the same loader and verdict rule as the tool (issue #13, item 9).

Every quoted number is tagged in the Markdown source (HTML comments, invisible when rendered):

    <!--n:paper-prednet-h200/cpu-4t/final_eval_mse/mean_sd|.4g|.1e-->0.02399 ± 6.9e-04<!--/n-->

The key is ``STORE/CONFIG/METRIC/QUANTITY`` then ``|``-separated format specs (Python format
mini-language, one per part of the value). STORE is a file ``docs/data/STORE.db``; CONFIG is the
config label as ``devicediff status`` prints it (``NAME@MACHINE`` when the study ran on several
machines); ``-`` where a quantity has none. Quantities:

    mean_sd, mean, sd      mean and sd (n - 1) over the config's finished first runs
    runs                   finished runs of the config
    bits                   "k/n": seeds whose final weights equal the reference's bit for bit
    rel_pct                100 (mean - mean_ref) / |mean_ref|, with "%"
    maxrel_pct             max over configs (CONFIG = *) of |rel_pct|, with "%"
    diff, p, p_adj, tost_p_adj, margin, n, verdict   that column of the verdict row
    diff_pct, margin_pct   100 x diff (margin) / |reference mean|, with "%"
    ci95, ci90             "[low, high]" of the verdict row
    family                 comparisons in the Holm family of role METRIC (CONFIG = -)
    pmax                   largest p_adj among the rows of METRIC
    spread_pct             100 (max - min) / |mean_ref| of the means of CONFIG = "a,b,c", with "%"
    seeds_needed           seeds for a decided verdict of this (config, primary METRIC) (``devicediff plan``)
    seeds_range            "lo–hi" of the seeds a decided verdict needs on primary METRIC (CONFIG = *;
                           ``devicediff plan``, power.plan_table)
    churn_pct, churn_range_pct, floor_pct, churn_verdict, churn_p
                           prediction churn against the reference (METRIC = predictions; the runs'
                           ``predictions`` files beside the store, analysis.churn.churn_table): the
                           config's mean churn, "lo–hi" of the configs' means (CONFIG = *), the
                           seed-churn floor, the verdict and its Holm-adjusted p (of "more" or
                           "less"); with CONFIG = *, the verdict every config has (else each
                           config's) and the largest p

Negative numbers are written with a minus sign (U+2212), as the docs do.

    python scripts/doc_numbers.py            # list every tagged number that disagrees (exit 1)
    python scripts/doc_numbers.py --write    # rewrite the tagged numbers from the stores
    python scripts/doc_numbers.py --list     # every tag with its value
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DOCS = ["README.md", "docs/results.md", "docs/replication.md"]
TAG = re.compile(r"<!--n:(?P<key>[^>]*?)-->(?P<val>.*?)<!--/n-->", re.S)


@functools.lru_cache(maxsize=None)
def churn(store: str):
    """The churn table of ``docs/data/STORE.db``, indexed by config, as the report computes it."""
    from devicediff.analysis.load import churn as churn_of
    from devicediff.store import SQLiteStore

    with SQLiteStore(ROOT / "docs" / "data" / f"{store}.db", readonly=True) as s:
        t = churn_of(s)
    if t.empty:
        raise ValueError(f"{store}: no prediction files found beside the store")
    return t.set_index("config")


@functools.lru_cache(maxsize=None)
def results(store: str):
    """The one study of ``docs/data/STORE.db``, as ``devicediff status`` and the report read it."""
    from devicediff.analysis.load import load_results
    from devicediff.store import SQLiteStore

    with SQLiteStore(ROOT / "docs" / "data" / f"{store}.db", readonly=True) as s:
        ids = list(s.studies()["study_id"])
        if len(ids) != 1:
            raise ValueError(f"{store}: expected one study, found {len(ids)}")
        r = load_results(s, ids[0])
    return r


def _minus(text: str) -> str:
    return re.sub(r"(?<![eE\d.])-(?=[\d.])", "\u2212", text)


def _f(x, spec: str) -> str:
    return format(float(x), spec)


def _values(r, config: str, metric: str):
    import numpy as np

    fin = r.finished
    first = fin[(fin["config"] == config) & (fin["repeat"] == 0)]
    v = first[metric].to_numpy(dtype=float)
    return v[np.isfinite(v)]


def _row(r, config: str, metric: str):
    v = r.verdicts
    hit = v[(v["config"] == config) & (v["metric"] == metric)]
    if len(hit) != 1:
        raise KeyError(f"no verdict row for {config} / {metric}")
    return hit.iloc[0]


def _rel(r, config: str, metric: str) -> float:
    ref = _values(r, r.reference, metric).mean()
    return 100 * (_values(r, config, metric).mean() - ref) / abs(ref)


def value(key: str) -> str:
    """The text a tag's key stands for (see the module docstring)."""
    path, *fmts = key.split("|")
    store, config, metric, quantity = path.split("/")
    fmt = (fmts + ["", ""])[:2] if fmts else ["", ""]
    if quantity.startswith(("churn_", "floor_")):
        return _minus(_churn_value(churn(store), config, quantity, fmt))
    r = results(store)
    if quantity in ("mean_sd", "mean", "sd", "runs"):
        v = _values(r, config, metric)
        out = {"mean_sd": f"{_f(v.mean(), fmt[0] or '.4g')} ± {_f(v.std(ddof=1), fmt[1] or '.2g')}",
               "mean": _f(v.mean(), fmt[0] or ".4g"), "sd": _f(v.std(ddof=1), fmt[0] or ".2g"),
               "runs": str(v.size)}[quantity]
    elif quantity == "bits":
        from devicediff.analysis.frames import bitwise_table

        b = bitwise_table(r.runs, r.reference).set_index("config")
        out = str(b.loc[config, "matches_reference"])
    elif quantity == "rel_pct":
        out = _f(_rel(r, config, metric), fmt[0] or "+.2f") + "%"
    elif quantity == "maxrel_pct":
        cfgs = [c for c in r.order if c != r.reference]
        out = _f(max(abs(_rel(r, c, metric)) for c in cfgs), fmt[0] or ".2g") + "%"
    elif quantity == "family":
        v = r.verdicts
        out = str(int(((v["role"] == metric) & v["in_family"]).sum()))
    elif quantity == "spread_pct":
        means = [_values(r, c, metric).mean() for c in config.split(",")]
        ref = _values(r, r.reference, metric).mean()
        out = _f(100 * (max(means) - min(means)) / abs(ref), fmt[0] or ".2g") + "%"
    elif quantity == "seeds_needed":
        plan = r.plan
        out = str(int(plan.loc[(plan["config"] == config) & (plan["metric"] == metric), "seeds_needed"].iloc[0]))
    elif quantity == "seeds_range":
        need = r.plan.loc[r.plan["metric"] == metric, "seeds_needed"].dropna()
        out = f"{int(need.min())}–{int(need.max())}"
    elif quantity == "pmax":
        v = r.verdicts
        out = _f(v.loc[v["metric"] == metric, "p_adj"].max(), fmt[0] or ".2g")
    else:
        out = _row_value(_row(r, config, metric), quantity, fmt)
    return _minus(out)


def _churn_value(t, config: str, quantity: str, fmt: list[str]) -> str:
    if quantity == "churn_range_pct":
        lo, hi = 100 * t["churn_mean"].min(), 100 * t["churn_mean"].max()
        return f"{_f(lo, fmt[0] or '.2f')}–{_f(hi, fmt[0] or '.2f')}%"
    rows = t if config == "*" else t.loc[[config]]
    if quantity == "churn_verdict":
        verdicts = set(rows["verdict"])
        return verdicts.pop() if len(verdicts) == 1 else ", ".join(f"{c}: {v}" for c, v in rows["verdict"].items())
    if quantity == "churn_p":
        p = [r["p_less_holm" if r["verdict"] == "less" else "p_more_holm"] for _, r in rows.iterrows()]
        return _f(max(p), fmt[0] or ".2g")
    row = t.loc[config]
    return _f(100 * row["churn_mean" if quantity == "churn_pct" else "floor_mean"], fmt[0] or ".2f") + "%"


def _row_value(row, quantity: str, fmt: list[str]) -> str:
    if quantity == "verdict":
        return str(row["verdict"])
    if quantity in ("ci95", "ci90"):
        lo, hi = row[f"{quantity}_low"], row[f"{quantity}_high"]
        return f"[{_f(lo, fmt[0] or '.2g')}, {_f(hi, fmt[1] or fmt[0] or '.2g')}]"
    if quantity in ("diff_pct", "margin_pct"):
        base = row["diff"] if quantity == "diff_pct" else row["margin"]
        return _f(100 * base / abs(row["mean_ref"]), fmt[0] or "+.2f") + "%"
    if quantity == "n":
        return str(int(row["n"]))
    x = row[quantity]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return _f(x, fmt[0] or ".2g")


def scan(root: Path = ROOT) -> list[tuple[str, str, str, str]]:
    """``(doc, key, quoted, computed)`` for every tag of every doc."""
    out = []
    for doc in DOCS:
        text = (root / doc).read_text(encoding="utf-8")
        for m in TAG.finditer(text):
            out.append((doc, m.group("key"), m.group("val"), value(m.group("key"))))
    return out


def write(root: Path = ROOT) -> int:
    """Rewrite every tagged number from the stores; the count of numbers changed."""
    changed = 0
    for doc in DOCS:
        p = root / doc
        text = p.read_text(encoding="utf-8")

        def sub(m):
            nonlocal changed
            want = value(m.group("key"))
            changed += want != m.group("val")
            return f"<!--n:{m.group('key')}-->{want}<!--/n-->"

        p.write_text(TAG.sub(sub, text), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the tagged numbers from the stores")
    ap.add_argument("--list", action="store_true", help="print every tag and its value")
    args = ap.parse_args(argv)
    if args.write:
        print(f"{write()} number(s) rewritten")
        return 0
    rows = scan()
    bad = [r for r in rows if r[2] != r[3]]
    for doc, key, quoted, want in (rows if args.list else bad):
        print(f"{doc}: {key}: quoted {quoted!r}, store gives {want!r}")
    print(f"{len(rows)} tagged numbers, {len(bad)} disagree with docs/data/")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
