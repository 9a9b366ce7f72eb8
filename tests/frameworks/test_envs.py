"""Environments for package sets (frameworks/envs.py): key, cache, lock, errors, versions.

The build tests use a pure-Python wheel written here and served with ``--wheelhouse`` (pip
``--no-index --find-links``), so they need no network and install in a second or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from devicediff.errors import EnvironmentBuildError
from devicediff.frameworks import envs
from conftest import ROOT, devicediff


# ------------------------------------------------------------------------------- helpers

def make_wheel(folder: Path, name: str = "ddtinypkg", version: str = "1.0") -> Path:
    """A minimal valid pure-Python wheel (PEP 427): one module, METADATA, WHEEL, RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: devicediff-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache and no pip configuration from this machine."""
    monkeypatch.setenv("DEVICEDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(envs.WHEELHOUSE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def wheelhouse(tmp_path):
    wh = tmp_path / "wheels"
    make_wheel(wh)
    make_wheel(wh, version="2.0")
    return wh


# ------------------------------------------------------------------------------- key

def test_normalise_spellings():
    assert envs.normalise("Torch == 2.4.1") == "torch==2.4.1"
    assert envs.normalise("Typing_Extensions>=4") == "typing-extensions>=4"
    assert envs.normalise("numpy>=1.23,<2") == envs.normalise("numpy <2, >=1.23")
    assert envs.normalise("Foo[B,a]==1") == "foo[a,b]==1"
    assert envs.requirement_set(["torch==2.4.1", "numpy<2", "Torch==2.4.1"]) == ("numpy<2", "torch==2.4.1")


def test_key_ignores_order_and_spelling_not_content():
    k = envs.env_key(["torch==2.4.1", "numpy<2"], python_version="3.11", flavour="cpu")
    assert k == envs.env_key(["numpy <2", "Torch==2.4.1"], python_version="3.11", flavour="cpu")
    assert k != envs.env_key(["torch==2.4.1", "numpy<2"], python_version="3.12", flavour="cpu")
    assert k != envs.env_key(["torch==2.4.1", "numpy<2"], python_version="3.11", flavour="cuda")
    assert k != envs.env_key(["torch==2.4.0", "numpy<2"], python_version="3.11", flavour="cpu")
    assert k != envs.env_key(["torch==2.4.1", "numpy<2"], python_version="3.11", flavour="cpu", extras=())


def test_bad_requirement_is_one_line():
    with pytest.raises(EnvironmentBuildError, match="not a requirement") as e:
        envs.normalise("torch===")
    assert "\n" not in str(e.value)


def test_flavour_override(monkeypatch):
    monkeypatch.setenv(envs.FLAVOUR_ENV, "cuda")
    assert envs.torch_flavour() == "cuda"
    monkeypatch.setenv(envs.FLAVOUR_ENV, "cpu")
    assert envs.torch_flavour() == "cpu"


def test_cpu_flavour_leaves_gpu_only_packages_out():
    pins = [("torch", "2.4.1"), ("triton", "3.0.0"), ("nvidia-cublas-cu12", "12.1.3.1")]
    keep, dropped = envs._choose(pins, "cpu")
    assert keep == ["torch==2.4.1", "nvidia-cublas-cu12==12.1.3.1"] and dropped == ["triton==3.0.0"]
    assert envs._choose(pins, "cuda")[1] == []


def test_ready_marker(tmp_path):
    folder = tmp_path / "k"
    assert envs.read_ready(folder, "k") is None
    (folder / "venv" / "bin").mkdir(parents=True)
    (folder / "venv" / "bin" / "python").write_text("")
    (folder / envs.READY).write_text(json.dumps({"key": "other", "versions": {}}))
    assert envs.read_ready(folder, "k") is None  # another recipe's marker
    (folder / envs.READY).write_text(json.dumps({"key": "k", "versions": {"numpy": "1.26.4"}}))
    assert envs.read_ready(folder, "k") == {"numpy": "1.26.4"}


# ------------------------------------------------------------------------------- build, cache, lock

def test_build_records_versions_and_is_reused(cache, wheelhouse):
    env = envs.ensure_env(["DDTinyPkg==1.0"], wheelhouse=str(wheelhouse), extras=())
    folder = Path(env.dir)
    assert folder.parent == cache / "envs" and (folder / envs.READY).is_file()
    assert "ddtinypkg==1.0" in (folder / "freeze.txt").read_text().lower()
    assert (folder / "resolved.txt").read_text() == "ddtinypkg==1.0\n"
    info = json.loads((folder / "build.json").read_text())
    assert info["versions"]["python"] == "%d.%d.%d" % sys.version_info[:3] and info["size_bytes"] > 0
    out = subprocess.run([env.python, "-c", "import ddtinypkg, sys; print(ddtinypkg.__version__, sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1.0", str(folder / "venv")]
    stamp = (folder / envs.READY).stat().st_mtime_ns
    again = envs.ensure_env(["ddtinypkg == 1.0"], wheelhouse=str(wheelhouse), extras=())
    assert again == env and (folder / envs.READY).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_half_made_environment_is_rebuilt(cache, wheelhouse):
    env = envs.ensure_env(["ddtinypkg==1.0"], wheelhouse=str(wheelhouse), extras=())
    (Path(env.dir) / envs.READY).unlink()  # as if the build had been killed
    (Path(env.dir) / "leftover").write_text("x")
    env2 = envs.ensure_env(["ddtinypkg==1.0"], wheelhouse=str(wheelhouse), extras=())
    assert env2.python == env.python and not (Path(env.dir) / "leftover").exists()


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import devicediff.frameworks.envs as e
    count, go, wheelhouse = sys.argv[1:4]
    real = e._build
    def counted(*a, **k):
        with open(count, "a") as f:
            f.write("b")
        time.sleep(1.0)  # hold the lock long enough for the other process to queue
        return real(*a, **k)
    e._build = counted
    while not Path(go).exists():
        time.sleep(0.01)
    print(e.ensure_env(["ddtinypkg==2.0"], wheelhouse=wheelhouse, extras=()).python)
""")


def test_two_processes_build_once(cache, wheelhouse, tmp_path):
    count, go = tmp_path / "builds", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(count), str(go), str(wheelhouse)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    pythons = {o[0].strip() for o in outs}
    assert len(pythons) == 1 and count.read_text() == "b"  # one built, the other waited and reused it


# ------------------------------------------------------------------------------- errors

def test_unresolvable_set_via_cli_is_one_line_and_writes_nothing(tmp_path, tiny_study):
    study = tiny_study(extra='packages = ["nonexistent-pkg-xyz==9.9"]\n')  # goes into the last config
    store = tmp_path / "s.db"
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    r = devicediff("run", str(study), "--store", str(store), cwd=tmp_path,
                   env={"DEVICEDIFF_CACHE": str(tmp_path / "cache"), envs.WHEELHOUSE_ENV: str(empty)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devicediff: error:")
    assert "nonexistent-pkg-xyz==9.9" in lines[0] and "resolving failed" in lines[0]
    assert not store.exists() and not list(tmp_path.glob("*_artifacts"))
    assert not [p for p in (tmp_path / "cache" / "envs").iterdir() if p.is_dir()]  # no half-made env left


def test_no_index_names_the_way_out(cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip.conf has local indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "1")  # one retry: pip then logs why the index failed
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EnvironmentBuildError) as e:
        envs.ensure_env(["ddtinypkg==1.0"], extras=())
    msg = str(e.value)
    assert "\n" not in msg and "no package index reachable" in msg
    assert 'python = "' in msg and "--wheelhouse" in msg


def test_missing_wheelhouse_folder(cache, tmp_path):
    with pytest.raises(EnvironmentBuildError, match="no such folder"):
        envs.ensure_env(["ddtinypkg==1.0"], wheelhouse=str(tmp_path / "nope"), extras=())


# ------------------------------------------------------------------------------- study level

def test_build_environments_of_a_study(cache, wheelhouse, tiny_study, monkeypatch):
    from devicediff.study import load_study

    monkeypatch.setattr(envs, "WORKER_NEEDS", ())
    study = load_study(tiny_study(extra='packages = ["ddtinypkg==1.0"]\n'))
    said = []
    built = envs.build_environments(study, wheelhouse=str(wheelhouse), progress=said.append)
    assert [(c.name, v["python"]) for c, _py, v in built] == [("cpu-2t", "%d.%d.%d" % sys.version_info[:3])]
    assert Path(built[0][1]).is_file() and "cpu-2t: ddtinypkg==1.0" in said[0]


@pytest.mark.slow
def test_torch_241_run_records_its_versions(tmp_path, tiny_study):
    """The upgrade-check environment (built once under ~/.cache/devicediff/envs, minutes):
    a run in it stores torch 2.4.1 and numpy 1.x in its fingerprint."""
    study = tiny_study(seeds=1, extra='packages = ["torch==2.4.1", "numpy<2"]\n')
    store = tmp_path / "s.db"
    r = devicediff("run", str(study), "--store", str(store), "--only", "cpu-2t", cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr
    import sqlite3

    with sqlite3.connect(store) as db:
        (fp,) = db.execute("SELECT fingerprint FROM runs WHERE config = 'cpu-2t'").fetchone()
    libs = json.loads(fp)["libraries"]
    assert libs["torch"].startswith("2.4.1") and libs["numpy"].startswith("1.")
