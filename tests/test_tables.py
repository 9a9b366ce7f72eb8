"""Terminal tables (``devicediff.tables``): the end of ``devicediff run`` and ``status``."""

from __future__ import annotations

import sys

from rich.console import Console

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "store"))
from study_store import fill, make_study  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "analysis"))
from verdict_stores import prednet_like  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "report"))
import predictions_synth  # noqa: E402

from devicediff.store import SQLiteStore  # noqa: E402
from devicediff.tables import print_per_seed, print_plan, print_study, seeds_phrase  # noqa: E402


def render(fn, *args, **kw) -> str:
    console = Console(width=200, record=True, force_terminal=False)
    with console.capture() as cap:
        fn(console, *args, **kw)
    return cap.get()


def rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        line = line.replace("┃", "│")  # the header row's bars
        if line.count("│") > 2:
            cells = [c.strip() for c in line.split("│")[1:-1]]
            out.setdefault(cells[0], cells[1:])
    return out


def test_print_study_shows_configs_failures_and_verdicts(tmp_path):
    st = make_study("q")
    with SQLiteStore(tmp_path / "s.db") as s:
        fill(s, st, failed=(("cpu-2t", 2),))
        text = render(print_study, st, s)
        quiet = render(print_study, st, s, verdicts=False)
    assert "q: per config" in text and "runs that did not finish" in text and "verdicts vs cpu-1t" in text
    assert "primary final_eval_loss (confirmatory, Holm over 1)" in text
    assert "+0.5 in every seed" in text
    r = rows(text)
    assert r["cpu-1t (ref)"][0] == "3" and r["cpu-2t"][0] == "2 +1 failed"
    assert "verdicts vs" not in quiet and "q: per config" in quiet


def test_print_per_seed_shows_each_seed_of_the_primary_metric(tmp_path):
    st = make_study("q")
    with SQLiteStore(tmp_path / "s.db") as s:
        fill(s, st, failed=(("cpu-2t", 2),))
        text = render(print_per_seed, st, s)
    assert "q: final_eval_loss per seed" in text
    r = rows(text)
    assert r["config"] == ["seed 0", "seed 1", "seed 2"]
    assert r["cpu-1t (ref)"] == ["1", "1.1", "1.2"] and r["cpu-2t"] == ["1.5", "1.6", "–"]


def test_many_seeds_go_down_the_page():
    """20 seeds × 7 configs (the H200's paper-prednet): seeds as rows, so the numbers fit."""
    with SQLiteStore(ROOT / "docs" / "data" / "paper-prednet-until-decided-h200.db", readonly=True) as s:
        text = render(print_per_seed, "paper-prednet", s)
    r = rows(text)
    assert r["seed"][:2] == ["cpu-1t (ref)", "cpu-4t"] and len(r["seed"]) == 7
    assert [k for k in r if k.isdigit()] == [str(k) for k in range(20)]
    assert all("…" not in c for k in r for c in r[k])


def test_a_study_without_runs(tmp_path):
    st = make_study("empty")
    with SQLiteStore(tmp_path / "s.db") as s:
        assert "empty: no runs in the store yet" in render(print_study, st, s)
        assert "empty: no runs in the store yet" in render(print_per_seed, st, s)


def test_a_config_without_runs_is_listed(tmp_path):
    st = make_study("q", configs=("cpu-1t", "cpu-2t", "cpu-4t"))
    only = make_study("q", configs=("cpu-1t", "cpu-2t", "cpu-4t"))
    with SQLiteStore(tmp_path / "s.db") as s:
        fill(s, only)
        con = s.connection()
        con.execute("DELETE FROM runs WHERE config='cpu-4t'")
        text = render(print_study, st, s)
    assert rows(text)["cpu-4t"][0] == "0"


def test_the_verdict_table_shows_roles_intervals_margins_checks_and_seeds_needed(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        prednet_like(s, seeds=5)
        text = render(print_study, "pn", s)
    assert "primary final_eval_mse (confirmatory, Holm over 1)" in text
    assert "secondary (exploratory, Holm over" in text
    header = next(line for line in text.splitlines() if "TOST p_adj" in line)
    for col in ("role", "n", "diff", "95% CI", "p_adj", "TOST p_adj", "margin", "verdict", "seeds needed"):
        assert col in header, col
    lines = [line for line in text.splitlines() if "│" in line]
    mse2 = next(line for line in lines if "cpu-2t" in line and "final_eval_mse" in line)
    assert "primary" in mse2 and "differs" in mse2 and "seed-sd" in mse2 and "%" in mse2
    mse3 = next(line for line in lines if "cpu-3t" in line and "final_eval_mse" in line)
    assert "identical" in mse3
    # checks are one line each, never tested rows
    assert "check final_baseline_mse: same data on every run: yes" in text
    assert not any("final_baseline_mse" in line for line in lines)
    # identical config: the grammar of the note
    assert "bitwise identical to cpu-1t in all 5 seeds" in text


def test_inconclusive_primary_rows_say_how_many_seeds(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        prednet_like(s, seeds=3, shift=5e-4)  # a shift about the margin: not decided at 3 seeds
        text = render(print_study, "pn", s)
    mse2 = next(line for line in text.splitlines() if "cpu-2t" in line and "final_eval_mse" in line)
    assert "inconclusive" in mse2 and ("for differs" in mse2 or "for equivalent" in mse2)


def test_run_warnings_are_shown_under_the_table(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        st = prednet_like(s, seeds=3)
        runs = s.runs(st.study_id)
        for rid in runs.loc[runs["config"] == "cpu-2t", "run_id"]:
            s.record(rid, {"kind": "effective", "settings": {"warnings": ["dropout draws differ by device"]}})
        text = render(print_study, "pn", s)
    assert "warning, cpu-2t (seeds 0, 1, 2): dropout draws differ by device" in text


def test_seeds_phrase():
    assert [seeds_phrase(n) for n in (1, 2, 5)] == ["in its one seed", "in both seeds", "in all 5 seeds"]


def test_print_plan_says_seeds_per_config_and_primary_metric(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        prednet_like(s, seeds=3)
        text = render(print_plan, "pn", s)
        empty = make_study("empty")
        none = render(print_plan, empty, s)
    assert "pn: seeds for a decided primary verdict vs cpu-1t (80% power)" in text
    r = rows(text)
    assert set(r) >= {"cpu-2t", "cpu-3t"}
    assert r["cpu-3t"][-1] == "bitwise identical: nothing to plan"
    assert r["cpu-2t"][0] == "final_eval_mse" and r["cpu-2t"][-3] in ("differs", "equivalent")
    assert int(r["cpu-2t"][-2]) >= 2
    assert "no runs in the store yet" in none


def test_a_sequential_study_shows_its_looks(tmp_path):
    with SQLiteStore(tmp_path / "p.db") as s:
        st = prednet_like(s, seeds=3)
        comp = {"config": "cpu-2t", "metric": "final_eval_mse", "decision": "differs", "look": 1, "n": 3,
                "diff": 0.01, "p": 1e-5, "level_two": 1e-3, "p_low": 0.0, "p_high": 1.0, "level_one": 1e-3,
                "margin": 4e-4}
        s.put_analysis(st.study_id, "sequential", "max=9|batch=3|look=1",
                       {"look": 1, "n_looks": 3, "seeds": 3, "status": "decided", "max_seeds": 9, "batch": 3,
                        "comparisons": [comp]})
        text = render(print_study, "pn", s)
    assert "until decided" in text and "1 look taken, 3 seeds at the last; decided" in text
    part = text[text.index("until-decided decisions vs cpu-1t"):]
    assert rows(part)["cpu-2t"][:4] == ["final_eval_mse", "differs", "1", "3"]


def test_a_study_with_predictions_says_whether_they_change_more_than_a_seed_change(tmp_path):
    """The churn verdict is in the terminal, as in the report: cpu-2t changes 3 of 200 predictions
    (less than a seed change), gpu-dropout moves whole classes (more); the primary metric is a column
    of the per-config table."""
    with predictions_synth.make_store(tmp_path / "c.db", tmp_path / "files") as s:
        (sid,) = s.studies()["study_id"]
        text = render(print_study, sid, s)
        quiet = render(print_study, sid, s, verdicts=False)
    assert "predictions vs cpu-1t at the same seed" in text
    r = rows(text[text.index("predictions vs cpu-1t"):])
    assert r["cpu-2t"][0] == "6" and r["cpu-2t"][1] == "1.5%" and r["cpu-2t"][-2:] == ["less than a seed change", ""]
    assert r["gpu-dropout"][-2:] == ["more than a seed change", ""]
    assert list(r)[1:] == ["cpu-2t", "gpu-dropout"]  # definition order, after the header
    assert "final_eval_accuracy" in rows(text)["config"]
    assert "predictions vs" not in quiet


def test_an_undecided_churn_row_says_how_many_seeds_would_decide_it(tmp_path):
    with predictions_synth.make_store(tmp_path / "c.db", tmp_path / "files", seeds=3) as s:
        (sid,) = s.studies()["study_id"]
        r = rows(render(print_study, sid, s).split("predictions vs cpu-1t")[1])
    # two configs under Holm: 1/2^6 < 0.05/2 < 1/2^5
    assert r["cpu-2t"][-2:] == ["inconclusive", "6 for less"] and r["gpu-dropout"][-2:] == ["inconclusive", "6 for more"]


def test_a_study_without_predictions_has_no_churn_table(tmp_path):
    with predictions_synth.make_store(tmp_path / "c.db", tmp_path / "files", with_predictions=False) as s:
        (sid,) = s.studies()["study_id"]
        assert "predictions vs" not in render(print_study, sid, s)
