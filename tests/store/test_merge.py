"""``devicediff merge``: stores from several machines into one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import devicediff
from devicediff.store.merge import merge_stores
from devicediff.store import RunInfo, SQLiteStore, StoreError

DEF = {"workload": "autoencoder", "workload_params": {"train_size": 100}, "configs": [{"name": "cpu"}, {"name": "gpu"}],
       "reference": "cpu", "vary": ["init", "data"], "base_seed": 0, "budget": {"epochs": 1}, "seeds": [0, 1],
       "name": "s", "description": ""}


def make_store(path: Path, machine: str, runs: list[tuple[str, str, str, int]], *, study_id: str = "st1",
               name: str = "s", definition: dict | None = None, with_files: bool = True) -> None:
    """``runs``: (run_id, config, state, n_metric_steps). Files go in ``<stem>_artifacts/<run_id>/``."""
    root = path.with_name(path.stem + "_artifacts")
    with SQLiteStore(path) as s:
        s.put_study(study_id, name, definition or DEF)
        for rid, config, state, steps in runs:
            run_dir = root / rid
            s.begin_run(RunInfo(rid, study_id, f"{config}|seed=0|rep=0|{machine}", config, 0, 0, 0, 0, "autoencoder",
                                {"name": config}, machine), log_path=str(run_dir / "worker.log"))
            s.record(rid, {"kind": "env", "fingerprint": {"machine_id": machine, "cpu_model": f"cpu of {machine}"}})
            s.record(rid, {"kind": "effective", "settings": {"threads": 1}})
            s.record(rid, {"kind": "metrics", "rows": [[k, "train_loss", 1.0 / (k + 1)] for k in range(steps)]})
            if with_files:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "worker.log").write_text(f"log of {rid} on {machine}\n")
                np.save(run_dir / "weights_step0000000.npy", np.arange(4.0))
                (run_dir / "checkpoint.pt").write_bytes(b"not copied")
            s.record(rid, {"kind": "weights", "step": 0, "sha256": f"w-{rid}", "path": str(run_dir / "weights_step0000000.npy")})
            s.record(rid, {"kind": "artifact", "name": "log", "path": str(run_dir / "worker.log")})
            if state != "running":
                s.record(rid, {"kind": "done", "state": state, "final_sha256": f"f-{rid}-{machine}" if state == "finished" else None,
                               "error": None if state == "finished" else "boom"})
        s.put_analysis(study_id, "diverge", f"cpu|gpu|{machine}", {"step": 3})


def tables(path: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    try:
        out = {}
        for t, order in (("studies", "study_id"), ("runs", "run_id"), ("metrics", "run_id, step, name"),
                         ("weights", "run_id, step"), ("artifacts", "run_id, name"), ("analyses", "study_id, kind, key")):
            out[t] = con.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall()
        return out
    finally:
        con.close()


def run_row(path: Path, rid: str) -> dict:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return dict(con.execute("SELECT * FROM runs WHERE run_id=?", (rid,)).fetchone())
    finally:
        con.close()


@pytest.fixture
def two_machines(tmp_path):
    a, b = tmp_path / "a" / "A.db", tmp_path / "b" / "B.db"
    a.parent.mkdir()
    b.parent.mkdir()
    make_store(a, "m1", [("a1", "cpu", "finished", 5), ("a2", "gpu", "failed", 2)])
    make_store(b, "m2", [("b1", "cpu", "finished", 5), ("b2", "gpu", "finished", 5)])
    return a, b, tmp_path / "ALL.db"


def test_merge_keeps_every_run_with_its_rows_and_files(two_machines):
    a, b, out = two_machines
    assert merge_stores([str(a), str(b)], str(out)) == 4
    got = tables(out)
    ta, tb = tables(a), tables(b)
    assert len(got["runs"]) == 4 and {r[10] for r in got["runs"]} == {"m1", "m2"}  # machine column
    assert len(got["metrics"]) == len(ta["metrics"]) + len(tb["metrics"])
    assert set(got["metrics"]) == set(ta["metrics"]) | set(tb["metrics"])
    assert len(got["weights"]) == 4 and len(got["artifacts"]) == 4 and len(got["analyses"]) == 2
    for rid, src in (("a1", a), ("a2", a), ("b1", b), ("b2", b)):
        mine, theirs = run_row(out, rid), run_row(src, rid)
        for col in theirs:
            if col != "log_path":
                assert mine[col] == theirs[col], (rid, col)  # fingerprint, state, hashes, times...
    # files were brought beside ALL.db and the stored paths point there
    root = out.with_name("ALL_artifacts")
    for _, rid, _, _, path in [(None, *w) for w in got["weights"]]:
        assert Path(path) == root / rid / "weights_step0000000.npy" and Path(path).is_file()
    assert Path(run_row(out, "b1")["log_path"]).read_text() == "log of b1 on m2\n"
    assert not list(root.glob("*/checkpoint.pt"))
    with SQLiteStore(out, create=False) as s:
        assert s.integrity_check() == "ok" and len(s.runs()) == 4


def test_merging_again_adds_nothing(two_machines):
    a, b, out = two_machines
    merge_stores([str(a), str(b)], str(out))
    first = tables(out)
    assert merge_stores([str(a), str(b)], str(out)) == 0
    assert merge_stores([str(a), str(a), str(out)], str(out)) == 0
    assert tables(out) == first


def test_merge_into_one_of_the_inputs(two_machines):
    a, b, _ = two_machines
    assert merge_stores([str(a), str(b)], str(a)) == 2
    assert len(tables(a)["runs"]) == 4
    assert merge_stores([str(b)], str(a)) == 0


def test_a_run_that_got_further_replaces_the_other_whole(tmp_path):
    x, y, out = tmp_path / "x.db", tmp_path / "y.db", tmp_path / "o.db"
    make_store(x, "m1", [("r", "cpu", "running", 9)])  # killed at step 9: partial metrics
    make_store(y, "m1", [("r", "cpu", "finished", 5)])
    assert merge_stores([str(x)], str(out)) == 1
    assert merge_stores([str(y)], str(out)) == 1
    assert run_row(out, "r")["state"] == "finished"
    assert len(tables(out)["metrics"]) == 5  # not 9: never a mix of two attempts
    assert merge_stores([str(x)], str(out)) == 0  # a running copy never replaces a finished one
    assert run_row(out, "r")["state"] == "finished"


def test_different_definitions_under_one_name_are_refused_and_nothing_is_written(tmp_path):
    a, b, out = tmp_path / "A.db", tmp_path / "B.db", tmp_path / "ALL.db"
    make_store(a, "m1", [("a1", "cpu", "finished", 3)])
    other = {**DEF, "budget": {"epochs": 2}}
    make_store(b, "m2", [("b1", "cpu", "finished", 3)], study_id="st2", definition=other)
    with pytest.raises(StoreError) as e:
        merge_stores([str(a), str(b)], str(out))
    msg = str(e.value)
    assert "study 's'" in msg and "budget.epochs" in msg and "nothing merged" in msg and "\n" not in msg
    assert not out.exists() and not out.with_name("ALL_artifacts").exists()
    # an existing --out is left byte for byte as it was
    merge_stores([str(a)], str(out))
    before = out.read_bytes()
    with pytest.raises(StoreError):
        merge_stores([str(b)], str(out))
    assert out.read_bytes() == before


def test_a_store_that_already_holds_both_definitions_merges(tmp_path):
    a, out = tmp_path / "A.db", tmp_path / "ALL.db"
    make_store(a, "m1", [("a1", "cpu", "finished", 3)])
    # the study was edited and rerun here by a devicediff that did not yet refuse a second definition
    con = sqlite3.connect(a)
    with con:
        con.execute("INSERT INTO studies VALUES ('st2', 's', ?, 0)", (json.dumps({**DEF, "budget": {"epochs": 2}}),))
    con.close()
    assert merge_stores([str(a)], str(out)) == 1
    assert len(tables(out)["studies"]) == 2


def test_seed_lists_are_joined(tmp_path):
    a, b, out = tmp_path / "A.db", tmp_path / "B.db", tmp_path / "ALL.db"
    make_store(a, "m1", [("a1", "cpu", "finished", 3)], definition={**DEF, "seeds": [0, 1]})
    make_store(b, "m2", [("b1", "cpu", "finished", 3)], definition={**DEF, "seeds": [2, 3]})
    merge_stores([str(a), str(b)], str(out))
    with SQLiteStore(out, create=False) as s:
        (d,) = s.studies()["definition"]
    assert d["seeds"] == [0, 1, 2, 3]


def test_paths_are_kept_when_the_artifact_folder_did_not_travel(tmp_path):
    a, out = tmp_path / "A.db", tmp_path / "ALL.db"
    make_store(a, "m1", [("a1", "cpu", "finished", 3)], with_files=False)
    merge_stores([str(a)], str(out))
    (w,) = tables(out)["weights"]
    assert w[3] == str(tmp_path / "A_artifacts" / "a1" / "weights_step0000000.npy")


def test_a_store_moved_with_its_files_finds_them_beside_it(tmp_path):
    """A store and its ``_artifacts`` folder copied elsewhere (from a cluster, into a repository): the
    recorded paths are gone, the files are found beside the store; a file that did not travel keeps
    its recorded path."""
    from devicediff.analysis.load import run_arrays

    a = tmp_path / "cluster" / "A.db"
    a.parent.mkdir()
    make_store(a, "m1", [("a1", "cpu", "finished", 3), ("a2", "gpu", "finished", 3)])
    with SQLiteStore(a) as s:
        for rid, v in (("a1", 1), ("a2", 2)):
            sub = a.with_name("A_artifacts") / rid / "eval"
            sub.mkdir()
            np.save(sub / "predictions.npy", np.full(5, v, dtype=np.int16))
            s.record(rid, {"kind": "artifact", "name": "predictions", "path": str(sub / "predictions.npy")})
    (a.with_name("A_artifacts") / "a2" / "worker.log").unlink()
    recorded = tables(a)
    (tmp_path / "cluster").rename(tmp_path / "here")
    b = tmp_path / "here" / "A.db"
    root = b.with_name("A_artifacts")

    with SQLiteStore(b, readonly=True) as s:
        arts, weights, runs = s.artifacts(), s.weights(), s.runs()
    assert tables(b) == recorded  # reading moved nothing and wrote nothing
    paths = {(r, n): p for r, n, p in zip(arts["run_id"], arts["name"], arts["path"])}
    assert paths[("a1", "log")] == str(root / "a1" / "worker.log")
    assert paths[("a1", "predictions")] == str(root / "a1" / "eval" / "predictions.npy")
    assert paths[("a2", "log")] == str(tmp_path / "cluster" / "A_artifacts" / "a2" / "worker.log")  # not there
    assert all(Path(p).is_file() for p in weights["path"])
    assert dict(zip(runs["run_id"], runs["log_path"]))["a1"] == str(root / "a1" / "worker.log")
    runs = runs.assign(seed=[0, 0], repeat=[0, 0])
    got = run_arrays(runs, arts, "predictions")
    assert {k: int(v[0]) for k, v in got.items()} == {("cpu", 0): 1, ("gpu", 0): 2}


def test_cli_merge(two_machines):
    a, b, out = two_machines
    r = devicediff("merge", str(a), str(b), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"merged into {out}: 4 new run(s)"
    r = devicediff("merge", str(a), str(b), "--out", str(out))
    assert r.stdout.strip() == f"merged into {out}: 0 new run(s)"
    r = devicediff("merge", str(a), str(out.with_name("missing.db")), "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


def test_status_of_a_merged_store_keeps_machines_apart(tmp_path):
    """As in the report: a config with runs from two machines is two rows, never pooled."""
    from devicediff.study import study_from_definition

    sid = study_from_definition("s", DEF).study_id  # the id `status` finds the runs under
    a, b, out = tmp_path / "A.db", tmp_path / "B.db", tmp_path / "ALL.db"
    make_store(a, "m1", [("a1", "cpu", "finished", 5), ("a2", "gpu", "failed", 2)], study_id=sid, with_files=False)
    make_store(b, "m2", [("b1", "cpu", "finished", 5), ("b2", "gpu", "finished", 5)], study_id=sid, with_files=False)
    assert devicediff("merge", str(a), str(b), "--out", str(out)).returncode == 0
    r = devicediff("status", "--store", str(out), env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    rows: dict[str, str] = {}
    for line in r.stdout.splitlines():
        if line.count("│") > 3:  # a table row; the per-config table comes first
            rows.setdefault(line.split("│")[1].strip(), line)
    assert {"cpu@m1 (ref)", "cpu@m2", "gpu@m1", "gpu@m2"} <= set(rows), r.stdout
    assert "(CONFIG@MACHINE)" in r.stdout
    assert "+1 failed" in rows["gpu@m1"] and rows["gpu@m2"].split("│")[2].strip() == "1"


# -- errors name --out or the input, and leave nothing behind --------------------------------------


def test_out_onto_a_file_that_is_not_a_store_names_out(two_machines):
    a, _, out = two_machines
    notes = out.with_name("notes.txt")
    notes.write_text("my notes\n" * 20)
    folder_before = sorted(p.name for p in notes.parent.iterdir())
    with pytest.raises(StoreError) as e:
        merge_stores([str(a)], str(notes))
    msg = str(e.value)
    assert msg.startswith(f"--out {notes}: not an SQLite file") and "choose another --out" in msg and "--store" not in msg
    assert notes.read_text() == "my notes\n" * 20
    assert sorted(p.name for p in notes.parent.iterdir()) == folder_before
    r = devicediff("merge", str(a), "--out", str(notes))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--out" in r.stderr and "--store" not in r.stderr


def test_an_input_that_is_not_a_store_is_named_by_its_path(two_machines):
    a, _, out = two_machines
    bad = out.with_name("bad.db")
    bad.write_text("hello\n" * 30)
    with pytest.raises(StoreError) as e:
        merge_stores([str(a), str(bad)], str(out))
    assert str(bad) in str(e.value) and "--store" not in str(e.value) and "--out" not in str(e.value)
    assert not out.exists()


def test_out_in_a_missing_or_unwritable_place_is_one_line_and_nothing_is_made(two_machines, monkeypatch):
    a, _, out = two_machines
    missing = out.parent / "no-such-folder" / "ALL.db"
    with pytest.raises(StoreError, match=r"^--out .*does not exist"):
        merge_stores([str(a)], str(missing))
    assert not missing.parent.exists()
    from devicediff.store import sqlite as sqlite_mod

    real = sqlite_mod._writable
    monkeypatch.setattr(sqlite_mod, "_writable", lambda p: False if p.name == out.name else real(p))
    with pytest.raises(StoreError, match=r"^--out .*cannot be written"):
        merge_stores([str(a)], str(out))
    assert not out.exists() and not out.with_name("ALL_artifacts").exists()


def test_a_merge_that_fails_midway_takes_back_the_new_store_and_its_files(two_machines, monkeypatch):
    a, b, out = two_machines
    from devicediff.store import merge as merge_mod

    calls = []

    def boom(*args):
        calls.append(args)
        if len(calls) > 3:  # after the first runs' files were linked
            raise RuntimeError("disk gone")
        return args[0]

    monkeypatch.setattr(merge_mod, "_relocate", boom)
    with pytest.raises(RuntimeError):
        merge_stores([str(a), str(b)], str(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["a", "b"]


def test_merge_reads_inputs_it_cannot_write(two_machines, monkeypatch):
    a, b, out = two_machines
    from devicediff.store import sqlite as sqlite_mod

    real = sqlite_mod._writable
    monkeypatch.setattr(sqlite_mod, "_writable", lambda p: False if p.name in ("A.db", "B.db") else real(p))
    assert merge_stores([str(a), str(b)], str(out)) == 4
    assert sorted(p.name for p in a.parent.iterdir()) == ["A.db", "A_artifacts"]  # no -wal/-shm beside an input
