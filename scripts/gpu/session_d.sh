#!/usr/bin/env bash
# One call on the GPU machine (an H200 host) for issues 14 and 17; PARTS picks what runs, in order:
#   speed     PredNet speed in CALLS fresh processes (scripts/gpu/prednet_speed_stability.sh, section
#             "default"), first, on the quiet machine; OPTS as there
#   diag      the same script's diagnostics (SECTIONS_DIAG: profile convtable cudnn expandable pinned)
#   calib     diverge calibration of every benign GPU pair (CPU vs GPU, cuDNN on/off, deterministic,
#             TF32, bf16, fp16), issue 14's "no benign pair is suspect"
#   fp16      diverge calibration of the fp16 autocast pairs after the GradScaler fix (issue 14)
#   gputests  the GPU-marked tests in TESTS (default tests/diverge/: the operation pass across
#             devices, faults, CPU vs GPU, flat host copies)
#   aespeed   paper-autoencoder wall time with the stored H200 run's hashes (issue 17, target 60 s)
#   classifier  paper-classifier (issue 16's study, all 10 seeds) into W/pc/, with its report; the pack keeps
#             each run's predictions.npy and labels.npy (churn) and leaves the weight snapshots behind
#   cost      diverge's lockstep cost on GPU PredNet pairs (issue 14, item 6); COST_PAPER=1 adds the
#             paper's network (64x64, windows of 20: minutes, most of it the float64 step on the CPU)
# Each part has its own time limit; W (logs, JSON) is packed into $OUT/d.tgz after every part.
#
#   PARTS="speed fp16 gputests" bash scripts/gpu/session_d.sh
set -u
cd "$(dirname "$0")/../.."
W=${W:-out/d}; PARTS=${PARTS:-speed fp16 gputests}
mkdir -p "$W"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 DEVICEDIFF_MNIST=${DEVICEDIFF_MNIST:-$PWD/.devdata/mnist.pkl.gz}
PY=${PYTHON:-python3}
export PYTHON=$PY
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/d.tmp.tgz" -C "$W" --exclude='weights_step*.npy' --exclude='probs.npy' \
  --exclude='checkpoint.pt*' . 2>/dev/null && mv "$OUT/d.tmp.tgz" "$OUT/d.tgz"; }
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv
  nproc; uptime; "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())'; } \
  > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo; echo "=== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$W/$name.log" 2>&1
  echo "[$name exit $? after $((SECONDS - t0)) s]" | tee -a "$W/$name.log"
  pack
}
for p in $PARTS; do
  case $p in
    speed)
      part speed "${SPEED_LIMIT:-300}" env SECTIONS=default OPTS="${OPTS:-eager,naive,plain,cudagraph}" \
        CALLS="${CALLS:-5}" bash scripts/gpu/prednet_speed_stability.sh "$W/stability"
      grep "^\[default\]" "$W/speed.log" ;;
    diag)
      part diag "${DIAG_LIMIT:-240}" env SECTIONS="${SECTIONS_DIAG:-profile convtable cudnn}" CALLS=3 \
        bash scripts/gpu/prednet_speed_stability.sh "$W/stability"
      grep -vE "^\s*$" "$W/diag.log" | tail -60 ;;
    calib)
      part calib "${CALIB_LIMIT:-300}" "$PY" benchmarks/diverge_calibrate.py --gpu
      grep -E '^\{' "$W/calib.log" | cut -c1-300 ;;
    fp16)
      part fp16 "${FP16_LIMIT:-240}" "$PY" benchmarks/diverge_calibrate.py --gpu \
        --only autoencoder prednet-chainer-lineage prednet-lotter --pairs cuda-fp16
      grep -E '^\{' "$W/fp16.log" | cut -c1-400 ;;
    gputests)
      part gputests "${TESTS_LIMIT:-240}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -s -rA ${TESTS:-tests/diverge/}
      grep -E "\[ops gpu\]|largest own|passed|failed|PASSED|FAILED|Error" "$W/gputests.log" | cut -c1-600 | tail -40 ;;
    aespeed)
      part aespeed "${AE_LIMIT:-300}" "$PY" benchmarks/study_speed.py --preset paper-autoencoder \
        --jobs ${AE_JOBS:-8} --gpu-slots 4 --no-isolated --repeats "${AE_REPEATS:-2}" \
        --reference docs/data/paper-autoencoder-h200.db --target-wall 60
      tail -25 "$W/aespeed.log" ;;
    classifier)
      mkdir -p "$W/pc"
      part classifier "${PC_LIMIT:-280}" bash -c "
        timeout -s INT -k 15 $((${PC_LIMIT:-280} - 40)) $PY -m devicediff run paper-classifier \
          --store '$W/pc/paper-classifier.db' --jobs ${PC_JOBS:-8} --gpu-slots 4 -q;
        $PY -m devicediff report --store '$W/pc/paper-classifier.db' --out '$W/pc/report'"
      tail -30 "$W/classifier.log" | cut -c1-300 ;;
    cost)
      part cost "${COST_LIMIT:-300}" bash -c "
        $PY benchmarks/diverge_cost.py --study tests/diverge/prednet_gpu.toml --a cpu-1t --b cuda --lo 2 --hi 8 --repeats 1;
        $PY benchmarks/diverge_cost.py --study tests/diverge/prednet_gpu.toml --a cuda --b cuda-tf32 --lo 2 --hi 8 --repeats 1"
      [ -n "${COST_PAPER:-}" ] && part cost-paper "${COST_PAPER_LIMIT:-240}" "$PY" benchmarks/diverge_cost.py \
        --study paper-prednet --a cuda-cudnn --b cuda-tf32 --lo 1 --hi 3 --repeats 1
      [ -n "${COST_PAPER:-}" ] && tail -3 "$W/cost-paper.log" | cut -c1-500
      grep -vE "^\s*$" "$W/cost.log" | cut -c1-500 | tail -12 ;;
  esac
done
