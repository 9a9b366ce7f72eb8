"""Study efficiency from the runs' times (devicediff.analysis.efficiency), by hand-made numbers."""

from __future__ import annotations

import json
import math

import pandas as pd

from devicediff.analysis.efficiency import describe, efficiency


def test_parts_add_up_to_the_capacity_and_efficiency_is_train_plus_eval():
    timing = {"startup": 1.0, "import": 2.0, "setup": 0.5, "train": 3.0, "eval": 1.0, "checkpoint": 0.25,
              "finish": 0.25, "store": 0.5}
    runs = pd.DataFrame([
        {"wall_time": 7.5, "train_time": 3.0, "timing": timing},  # 0.5 s of it unaccounted in the run
        {"wall_time": 5.0, "train_time": 3.0, "timing": json.dumps({**timing, "startup": 0.0, "import": 0.0})},
    ])
    r = efficiency(runs, wall=20.0, slots=2)
    assert r["capacity"] == 40.0 and r["detailed"]
    assert math.isclose(r["efficiency"], (6.0 + 2.0) / 40.0)
    p = r["parts"]
    assert p["start-up"] == 3.0 and p["data"] == 1.0 and p["checkpoints"] == 1.0 and p["store"] == 1.0
    assert math.isclose(p["other in run"], 0.5)
    assert math.isclose(sum(p.values()), 40.0) and math.isclose(p["waiting"], 40.0 - 6 - 2 - 3 - 1 - 1 - 1 - 0.5)
    assert math.isclose(r["wall_per_train"], 20.0 / 6.0)
    assert "efficiency 20%" in describe(r)


def test_without_timing_only_train_and_the_rest_of_each_run_are_known():
    runs = pd.DataFrame([{"wall_time": 4.0, "train_time": 1.0, "timing": None}, {"wall_time": 2.0, "train_time": 1.0}])
    r = efficiency(runs, wall=10.0, slots=1)
    assert not r["detailed"]
    assert r["parts"] == {"train": 2.0, "in run, not training": 4.0, "waiting": 4.0}
    assert r["efficiency"] == 0.2
