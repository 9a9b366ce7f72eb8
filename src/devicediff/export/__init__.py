"""``devicediff export``: the store as flat tables (CSV or Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

from devicediff.errors import UsageError
from devicediff.store import Store

RUN_EXPORT = ["run_id", "study", "workload", "config", "seed", "init_seed", "data_seed", "repeat", "machine", "state",
              "error", "init_sha256", "final_sha256", "wall_time", "train_time"]


def export(store: Store, out: Path, *, fmt: str = "csv") -> list[Path]:
    if fmt not in ("csv", "parquet"):
        raise UsageError(f"--format {fmt!r} unknown; use csv or parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--format parquet needs pyarrow; run `pip install pyarrow` or use --format csv") from None
    runs = store.runs()
    names = dict(zip(store.studies()["study_id"], store.studies()["name"]))
    runs["study"] = runs["study_id"].map(names)
    for c in ("config_json", "fingerprint", "effective", "threads_used"):
        runs[c] = runs[c].map(lambda v: json.dumps(v, sort_keys=True) if v is not None else None)
    runs = runs[RUN_EXPORT + ["config_json", "fingerprint", "effective", "threads_used"]]
    metrics = store.metrics()[["run_id", "step", "name", "value"]]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in (("runs", runs), ("metrics", metrics)):
        path = out / f"{name}.{fmt}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        df.to_csv(tmp, index=False) if fmt == "csv" else df.to_parquet(tmp, index=False)
        tmp.replace(path)
        paths.append(path)
    return paths
