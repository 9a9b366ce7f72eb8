"""Pure functions from stored records to DataFrames.

``per_run`` is the table every statistic starts from: one row per run with its
config, seed, repeat, state and per-run metrics:

- ``final_<name>``: the value of each metric at the run's last step;
- ``auc_train_loss``: the mean of the recorded training loss over the whole
  run (area under the loss curve per step);
- ``tail_train_loss``: the mean over the last 10% of recorded steps (less
  noisy than one mini-batch).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RUN_KEYS = ["run_id", "config", "seed", "repeat", "state", "machine", "init_sha256", "final_sha256"]


def per_run(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    base = runs[[c for c in RUN_KEYS if c in runs.columns]].copy()
    if metrics.empty:
        return base
    m = metrics.sort_values(["run_id", "name", "step"])
    last = m.groupby(["run_id", "name"]).tail(1).pivot(index="run_id", columns="name", values="value")
    last.columns = [f"final_{c}" for c in last.columns]
    out = base.merge(last, left_on="run_id", right_index=True, how="left")
    tl = m[(m["name"] == "train_loss") & (m["step"] > 0)]
    if len(tl):
        auc = tl.groupby("run_id")["value"].mean().rename("auc_train_loss")

        def tail(g: pd.DataFrame) -> float:
            k = max(1, int(np.ceil(0.1 * len(g))))
            return float(g["value"].iloc[-k:].mean())

        tails = tl.groupby("run_id")[["value"]].apply(tail).rename("tail_train_loss")
        out = out.merge(auc, left_on="run_id", right_index=True, how="left")
        out = out.merge(tails, left_on="run_id", right_index=True, how="left")
    return out


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Per-run metric columns, headline first."""
    cols = [c for c in df.columns
            if c.startswith(("final_", "auc_", "tail_")) and c not in RUN_KEYS and pd.api.types.is_numeric_dtype(df[c])]
    order = ["final_eval_loss", "final_eval_mse", "final_eval_ssim", "tail_train_loss", "auc_train_loss", "final_train_loss"]
    return sorted(cols, key=lambda c: (order.index(c) if c in order else len(order), c))


def per_seed_table(per_run: pd.DataFrame, metric: str, order: list[str] | None = None) -> pd.DataFrame:
    """Config × seed → ``metric`` of the finished first run (``repeat == 0``): index ``config``
    (in ``order``, then any other), one column per seed (sorted); NaN where no such run."""
    pr = per_run[(per_run["state"] == "finished") & (per_run["repeat"] == 0)] if len(per_run) else per_run
    if metric not in pr.columns or pr.empty:
        return pd.DataFrame(index=pd.Index(list(order or []), name="config"))
    t = pr.pivot_table(index="config", columns="seed", values=metric, aggfunc="first", dropna=False)
    labels = [c for c in (order or []) if c in t.index] + [c for c in t.index if c not in (order or [])]
    t = t.reindex(labels)
    t = t.reindex(sorted(t.columns), axis=1)
    t.columns.name = "seed"
    return t


def bitwise_table(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per config: were runs repeatable (same config+seed → same final bits), and
    did they match the reference's final bits for the same seed?"""
    fin = runs[runs["state"] == "finished"]
    refs = fin[(fin["config"] == reference) & (fin["repeat"] == 0)]
    # The reference run of the same seed, on the same machine where it ran there (merged stores).
    ref_on = {(s, m): h for s, m, h in zip(refs["seed"], refs["machine"], refs["final_sha256"])}
    ref_any = refs.groupby("seed")["final_sha256"].agg(set).to_dict()
    rows = []
    for cfg, g in fin.groupby("config", sort=False):
        first = g[g["repeat"] == 0]
        same_init = first["init_sha256"].nunique() if "init_sha256" in first else 0
        match = [
            ref_on[(s, m)] == h if (s, m) in ref_on else h in ref_any[s]
            for s, m, h in zip(first["seed"], first["machine"], first["final_sha256"]) if s in ref_any
        ]
        reps = g.groupby("seed")["final_sha256"].nunique()
        has_rep = g.groupby("seed")["repeat"].nunique() > 1
        rows.append({
            "config": cfg,
            "runs": len(g),
            "matches_reference": f"{sum(match)}/{len(match)}" if match else "n/a",
            "bitwise_equal_to_reference": bool(match) and all(match),
            "repeatable": (bool((reps[has_rep] == 1).all()) if has_rep.any() else None),
            "init_hashes_per_seed_shared": same_init == first["seed"].nunique(),
        })
    return pd.DataFrame(rows, columns=["config", "runs", "matches_reference", "bitwise_equal_to_reference",
                                       "repeatable", "init_hashes_per_seed_shared"])


def init_hash_check(runs: pd.DataFrame) -> pd.DataFrame:
    """Seeds whose runs do not share one initial-weights hash (should be empty
    when the init seed is held equal across configs and frameworks)."""
    fin = runs[runs["init_sha256"].notna()]
    n = fin.groupby("seed")["init_sha256"].nunique()
    return n[n > 1].rename("distinct_init_hashes").reset_index()


def curves(runs: pd.DataFrame, metrics: pd.DataFrame, name: str = "train_loss") -> pd.DataFrame:
    """Long table ``config, seed, repeat, step, value`` for one metric."""
    m = metrics[metrics["name"] == name].merge(runs[["run_id", "config", "seed", "repeat"]], on="run_id")
    return m[["config", "seed", "repeat", "run_id", "step", "value"]].sort_values(["config", "seed", "step"])


# -- config identity across machines ----------------------------------------------------------
#
# In a store merged from several machines the same config name can have runs from several
# ``machine`` ids, and those runs must not be pooled (another CPU or driver is another way of
# doing the arithmetic). Then every config is labelled ``NAME@MACHINE`` (short machine id), and
# the reference becomes the reference config on the machine that holds most of its finished runs.

SHORT_MACHINE = 6


def short_ids(machines: list[str]) -> dict[str, str]:
    """Shortest common prefix length (from 6) that keeps every machine id distinct."""
    k = SHORT_MACHINE
    while len({str(m)[:k] for m in machines}) < len(set(machines)) and k < 64:
        k += 2
    return {m: str(m)[:k] for m in machines}


def config_identity(runs: pd.DataFrame, reference: str, config_order: list[str] | None = None
                    ) -> tuple[pd.DataFrame, str, str | None, bool, list[str]]:
    """``(runs, reference_label, reference_machine, by_machine, order)``.

    ``runs`` gains ``base_config`` (the study's config name); ``config`` becomes
    ``NAME@MACHINE`` for every config when any config has runs from more than one machine.
    """
    runs = runs.copy()
    runs["base_config"] = runs["config"] if len(runs) else pd.Series(dtype=object)
    base_order = list(config_order or [])
    base_order += [c for c in pd.unique(runs["config"]) if c not in base_order] if len(runs) else []
    if runs.empty or "machine" not in runs.columns:
        return runs, reference, None, False, [c for c in base_order if not len(runs) or c in set(runs["config"])]
    machines_per = runs.groupby("config")["machine"].nunique()
    ref_runs = runs[runs["config"] == reference]
    ref_machine = None
    if len(ref_runs):
        fin = ref_runs[ref_runs["state"] == "finished"]
        pool = fin if len(fin) else ref_runs
        counts = pool.groupby("machine", sort=False).size()
        ref_machine = str(counts.idxmax())  # ties: first seen (runs come in creation order)
    if (machines_per <= 1).all():
        order = [c for c in base_order if c in set(runs["config"])]
        return runs, reference, ref_machine, False, order
    short = short_ids(list(pd.unique(runs["machine"])))
    runs["config"] = runs["base_config"] + "@" + runs["machine"].map(short)
    order = []
    for base in base_order:
        ms = list(pd.unique(runs.loc[runs["base_config"] == base, "machine"]))
        if ref_machine in ms:
            ms.remove(ref_machine)
            ms.insert(0, ref_machine)
        order += [f"{base}@{short[m]}" for m in ms]
    ref_label = f"{reference}@{short[ref_machine]}" if ref_machine is not None else reference
    return runs, ref_label, ref_machine, True, order
