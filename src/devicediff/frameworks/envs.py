"""Python environments for package sets: the library-version axis.

A config with ``packages = ["torch==2.4.1", "numpy<2"]`` runs its workers in a virtual
environment that holds that package set plus what a devicediff worker imports (numpy,
threadpoolctl, matplotlib for PredNet's prediction grid; devicediff itself comes from the
source tree on ``PYTHONPATH``, ``executors.base.worker_env``). devicediff makes it once::

    ~/.cache/devicediff/envs/<key>/        key = hash(normalised sorted requirements,
        venv/                                         Python X.Y, torch flavour, recipe)
        requirements.txt   the set asked for, normalised
        resolved.txt       what pip resolved (name==version), installed with --no-deps
        freeze.txt         ``pip freeze`` of the finished environment
        build.json         versions, flavour, build time, size, index or wheelhouse
        .devicediff-ready  written last
    ~/.cache/devicediff/envs/<key>.lock, <key>.install.log

Building takes a file lock: a second study that needs the same environment waits, then
finds the ready marker and reuses it. Without the marker (a killed build) it is rebuilt.

How it is built (``docs/environments.md`` has the measurements):

1. ``python -m venv --without-pip`` from this interpreter's base Python; pip runs from
   this environment with ``pip --python`` (one pip version, no ensurepip).
2. ``pip install --dry-run --ignore-installed --report``: the whole set is resolved before
   anything is installed; a set pip cannot resolve is one ``EnvironmentBuildError`` line
   naming pip's reason. ``--wheelhouse DIR`` (or ``$DEVICEDIFF_WHEELHOUSE``) resolves
   from ``DIR`` only (``--no-index --find-links DIR``).
3. The torch flavour of this environment is kept where the index allows: a ``+cpu``
   build sorts above the plain one (PEP 440 local versions), so pip takes it whenever an
   index or wheelhouse offers it. PyPI offers only CUDA builds for Linux x86_64; such a
   build loads its CUDA runtime libraries (the ``nvidia-*`` wheels) at ``import torch``
   even on a CPU, so they stay, and only ``triton`` (the GPU kernel compiler, never loaded
   by a CPU run) is left out when this environment's torch is a CPU build.
4. The resolved pins are installed with ``--no-deps``: exactly what step 2 chose.
5. The new interpreter must import torch (if present) and numpy and compute on the CPU.

Standard library only (``packaging`` is used when present).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Iterable

from devicediff.errors import EnvironmentBuildError
from devicediff.frameworks.chainer.env import _locked, cache_dir

WHEELHOUSE_ENV = "DEVICEDIFF_WHEELHOUSE"  # default for --wheelhouse
FLAVOUR_ENV = "DEVICEDIFF_TORCH_FLAVOUR"  # "cpu" or "cuda": overrides what this torch is
READY = ".devicediff-ready"

#: What a torch worker imports beyond the standard library (worker, _driver, fingerprint,
#: frameworks.torch, workloads, data): numpy; threadpoolctl for the BLAS facts of the env
#: record; matplotlib for PredNet's prediction grid. Not scipy/pandas/rich/jinja2/psutil:
#: only the parent (store, analysis, report) imports those.
WORKER_NEEDS = ("numpy", "threadpoolctl", "matplotlib")
#: Left out of a CPU-flavour environment: GPU-only, never loaded by a CPU run.
GPU_ONLY = ("triton", "pytorch-triton")
#: The recipe is part of the key: changing what is installed makes new environments.
RECIPE = ("v1", WORKER_NEEDS, GPU_ONLY)
_NO_INDEX = ("NewConnectionError", "Failed to establish a new connection", "Name or service not known",
             "Temporary failure in name resolution", "Network is unreachable", "ProxyError", "ConnectTimeout",
             "NameResolutionError", "Failed to resolve")
_CHECK = r"""
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import numpy; out["numpy"] = numpy.__version__
except ModuleNotFoundError:
    pass
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    out["torch"] = torch.__version__; out["torch_cuda"] = torch.version.cuda
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert float((x @ x.T).sum()) == 83.0  # [[5, 14], [14, 50]]
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Env:
    key: str
    dir: Path
    python: str
    versions: dict  # {"python", "numpy", "torch", "torch_cuda"} measured in the environment


# ---------------------------------------------------------------------------- the key

def canonical_name(name: str) -> str:
    """PEP 503: ``Typing_Extensions`` and ``typing.extensions`` are ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normalise(requirement: str) -> str:
    """One spelling per requirement: canonical name, sorted extras and specifiers, no spaces.
    ``"Torch == 2.4.1"`` and ``"torch==2.4.1"`` give the same string."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # pragma: no cover - packaging is almost always there
        return _normalise_plain(requirement)
    try:
        r = Requirement(requirement)
    except InvalidRequirement as e:
        why = str(e).splitlines()[0]
        raise EnvironmentBuildError(f"packages: {requirement!r} is not a requirement ({why}); write e.g. \"torch==2.4.1\"") from None
    out = canonical_name(r.name)
    if r.extras:
        out += "[" + ",".join(sorted(canonical_name(x) for x in r.extras)) + "]"
    if r.url:
        out += f" @ {r.url}"
    out += ",".join(sorted(str(s) for s in r.specifier))
    if r.marker:
        out += f"; {r.marker}"
    return out


def _normalise_plain(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", requirement)
    if not m:
        raise EnvironmentBuildError(f"packages: {requirement!r} is not a requirement; write e.g. \"torch==2.4.1\"")
    specs = sorted(s.replace(" ", "") for s in m.group(2).split(",") if s.strip())
    return canonical_name(m.group(1)) + ",".join(specs)


def requirement_set(packages: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({normalise(p) for p in packages}))


def torch_flavour() -> str:
    """``"cpu"`` or ``"cuda"``: the build of this environment's torch, read from
    ``torch/version.py`` without importing torch (``$DEVICEDIFF_TORCH_FLAVOUR`` overrides)."""
    named = os.environ.get(FLAVOUR_ENV)
    if named in ("cpu", "cuda"):
        return named
    spec = find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(loc) / "version.py").read_text()
        except OSError:
            continue
        m = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        return "cpu" if not m or m.group(1).strip() == "None" else "cuda"
    return "cpu"


def base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def env_key(packages: Iterable[str], *, python_version: str | None = None, flavour: str | None = None,
            extras: Iterable[str] | None = None) -> str:
    """The environment's folder name: the same for every spelling and order of the set."""
    blob = json.dumps({
        "requirements": list(requirement_set(packages)),
        **({"extras": sorted(extras)} if extras is not None and tuple(extras) != WORKER_NEEDS else {}),
        "python": python_version or "%d.%d" % sys.version_info[:2],
        "flavour": flavour or torch_flavour(),
        "recipe": repr(RECIPE),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def envs_root() -> Path:
    return cache_dir() / "envs"


def _interpreter(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def read_ready(folder: Path, key: str) -> dict | None:
    """The ready marker's versions, or None if the environment is not complete."""
    try:
        stamp = json.loads((folder / READY).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key or not _interpreter(folder / "venv").is_file():
        return None
    return stamp.get("versions") or {}


# ---------------------------------------------------------------------------- pip

def _pip(py: Path) -> list[str]:
    """pip of this environment driving the new interpreter (``pip --python``, pip >= 22.3);
    the new environment's own pip when this one has none."""
    if find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "--python", str(py), "--disable-pip-version-check"]
    return [str(py), "-m", "pip", "--disable-pip-version-check"]


def _index_args(wheelhouse: str | None) -> list[str]:
    if not wheelhouse:
        return []
    wh = Path(wheelhouse).expanduser()
    if not wh.is_dir():
        raise EnvironmentBuildError(f"--wheelhouse {wheelhouse}: no such folder; give a folder of wheels")
    return ["--no-index", "--find-links", str(wh.resolve())]


def _run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        try:
            return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
        except OSError as e:
            out.write(f"ERROR: {e}\n")
            return 127


def _pip_reason(log: Path, since: int) -> str:
    """pip's first ``ERROR:`` line after byte ``since`` of the log (its reason)."""
    try:
        with open(log, errors="replace") as f:
            f.seek(since)
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in lines:
        if ln.startswith("ERROR:"):
            return ln[len("ERROR:"):].strip()[:300]
    return (lines[-1][:300] if lines else "no output")


def _no_index(log: Path, since: int) -> bool:
    try:
        with open(log, errors="replace") as f:
            f.seek(since)
            text = f.read()
    except OSError:
        return False
    return any(m in text for m in _NO_INDEX)


def _fail(reqs: tuple[str, ...], what: str, log: Path, since: int, wheelhouse: str | None) -> EnvironmentBuildError:
    reason = _pip_reason(log, since)
    where = f"packages {list(reqs)}"
    if not wheelhouse and (_no_index(log, since) or os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes")):
        return EnvironmentBuildError(
            f"cannot build the environment for {where}: no package index reachable ({reason}); build it from local "
            f"wheels with `devicediff env build STUDY --wheelhouse DIR`, or set python = \"/path/to/bin/python\" "
            f"in the config to use an environment you made; log: {log}")
    return EnvironmentBuildError(f"cannot build the environment for {where}: {what} failed: {reason}; log: {log}")


# ---------------------------------------------------------------------------- build

def _resolve(py: Path, reqs: tuple[str, ...], extras: tuple[str, ...], wheelhouse: str | None,
             folder: Path, log: Path) -> list[tuple[str, str]]:
    """``[(name, version)]`` that pip would install for the set; nothing installed."""
    report = folder / "resolve-report.json"
    since = log.stat().st_size if log.exists() else 0
    cmd = [*_pip(py), "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           *_index_args(wheelhouse), *reqs, *extras]
    if _run(cmd, log) != 0:
        raise _fail(reqs, "resolving", log, since, wheelhouse)
    items = json.loads(report.read_text())["install"]
    report.unlink()
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in items]


def _choose(pins: list[tuple[str, str]], flavour: str) -> tuple[list[str], list[str]]:
    """(pins to install, names left out): CPU flavour leaves GPU-only packages out."""
    keep, dropped = [], []
    for name, version in pins:
        if flavour == "cpu" and canonical_name(name) in GPU_ONLY:
            dropped.append(f"{name}=={version}")
        else:
            keep.append(f"{name}=={version}")
    return keep, dropped


def _check(py: Path, reqs: tuple[str, ...], log: Path) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True, env=env)
    with open(log, "a") as out:
        out.write(f"\n$ check imports\n{r.stdout}{r.stderr}\n")
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()
        raise EnvironmentBuildError(f"the environment for packages {list(reqs)} was installed but does not run on "
                                    f"the CPU: {tail[-1] if tail else r.returncode}; log: {log}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _build(folder: Path, key: str, reqs: tuple[str, ...], extras: tuple[str, ...], flavour: str,
           wheelhouse: str | None, log: Path, quiet: bool = True) -> dict:
    """Make ``folder`` from nothing (the caller holds the lock); return its versions."""
    t0 = time.time()
    venv = folder / "venv"
    py = _interpreter(venv)
    folder.mkdir(parents=True)
    (folder / "requirements.txt").write_text("".join(r + "\n" for r in reqs))
    no_pip = ["--without-pip"] if find_spec("pip") else []  # pip runs from here (_pip)
    if _run([base_python(), "-m", "venv", *no_pip, str(venv)], log) != 0:
        raise EnvironmentBuildError(f"cannot make a virtual environment in {venv}: {_pip_reason(log, 0)}; log: {log}")
    pins = _resolve(py, reqs, extras, wheelhouse, folder, log)
    keep, dropped = _choose(pins, flavour)
    (folder / "resolved.txt").write_text("".join(p + "\n" for p in keep))
    if not quiet:  # after resolving, so that a set pip cannot resolve stays a one-line error
        print(f"devicediff: installing {len(keep)} packages for {', '.join(reqs)} into {folder} (once); log: {log}",
              file=sys.stderr)
    since = log.stat().st_size
    if _run([*_pip(py), "install", "--no-deps", "--quiet", *_index_args(wheelhouse), "-r", str(folder / "resolved.txt")], log) != 0:
        raise _fail(reqs, "installing", log, since, wheelhouse)
    versions = _check(py, reqs, log)
    freeze = subprocess.run([*_pip(py), "freeze", "--all"], capture_output=True, text=True).stdout
    (folder / "freeze.txt").write_text(freeze)
    info = {"key": key, "requirements": list(reqs), "worker_needs": list(extras), "flavour": flavour,
            "left_out": dropped, "wheelhouse": wheelhouse, "versions": versions,
            "build_seconds": round(time.time() - t0, 1), "size_bytes": _du(folder)}
    (folder / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    return versions


def ensure_env(packages: Iterable[str], *, wheelhouse: str | None = None, extras: Iterable[str] | None = None,
               flavour: str | None = None, quiet: bool = True) -> Env:
    """The environment of a package set, built under a lock if it is not ready. ``extras``:
    what is installed besides the set (default ``WORKER_NEEDS``)."""
    reqs = requirement_set(packages)
    extras = tuple(WORKER_NEEDS if extras is None else extras)
    flavour = flavour or torch_flavour()
    key = env_key(reqs, flavour=flavour, extras=extras)
    root = envs_root()
    folder, log = root / key, root / f"{key}.install.log"
    wheelhouse = wheelhouse or os.environ.get(WHEELHOUSE_ENV) or None
    versions = read_ready(folder, key)
    if versions is None:
        with _locked(root / f"{key}.lock"):
            versions = read_ready(folder, key)  # another process may have built it while we waited
            if versions is None:
                if folder.exists():
                    shutil.rmtree(folder)  # a killed build
                log.write_text("")
                try:
                    versions = _build(folder, key, reqs, extras, flavour, wheelhouse, log, quiet)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                (folder / READY).write_text(json.dumps({"key": key, "versions": versions}) + "\n")
    _link_data(folder / "venv")
    return Env(key, folder, str(_interpreter(folder / "venv")), versions)


def _link_data(venv: Path) -> None:
    """Let the environment find the MNIST file that scripts/setup.sh put beside this one
    (``data.mnist.DATA_PREFIX`` is per environment): a symbolic link, refreshed if stale."""
    try:
        from devicediff.data.mnist import DATA_PREFIX, mnist_pickle_path
    except ImportError:
        return
    pkl = mnist_pickle_path()
    if pkl is None:
        return
    link = venv / DATA_PREFIX.relative_to(Path(sys.prefix)) / "mnist"
    target = pkl.parent.parent  # .../mnist (holding data/mnist.pkl.gz)
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".mnist.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        pass  # the worker then says where MNIST was looked for


def python_for_packages(packages: Iterable[str], *, wheelhouse: str | None = None) -> str:
    """The interpreter of a package set's environment (``runner.python_for``)."""
    return ensure_env(packages, wheelhouse=wheelhouse, quiet=False).python


def build_environments(study, wheelhouse: str | None = None, progress: Callable[[str], None] | None = print) -> list:
    """Build every environment ``study`` needs ahead of time (``devicediff env build``).
    Returns ``[(config, python, versions)]`` for each config with ``packages``."""
    say = progress or (lambda _msg: None)
    out, done = [], {}
    for cfg in study.configs:
        if not cfg.packages:
            continue
        reqs = requirement_set(cfg.packages)
        if reqs not in done:
            t0 = time.time()
            done[reqs] = ensure_env(reqs, wheelhouse=wheelhouse, quiet=False)
            env = done[reqs]
            say(f"{cfg.name}: {', '.join(reqs)} -> {env.python} ({_describe(env.versions)}; {time.time() - t0:.0f} s)")
        else:
            say(f"{cfg.name}: same environment as above")
        out.append((cfg, done[reqs].python, done[reqs].versions))
    if not out:
        say(f"{study.name}: no config sets packages; nothing to build")
    return out


def _describe(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "torch_cuda")
