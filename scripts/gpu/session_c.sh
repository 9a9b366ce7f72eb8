#!/usr/bin/env bash
# One call on the GPU machine (an H200 host, 16 cores), meant to be run in several calls in a row:
#   1. PredNet speed once, on the quiet machine, before anything else starts (issue 17: one number per
#      call, several calls make the result);
#   2. paper-prednet --until-decided (issue 13) on cores 0-11;
#   3. the smaller studies named in SMALL, one after the other, on cores 12-15 (taskset: each devicediff
#      pins its runs to disjoint cores of what it is given, so the two never share a core).
# Every devicediff command has its own time limit (SIGINT: unfinished runs are marked interrupted and
# resume in the next call); the work folder W (stores, logs) is packed into $OUT/c.tgz every 45 s, so a
# cut-off call still returns what was done. Carry W back in the next call to resume.
#
#   W=out/w CALL=1 LIMIT=520 SMALL="dropout-device dropout-portable" bash scripts/gpu/session_c.sh
set -u
cd "$(dirname "$0")/../.."
W=${W:-out/w}; CALL=${CALL:-1}; LIMIT=${LIMIT:-520}; SMALL=${SMALL:-}
mkdir -p "$W"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 DEVICEDIFF_MNIST=${DEVICEDIFF_MNIST:-$PWD/.devdata/mnist.pkl.gz}
PY=${PYTHON:-python3}
DD="$PY -m devicediff"
pack() { tar czf "$OUT/c.tmp.tgz" -C "$W" --exclude='*_artifacts' . 2>/dev/null && mv "$OUT/c.tmp.tgz" "$OUT/c.tgz"; }
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv; nproc; uptime; } \
  > "$W/machine-$CALL.txt" 2>&1
START=$SECONDS

"$PY" benchmarks/prednet_speed.py --variants lotter --steps 40 --warmup 5 --cpu no --options eager,naive \
  --json "$W/speed-$CALL.json" > "$W/speed-$CALL.log" 2>&1
grep -E "seq/s" "$W/speed-$CALL.log" | sed "s/^/speed call $CALL: /"

LEFT=$((LIMIT - (SECONDS - START)))
(while sleep 45; do pack; done) & PACKER=$!
[ -f "$W/paper-prednet.db" ] || cp docs/data/paper-prednet-h200.db "$W/paper-prednet.db"
timeout -k 15 -s INT "$LEFT" taskset -c 0-11 $DD run paper-prednet --store "$W/paper-prednet.db" \
  --until-decided --max-seeds "${MAX_SEEDS:-20}" --batch 5 --jobs 8 --gpu-slots 4 -q \
  >> "$W/prednet.txt" 2>&1 &
PREDNET=$!
(for s in $SMALL; do
   left=$((LIMIT - (SECONDS - START) - 5)); [ "$left" -gt 20 ] || break
   timeout -k 15 -s INT "$left" taskset -c 12-15 $DD run "$s" --store "$W/$s.db" --jobs 3 --gpu-slots 4 -q \
     >> "$W/$s.txt" 2>&1; echo "[$s exit $?]" >> "$W/$s.txt"
 done) &
wait $PREDNET; echo "[paper-prednet exit $?]" >> "$W/prednet.txt"
wait $(jobs -p | grep -v "^$PACKER$")
kill $PACKER; pack
tail -5 "$W/prednet.txt"; for s in $SMALL; do tail -2 "$W/$s.txt"; done
