"""Terminal tables (``devicediff.tables``): the end of ``devicediff run`` and ``status``."""

from __future__ import annotations

import sys

from rich.console import Console

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "store"))
from study_store import fill, make_study  # noqa: E402

from devicediff.store import SQLiteStore  # noqa: E402
from devicediff.tables import print_per_seed, print_study  # noqa: E402


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
