#!/usr/bin/env bash
# GPU calibration of `devicediff diverge`'s rounding model (docs/diverge.md, "The rounding model"):
# CPU float32 against the GPU with cuDNN on, cuDNN off, deterministic, TF32, bf16 and fp16 autocast,
# on the autoencoder, both tiny PredNets and the planted-fault MLP; then the GPU-marked diverge tests.
#
# On the GPU machine, from the repository root (one workload per call keeps each under 10 minutes):
#   bash scripts/gpu/diverge_calibrate.sh autoencoder               # ~4 min on an H200 host
#   bash scripts/gpu/diverge_calibrate.sh prednet-chainer-lineage   # ~3 min
#   bash scripts/gpu/diverge_calibrate.sh prednet-lotter            # ~3 min
#   bash scripts/gpu/diverge_calibrate.sh mlp                       # ~3 min
#   bash scripts/gpu/diverge_calibrate.sh tests                     # the @gpu diverge tests, ~2 min
# (estimates from the CPU runs here, where one diverge pair took 20-110 s on 2 shared cores, most of
# it process start-up.)
#
# Prints one JSON line per pair: own_p50/own_p99/own_max (a side's own error over its rounding bound,
# over every tensor the rounding model covers), "above" (tensors over SUSPECT_FACTOR: false
# suspects), the verdict, the largest A-vs-B ratio and the median sensitivity; then an "all" line.
# docs/diverge.md's GPU table is filled from these lines (its placeholders say which column).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
what=${1:-autoencoder}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
if [ "$what" = tests ]; then
    exec "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/diverge/
fi
exec "$PY" benchmarks/diverge_calibrate.py --gpu --only "$what"
