"""The Python environment that runs Chainer configs: Chainer 7.8.1 with numpy<2.

Chainer 7.8.1 (its last release, 2020) does not build against numpy 2 and its
``setup.py`` needs ``pkg_resources``, gone from setuptools 81. It therefore
lives in its own virtual environment, made once with the recipe of DESIGN.md §4::

    python -m venv DIR
    DIR/bin/python -m pip install "setuptools<81" wheel "numpy<2"
    DIR/bin/python -m pip install --no-build-isolation chainer==7.8.1
    DIR/bin/python -m pip install threadpoolctl     # BLAS facts for the env record

``chainer_python()`` returns that environment's interpreter, creating it on
first use under ``~/.cache/devicediff/chainer-7.8.1/`` (``$DEVICEDIFF_CACHE``
replaces ``~/.cache/devicediff``) from this interpreter's base Python, or from
``$DEVICEDIFF_CHAINER_BASE_PYTHON`` (it must be Python <= 3.11: Chainer 7.8.1
imports ``numpy.distutils``, which numpy<2 lacks on 3.12).
``$DEVICEDIFF_CHAINER_PYTHON`` names a ready interpreter to use instead (it
must exist and import chainer). Creation takes
a file lock, so parallel runners and test processes wait for one another
instead of building the environment twice; a half-made environment (a killed
install) carries no ``ready`` marker and is rebuilt.

devicediff itself is not installed there: the worker gets devicediff's source
folder on ``PYTHONPATH`` (``executors.base.worker_env``), and everything a
Chainer worker imports from devicediff needs only the standard library and
numpy (no torch, no pandas).

Create it ahead of time (e.g. before timing a study)::

    python -m devicediff.frameworks.chainer.env          # prints the interpreter
    python -m devicediff.frameworks.chainer.env --check  # versions, creates nothing

Standard library only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

CHAINER_VERSION = "7.8.1"
PYTHON_ENV = "DEVICEDIFF_CHAINER_PYTHON"
BASE_ENV = "DEVICEDIFF_CHAINER_BASE_PYTHON"  # the interpreter that makes the venv (default: this one's base)
CACHE_ENV = "DEVICEDIFF_CACHE"
READY = ".devicediff-ready"  # written last: "<recipe id> <versions>"

#: (what, pip arguments) in order; DESIGN.md §4.
RECIPE = (
    ("build tools and numpy<2", ["setuptools<81", "wheel", "numpy<2"]),
    (f"chainer=={CHAINER_VERSION}", ["--no-build-isolation", f"chainer=={CHAINER_VERSION}"]),
    # Not needed by Chainer: lets the worker record numpy's BLAS and its thread pool.
    ("threadpoolctl", ["threadpoolctl"]),
)
RECIPE_ID = hashlib.sha256(repr(RECIPE).encode()).hexdigest()[:12]
_CHECK = "import chainer, numpy, sys; print(chainer.__version__, numpy.__version__, sys.version.split()[0])"


from devicediff.errors import EnvironmentBuildError as ChainerEnvError  # noqa: E402


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "devicediff"


def env_dir() -> Path:
    return cache_dir() / f"chainer-{CHAINER_VERSION}"


def _interpreter(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_ready(venv: Path) -> bool:
    """Made completely, by this recipe."""
    try:
        stamp = (venv / READY).read_text().split()
    except OSError:
        return False
    return bool(stamp) and stamp[0] == RECIPE_ID and _interpreter(venv).is_file()


def chainer_python() -> str:
    """The interpreter of the Chainer environment, made on first use."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        path = shutil.which(named) or named
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ChainerEnvError(f"${PYTHON_ENV}={named!r} is not an executable interpreter; unset it to let devicediff make its own Chainer environment")
        return path
    venv = env_dir()
    if is_ready(venv):
        return str(_interpreter(venv))
    return str(create_env(venv))


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _step(what: str, cmd: list[str], log: Path, venv: Path) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        except OSError as e:
            raise ChainerEnvError(f"creating the Chainer environment in {venv} failed at '{what}': {e}") from None
    if code != 0:
        last = _last_error_line(log)
        raise ChainerEnvError(
            f"creating the Chainer environment in {venv} failed at '{what}' (exit {code}): {last}; full log: {log}"
        )


def _check_base(base: str, venv: Path) -> None:
    """Chainer 7.8.1 runs ``import numpy.distutils`` when it loads
    (chainer/_environment_check.py), and numpy < 2 has no numpy.distutils on
    Python >= 3.12 (numpy/distutils/__init__.py: "It will be removed for
    Python >= 3.12"), so the environment needs Python <= 3.11."""
    try:
        r = subprocess.run([base, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=60)
        major, minor = (int(x) for x in r.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return  # not a Python we can ask; the venv step reports it
    if (major, minor) >= (3, 12):
        raise ChainerEnvError(
            f"cannot make the Chainer environment in {venv} from Python {major}.{minor} ({base}): Chainer 7.8.1 "
            f"imports numpy.distutils, which numpy<2 has only up to Python 3.11; set ${BASE_ENV} to a Python 3.11"
        )


def _last_error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.startswith("ERROR") or "Error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def create_env(venv: Path | None = None, *, base_python: str | None = None, quiet: bool = True) -> Path:
    """Make the Chainer environment at ``venv`` (default ``env_dir()``) if it is
    not ready, under a file lock; return its interpreter.

    ``base_python`` is the interpreter that runs ``-m venv`` (default: this
    one's base interpreter; Chainer 7.8.1 is known to install on 3.11).
    """
    venv = Path(venv or env_dir()).expanduser().resolve()
    py = _interpreter(venv)
    log = venv.parent / f"{venv.name}.install.log"
    with _locked(venv.parent / f"{venv.name}.lock"):
        if is_ready(venv):
            return py  # another process finished it while we waited
        if venv.exists():
            shutil.rmtree(venv)  # a half-made one (killed install) or one from an older recipe
        log.write_text("")
        if not quiet:
            print(f"devicediff: making the Chainer {CHAINER_VERSION} environment in {venv} (a few minutes, once); log: {log}",
                  file=sys.stderr)
        base = base_python or os.environ.get(BASE_ENV) or getattr(sys, "_base_executable", None) or sys.executable
        _check_base(base, venv)
        _step("python -m venv", [base, "-m", "venv", str(venv)], log, venv)
        for what, args in RECIPE:
            _step(f"pip install {what}", [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args], log, venv)
        try:
            versions = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True, check=True).stdout.strip()
        except subprocess.CalledProcessError as e:
            tail = (e.stderr or "").strip().splitlines()
            raise ChainerEnvError(
                f"the Chainer environment in {venv} was installed but cannot import chainer: {tail[-1] if tail else e}; log: {log}"
            ) from None
        with open(log, "a") as out:
            out.write(f"\nchainer, numpy, python: {versions}\n")
        (venv / READY).write_text(f"{RECIPE_ID} {versions}\n")
    return py


def check(python: str | None = None) -> str:
    """``"chainer X numpy Y python Z"`` of an interpreter (default: the cached
    environment, which must exist). Raises ``ChainerEnvError``."""
    if python is None:
        named = os.environ.get(PYTHON_ENV)
        python = named or str(_interpreter(env_dir()))
        if not named and not is_ready(env_dir()):
            raise ChainerEnvError(f"no Chainer environment at {env_dir()} yet; run `python -m devicediff.frameworks.chainer.env` to make it")
    r = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True)
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()
        raise ChainerEnvError(f"{python} cannot import chainer: {tail[-1] if tail else r.returncode}")
    c, n, p = r.stdout.split()
    return f"chainer {c} numpy {n} python {p}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m devicediff.frameworks.chainer.env",
                                 description="Make (once) and print the Chainer 7.8.1 environment's interpreter.")
    ap.add_argument("--check", action="store_true", help="print the versions of an existing environment; make nothing")
    args = ap.parse_args(argv)
    try:
        if args.check:
            print(check())
        else:
            if not os.environ.get(PYTHON_ENV) and not is_ready(env_dir()):
                create_env(quiet=False)
            py = chainer_python()
            print(py)
            print(check(py), file=sys.stderr)
    except ChainerEnvError as e:
        print(f"devicediff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
