"""Bad input at scale: every broken store, blocked store or unreachable cluster is
one line on stderr (``devicediff: error: ...``), a non-zero exit, and nothing
changed on disk. The real CLI runs in a subprocess."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, devicediff
from devicediff.store import SQLiteStore

sys.path.insert(0, str(ROOT / "tests" / "executors"))
from synthetic import study_toml  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("study") / "bad.toml"
    p.write_text(study_toml("bad", seeds=1, threads=(1,), steps=5))
    return p


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("devicediff: error:"), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def make_corrupt(p: Path) -> None:
    SQLiteStore(p).close()
    data = bytearray(p.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # keep the header, scramble every page
    p.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(f"{p}{suffix}").unlink(missing_ok=True)


def make_foreign(p: Path) -> None:
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users VALUES (1, 'ada')")
    con.commit()
    con.close()


def make_newer(p: Path) -> None:
    SQLiteStore(p).close()
    con = sqlite3.connect(p)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


BROKEN = {
    "not-sqlite": (lambda p: p.write_bytes(b"hello, I am a CSV file\n1,2,3\n" * 50), "not an SQLite file"),
    "corrupt": (make_corrupt, "SQLite file"),
    "foreign": (make_foreign, "did not write"),
    "newer": (make_newer, "newer devicediff"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_run_on_a_broken_store_is_one_line_and_changes_nothing(kind, study, tmp_path):
    make, needle = BROKEN[kind]
    db = tmp_path / "s.db"
    make(db)
    before = snapshot(tmp_path)
    r = devicediff("run", str(study), "--store", str(db), "-q", cwd=tmp_path)
    assert_one_line_error(r, needle, str(db))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["corrupt", "newer"])
def test_status_and_merge_on_a_broken_store_too(kind, tmp_path):
    make, needle = BROKEN[kind]
    db = tmp_path / "s.db"
    make(db)
    good = tmp_path / "good.db"
    SQLiteStore(good).close()
    before = snapshot(tmp_path)
    assert_one_line_error(devicediff("status", "--store", str(db), cwd=tmp_path), needle)
    assert_one_line_error(devicediff("merge", str(good), str(db), "--out", str(tmp_path / "all.db"), cwd=tmp_path), needle)
    assert_one_line_error(devicediff("merge", str(good), "--out", str(db), cwd=tmp_path), needle)
    assert snapshot(tmp_path) == before


def test_a_store_locked_by_another_process(study, tmp_path):
    db = tmp_path / "s.db"
    SQLiteStore(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE')\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        r = devicediff("run", str(study), "--store", str(db), "-q", cwd=tmp_path)
        assert_one_line_error(r, "locked by another process")
        other = tmp_path / "other.db"
        SQLiteStore(other).close()
        before = snapshot(tmp_path)
        assert_one_line_error(devicediff("merge", str(other), "--out", str(db), cwd=tmp_path), "locked")
        assert snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_an_unreachable_ray_address_writes_nothing(study, tmp_path):
    pytest.importorskip("ray")
    db = tmp_path / "s.db"
    t0 = time.time()
    r = devicediff("run", str(study), "--store", str(db), "--executor", "ray", "--address", f"127.0.0.1:{_refused_port()}",
                   "-q", cwd=tmp_path)
    assert_one_line_error(r, "cannot reach the Ray cluster", "refused")
    assert time.time() - t0 < 120
    assert not db.exists() and not (tmp_path / "s_artifacts").exists()


def test_jobs_with_ray_is_named_as_ignored(study, tmp_path):
    r = devicediff("run", str(study), "--store", str(tmp_path / "s.db"), "--executor", "ray", "--jobs", "4",
                   "--address", f"127.0.0.1:{_refused_port()}", "-q", cwd=tmp_path)
    assert r.returncode == 2
    note, error = r.stderr.strip().splitlines()
    assert "--jobs 4" in note and "ignored with --executor ray" in note
    assert error.startswith("devicediff: error:")


def test_ray_addresses_are_parsed_before_anything_else():
    from devicediff.cli import UsageError
    from devicediff.executors.ray import check_reachable, host_port

    assert host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert host_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_port("[::1]:6379") == ("::1", 6379)
    assert host_port("auto") is None
    with pytest.raises(UsageError, match="HOST:PORT"):
        host_port("no-port-here")
    with pytest.raises(UsageError, match="cannot reach the Ray cluster at 127.0.0.1:.*refused"):
        check_reachable(f"127.0.0.1:{_refused_port()}")


def test_ray_missing_is_an_install_hint(study, tmp_path):
    db = tmp_path / "s.db"
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from devicediff.cli import main\n"
            f"sys.exit(main(['run', {str(study)!r}, '--store', {str(db)!r}, '--executor', 'ray', '-q']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    line = assert_one_line_error(r, 'pip install "ray[default]"')
    assert r.returncode == 2 and "Ray" in line
    assert not db.exists()


def test_devicediff_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None\nimport devicediff, devicediff.cli, devicediff.executors, devicediff.executors.ray, devicediff.store.merge\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert r.returncode == 0, r.stderr
