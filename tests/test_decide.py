"""``devicediff run --until-decided`` (``devicediff.decide``): seeds in batches until every primary
verdict is decided, resume-safe, every look recorded."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "executors"))
from synthetic import study_toml  # noqa: E402

from devicediff.analysis.load import load_results  # noqa: E402
from devicediff.decide import KIND, look_line, run_until_decided, seed_list  # noqa: E402
from devicediff.errors import UsageError  # noqa: E402
from devicediff.executors.base import Executor  # noqa: E402
from devicediff.store import SQLiteStore  # noqa: E402
from devicediff.study import load_study, parse_study  # noqa: E402

N_SIM = 20_000  # the design's simulated t levels: a smaller (still deterministic) simulation for tests


def value(config: str, seed: int) -> float:
    """Final eval_mse: seed noise shared by all configs; ``shift`` on cpu-2t with its own noise;
    cpu-3t equal to the reference bit for bit."""
    rng = np.random.default_rng(seed)
    base, own = 0.02 + 1e-3 * rng.standard_normal(), 1e-4 * rng.standard_normal()
    if config == "cpu-2t":
        return base + SHIFT + own
    return base


SHIFT = 0.0


class FakeExecutor(Executor):
    """Runs nothing: each task ends at once with the final values ``value(config, seed)``;
    ``stop_after`` raises KeyboardInterrupt after that many runs (a Ctrl-C mid-batch)."""

    def __init__(self, fn=None, stop_after: int | None = None):
        self.fn = fn or value
        self.ran: list[tuple[str, int]] = []
        self.stop_after = stop_after

    def execute(self, tasks):
        for t in tasks:
            if self.stop_after is not None and len(self.ran) >= self.stop_after:
                raise KeyboardInterrupt
            cfg, seed = t.job.config["name"], t.job.seed
            self.ran.append((cfg, seed))
            v = self.fn(cfg, seed)
            yield t, {"kind": "started"}
            yield t, {"kind": "metrics", "rows": [[10, "eval_mse", v], [10, "baseline_mse", 0.0356]]}
            yield t, {"kind": "done", "state": "finished", "final_sha256": f"{cfg}-{seed}-{v!r}"}


def make(seeds: int = 3, configs=("cpu-1t", "cpu-2t", "cpu-3t")):
    return parse_study({
        "name": "seq", "reference": "cpu-1t", "workload": {"name": "prednet"}, "seeds": {"count": seeds},
        "budget": {"epochs": 1}, "configs": [{"name": c, "threads": i + 1} for i, c in enumerate(configs)],
    })


def go(study, store, tmp_path, executor, **kw):
    kw = {"max_seeds": 12, "batch": 3, **kw}
    return run_until_decided(study, store, executor=executor, store_path=str(tmp_path / "s.db"), pythons={},
                             n_sim=N_SIM, **kw)


def test_seed_list_extends_the_studys_own_seeds():
    st = parse_study({"name": "x", "reference": "a", "workload": {"name": "prednet"}, "seeds": {"list": [7, 3]},
                      "configs": [{"name": "a"}, {"name": "b", "threads": 2}]})
    assert seed_list(st, 5) == [7, 3, 8, 9, 10]


def test_stops_as_soon_as_every_comparison_is_decided(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SHIFT", 0.01)  # 10 seed sds, 100 sds of the differences
    st = make()
    ex = FakeExecutor()
    with SQLiteStore(tmp_path / "s.db") as s:
        out = go(st, s, tmp_path, ex)
        runs = s.runs(st.study_id)
        studies = s.studies()
    # O'Brien-Fleming spends almost nothing at 3 seeds (level 5e-7 for m = 2), so the second look decides
    assert out.status == "decided" and len(out.looks) == 2 and out.seeds == 6 < 12
    d = {k[0]: (v["decision"], v["look"]) for k, v in out.decisions.items()}
    assert d == {"cpu-2t": ("differs", 2), "cpu-3t": ("identical", 1)}
    assert len(runs) == 18 and sorted(set(runs["seed"])) == list(range(6)) and len(ex.ran) == 18
    assert list(studies["study_id"]) == [st.study_id]  # more seeds, the same study


def test_adds_batches_until_decided_and_records_every_look(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SHIFT", 6e-4)  # a shift that the first looks cannot yet call
    st = make(configs=("cpu-1t", "cpu-2t"))
    ex = FakeExecutor()
    with SQLiteStore(tmp_path / "s.db") as s:
        out = go(st, s, tmp_path, ex, max_seeds=30)
        looks = s.analyses(st.study_id, KIND)
        r = load_results(s, "seq")
    assert len(out.looks) > 1 and out.status == "decided"
    assert [p["seeds"] for p in out.looks] == list(range(3, 3 * len(out.looks) + 1, 3))
    assert out.decisions[("cpu-2t", "final_eval_mse")]["decision"] == "differs"
    assert list(looks["key"]) == [f"max=30|batch=3|look={k}" for k in range(1, len(out.looks) + 1)]
    first = looks["payload"].iloc[0]
    assert first["status"] == "continue" and first["comparisons"][0]["decision"] == "continue"
    assert first["n_tests"] == 1 and first["looks_planned"][:3] == [3, 6, 9]
    # the margin is frozen at the first look: the same number at every look
    assert len({p["margins"]["final_eval_mse"] for p in looks["payload"]}) == 1
    assert r.sequential is not None and list(r.sequential["look"]) == list(range(1, len(out.looks) + 1))
    assert sorted(set(ex.ran)) == sorted(ex.ran)  # no run twice
    assert look_line(out.looks[0]) == f"look 1/{first['n_looks']} at 3 seeds: cpu-2t continue; continue"


def test_resumes_without_rerunning_seeds_and_decides_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SHIFT", 6e-4)
    st = make(configs=("cpu-1t", "cpu-2t"))
    with SQLiteStore(tmp_path / "ref.db") as s:  # uninterrupted, for comparison
        whole = go(st, s, tmp_path, FakeExecutor(), max_seeds=30)
    first = FakeExecutor(stop_after=8)  # Ctrl-C in the second batch (6 runs in the first)
    with SQLiteStore(tmp_path / "s.db") as s:
        with pytest.raises(KeyboardInterrupt):
            go(st, s, tmp_path, first, max_seeds=30)
        states = s.runs(st.study_id)["state"].value_counts().to_dict()
        again = FakeExecutor()
        out = go(st, s, tmp_path, again, max_seeds=30)
        twice = FakeExecutor()
        replay = go(st, s, tmp_path, twice, max_seeds=30)
    assert states.get("finished") == 8 and states.get("interrupted") == 4  # the rest of the batch
    assert not set(first.ran) & set(again.ran)  # finished runs are kept
    assert twice.ran == []  # everything stored: the looks replay from the store
    for o in (out, replay):
        assert o.status == whole.status and o.seeds == whole.seeds and len(o.looks) == len(whole.looks)
        assert o.decisions == whole.decisions


def test_max_seeds_leaves_the_undecided_inconclusive(tmp_path):
    def noisy(config, seed):  # cpu-2t: no shift, but noise as large as the seeds' own
        return value(config, seed) + (1e-3 * np.random.default_rng(100 + seed).standard_normal()
                                      if config == "cpu-2t" else 0.0)

    st = make(configs=("cpu-1t", "cpu-2t"))
    with SQLiteStore(tmp_path / "s.db") as s:
        out = go(st, s, tmp_path, FakeExecutor(noisy), max_seeds=4, batch=1)
    assert out.status == "max seeds" and out.seeds == 4 and len(out.looks) == 2
    assert out.decisions[("cpu-2t", "final_eval_mse")]["decision"] == "inconclusive"


def test_bad_arguments_are_usage_errors(tmp_path):
    st = make(seeds=5)
    with SQLiteStore(tmp_path / "s.db") as s:
        with pytest.raises(UsageError, match="max-seeds 4"):
            go(st, s, tmp_path, FakeExecutor(), max_seeds=4)
        with pytest.raises(UsageError, match="batch"):
            go(st, s, tmp_path, FakeExecutor(), batch=0)


def test_real_runs_of_the_synthetic_workload(tmp_path):
    """Trained through run_study's worker processes: two configs with the same arithmetic are
    bitwise identical in every seed, which decides at the first look."""
    p = tmp_path / "syn.toml"
    p.write_text(study_toml("syn", seeds=2, steps=10, params={"n": 128},
                            configs=[{"name": "a", "threads": 1}, {"name": "b", "threads": 1}]))
    st = load_study(p)
    with SQLiteStore(tmp_path / "s.db") as s:
        from devicediff.executors import LocalExecutor

        ex = LocalExecutor(jobs=1)
        try:
            out = run_until_decided(st, s, max_seeds=6, batch=2, executor=ex, store_path=str(tmp_path / "s.db"),
                                    n_sim=N_SIM)
        finally:
            ex.close()
        r = load_results(s, st)
    assert out.status == "decided" and out.seeds == 2 and len(out.looks) == 1
    assert out.decisions[("b", "final_eval_loss")]["decision"] == "identical"
    assert len(r.finished) == 4 and r.sequential is not None


def test_status_report_and_export_give_the_sequential_decisions(tmp_path):
    """One answer per comparison: after --until-decided, the primary verdict everywhere (load_results,
    so status, report and verdicts.csv) is the group-sequential decision at the frozen margin, not a
    fixed-sample test re-run at a margin re-derived from all the seeds (on the H200's paper-prednet the
    two disagreed: cuda-cudnn "equivalent" at ±6.2e-4 from 20 seeds vs "inconclusive" at ±3.9e-4)."""
    def noisy(config, seed):
        return value(config, seed) + (1e-3 * np.random.default_rng(100 + seed).standard_normal()
                                      if config == "cpu-2t" else 0.0)

    st = make(configs=("cpu-1t", "cpu-2t", "cpu-3t"))
    with SQLiteStore(tmp_path / "s.db") as s:
        out = go(st, s, tmp_path, FakeExecutor(noisy), max_seeds=6, batch=3)
        r = load_results(s, "seq")
    prim = r.verdicts[r.verdicts["role"] == "primary"].set_index("config")
    frozen = out.looks[0]["margins"]["final_eval_mse"]
    for (cfg, _metric), d in out.decisions.items():
        want = "inconclusive" if d["decision"] == "continue" else d["decision"]
        assert prim.loc[cfg, "verdict"] == want
        assert prim.loc[cfg, "margin"] == pytest.approx(frozen)
        assert "group-sequential" in prim.loc[cfg, "note"]
    assert prim.loc["cpu-3t", "verdict"] == "identical"
