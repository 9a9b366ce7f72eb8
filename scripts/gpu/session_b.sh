#!/usr/bin/env bash
# Second GPU batch: finish paper-classifier and the axes presets (precision's CPU configs,
# compile-check), run noise-hypothesis, then the reports. Each devicediff command has its own time
# limit (SIGINT: unfinished runs are marked interrupted and resume); a background loop packs the
# work folder into $OUT/b.tgz every 45 s so a cut-off call still returns what was done.
set -u
cd "$(dirname "$0")/../.."
W=${1:-/tmp/w}; mkdir -p "$W/axes"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 DEVICEDIFF_MNIST=${DEVICEDIFF_MNIST:-$PWD/.devdata/mnist.pkl.gz}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-470}
run() { timeout -k 15 -s INT "$LIMIT" "$PY" -m devicediff run "$@"; echo "[exit $?]"; }
pack() { tar czf "$OUT/b.tmp.tgz" -C "$W" --exclude='*_artifacts' --exclude='*.npy' . 2>/dev/null && mv "$OUT/b.tmp.tgz" "$OUT/b.tgz"; }
(while sleep 45; do pack; done) & PACKER=$!
run paper-classifier --store "$W/${CLS_DB:-paper-classifier}.db" --jobs 8 --gpu-slots 4 -q > "$W/classifier2.txt" 2>&1 &
run precision --store "$W/axes/precision.db" --jobs 2 --gpu-slots 4 -q > "$W/precision2.txt" 2>&1 &
run compile-check --store "$W/axes/compile-check.db" --jobs 1 -q > "$W/compile2.txt" 2>&1 &
[ "${RUN_NOISE:-1}" = 1 ] && run noise-hypothesis --store "$W/axes/noise-hypothesis.db" --jobs 7 --gpu-slots 4 -q > "$W/noise.txt" 2>&1 &
wait $(jobs -p | grep -v "^$PACKER$")
for s in ${CLS_DB:-paper-classifier}:paper-classifier axes/precision:precision axes/compile-check:compile-check axes/noise-hypothesis:noise-hypothesis axes/dropout-device:dropout-device axes/dropout-portable:dropout-portable; do
  db=${s%%:*}; name=${s##*:}
  timeout 60 "$PY" -m devicediff report --store "$W/$db.db" --out "$W/rep-$name" > /dev/null 2>&1
done
kill $PACKER; pack
