#!/usr/bin/env bash
# One batch on the GPU machine (an H200 host, 16 cores): diverge's rounding-model calibration, the
# paper-classifier study, the axes presets, the dropout diverge pairs and the GPU tests, in parallel,
# each under a time limit (studies resume where they stopped). Everything lands in $1 (default /tmp/w).
set -u
cd "$(dirname "$0")/../.."
W=${1:-/tmp/w}; mkdir -p "$W"
export PYTHON=${PYTHON:-python3} PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
export DEVICEDIFF_MNIST=${DEVICEDIFF_MNIST:-$PWD/.devdata/mnist.pkl.gz}
LIMIT=${LIMIT:-520}
T="timeout -s INT $LIMIT"
DD="$PYTHON -m devicediff"
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader; nproc; } > "$W/machine.txt" 2>&1
(for w in autoencoder prednet-chainer-lineage prednet-lotter mlp; do
   $T bash scripts/gpu/diverge_calibrate.sh "$w" > "$W/cal_$w.txt" 2>&1 &
 done; wait) &
($T $DD run paper-classifier --store "$W/paper-classifier.db" --jobs 6 --gpu-slots 4 -q > "$W/classifier.txt" 2>&1
 $DD report --store "$W/paper-classifier.db" --out "$W/rep-classifier" >> "$W/classifier.txt" 2>&1) &
(PRESETS="dropout-device dropout-portable precision compile-check" $T bash scripts/gpu/axes.sh "$W/axes" > "$W/axes.txt" 2>&1) &
({ $T $DD diverge dropout-device --a cpu-1t --b cuda --steps 3 --store "$W/div.db"; echo "exit $?"
   $T $DD diverge dropout-portable --a cpu-1t --b cuda --steps 3 --store "$W/div.db"; echo "exit $?"; } > "$W/div_dropout.txt" 2>&1) &
(timeout 400 $PYTHON -m pytest -q -p no:cacheprovider -m gpu tests/ > "$W/gputests.txt" 2>&1) &
wait
