#!/usr/bin/env bash
# PredNet speed, call to call (issue 17 item 4): benchmarks/prednet_speed.py --variants lotter, five
# times, each in a fresh process, at the headline settings (batch 4, 128x160, nt 10, fp32, TF32 off,
# eager), with the straightforward port (`naive`) in the same call. Prints all five, their spread,
# and the targets (default >= 60 seq/s in every call, >= 1.7x naive in the same call). Then the
# diagnostics that can explain a call-to-call difference:
#   clocks    nvidia-smi -q -d CLOCK,PERFORMANCE before every call, and SM/memory clock, power and
#             temperature sampled every 200 ms during it (is a slow call a slow-clock call?)
#   launch    the kernel profile of the default step (--profile): GPU kernel time vs wall time per
#             step (a call whose wall grows while kernel time does not is launch/CPU bound)
#   cudnn     each route-table convolution timed alone (--conv-table), in two separate calls (does
#             the fastest entry point, or its time, move between processes?), and cuDNN's own log
#             of the engines it picked, for two calls, diffed (does the algorithm choice move?)
#   allocator the five calls again with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (does the
#             spread shrink when the caching allocator cannot fragment?)
#   pinned    the five calls again pinned to 4 cores with taskset (does CPU placement matter?)
#
#   bash scripts/gpu/prednet_speed_stability.sh [OUTDIR]      # default OUTDIR: prednet-stability
#   CALLS=5 STEPS=50 bash scripts/gpu/prednet_speed_stability.sh
#   SECTIONS="default" OPTS=eager,naive,plain,cudagraph bash scripts/gpu/prednet_speed_stability.sh
# SECTIONS (default: all) picks among: default expandable pinned profile convtable cudnn; OPTS are
# the benchmark options timed in each call (default eager,naive; eager is the default step).
#
# Expected wall time on one H200 host: about 6 minutes (5 calls ~25 s each, 5 with the other
# allocator, 5 pinned, 2 conv tables, 2 cuDNN-logged calls, 1 profile). Everything printed is
# also under OUTDIR (JSON of each call, clock samples, cuDNN logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-prednet-stability}
CALLS=${CALLS:-5}
STEPS=${STEPS:-40}
OPTS=${OPTS:-eager,naive}
SECTIONS=${SECTIONS:-default expandable pinned profile convtable cudnn}
want() { case " $SECTIONS " in *" $1 "*) return 0;; esac; return 1; }
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
BENCH="$PY benchmarks/prednet_speed.py --variants lotter --steps $STEPS --warmup 5 --cpu no"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
  --format=csv 2>&1
nvidia-smi -q -d PERFORMANCE 2>&1 | sed -n '1,40p' | grep -v '^$'
nproc; uptime

# one call: clocks before, a clock sampler during, the benchmark's JSON after
call() {  # call TAG N [env...] -- extra benchmark args
  local tag=$1 n=$2; shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  nvidia-smi -q -d CLOCK > "$OUT/$tag-$n.clock-before.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 200 > "$OUT/$tag-$n.clocks.csv" 2>/dev/null &
  local sampler=$!
  env ${envs[@]+"${envs[@]}"} $BENCH --options "$OPTS" --json "$OUT/$tag-$n.json" "$@" > "$OUT/$tag-$n.log" 2>&1
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  grep -E "seq/s|FAILED" "$OUT/$tag-$n.log" | sed "s/^/  $tag call $n: /"
}

summarise() {  # summarise TAG: each option's seq/s per call, spread, targets, clocks during each call
  $PY - "$OUT" "$1" "$CALLS" <<'PY'
import csv, json, statistics, sys
out, tag, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows, opts = [], []
for n in range(1, calls + 1):
    try:
        raw = json.load(open(f"{out}/{tag}-{n}.json"))
        res = {r["option"]: r["seq_per_s"] for r in raw}
        ev = next((r for r in raw if r["option"] == "eager"), {})
        print(f"[{tag}] call {n}: default step on the GPU's clock min/median/max "
              + "/".join(f"{v:.1f}" for v in ev.get("gpu_step_ms", {}).values())
              + f" ms; issued in {ev.get('issue_ms') or float('nan'):.1f} ms from an idle GPU; host "
              + f"{ev.get('host', {}).get('us_per_op', float('nan')):.2f} us per tiny op, core {ev.get('host', {}).get('core')}"
              + ("; the GPU waited for the host (median step over 1.05x the fastest)"
                 if ev.get("gpu_step_ms") and ev["gpu_step_ms"]["median"] > 1.05 * ev["gpu_step_ms"]["min"] else ""))
    except (OSError, ValueError):
        res = {}
    opts += [o for o in res if o not in opts]
    sm, pw = [], []
    try:
        for line in csv.reader(open(f"{out}/{tag}-{n}.clocks.csv")):
            try:
                sm.append(float(line[1].split()[0]))
                pw.append(float(line[3].split()[0]))
            except (IndexError, ValueError):
                pass
    except OSError:
        pass
    rows.append((n, res, sm, pw))
print(f"[{tag}] call  " + "  ".join(f"{o:>10}" for o in opts) + "  default/naive  SM MHz min/median/max  W max")
for n, res, sm, pw in rows:
    ratio = res["eager"] / res["naive"] if res.get("eager") and res.get("naive") else float("nan")
    clk = f"{min(sm):.0f}/{statistics.median(sm):.0f}/{max(sm):.0f}" if sm else "?"
    print(f"[{tag}] {n:4d}  " + "  ".join(f"{res.get(o, float('nan')):10.1f}" for o in opts)
          + f"  {ratio:13.2f}  {clk:>20}  {max(pw) if pw else float('nan'):5.0f}")
for o in opts:
    v = [r[1][o] for r in rows if r[1].get(o)]
    if v:
        print(f"[{tag}] {o}: min {min(v):.1f}, median {statistics.median(v):.1f}, max {max(v):.1f} seq/s; "
              f"spread (max-min)/median {100 * (max(v) - min(v)) / statistics.median(v):.1f}%")
d = [r[1]["eager"] for r in rows if r[1].get("eager")]
ratios = [r[1]["eager"] / r[1]["naive"] for r in rows if r[1].get("eager") and r[1].get("naive")]
if d:
    print(f"[{tag}] target >= 60 seq/s in every call: {'met' if len(d) == calls and min(d) >= 60 else 'MISSED'}; "
          f">= 1.7x naive in every call: {'met' if len(ratios) == calls and min(ratios) >= 1.7 else 'MISSED'} "
          f"(min ratio {min(ratios) if ratios else float('nan'):.2f})")
PY
}

if want default; then
echo; echo "== $CALLS calls, default settings"
for n in $(seq 1 "$CALLS"); do call default "$n"; done
summarise default
fi

if want expandable; then
echo; echo "== $CALLS calls, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
for n in $(seq 1 "$CALLS"); do call expandable "$n" PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; done
summarise expandable
fi

if want pinned; then
echo; echo "== $CALLS calls pinned to cores 0-3 (taskset)"
BENCH_SAVED=$BENCH
BENCH="taskset -c 0-3 $BENCH_SAVED"
for n in $(seq 1 "$CALLS"); do call pinned "$n"; done
BENCH=$BENCH_SAVED
summarise pinned
fi

if want profile; then
echo; echo "== kernel time vs wall time of the default step (one call, --profile)"
$BENCH --options eager,plain --profile --profile-options eager,plain > "$OUT/profile.log" 2>&1
grep -A14 "^\[profile" "$OUT/profile.log"
fi

if want convtable; then
echo; echo "== each routed convolution timed alone, two separate calls (ms per call)"
for n in 1 2; do
  $BENCH --options eager --conv-table > "$OUT/convtable-$n.log" 2>&1
  echo "-- conv table call $n"; sed -n '/^\[conv table/,/routes lotter/p' "$OUT/convtable-$n.log"
done
fi

if want cudnn; then
echo; echo "== cuDNN's engine choices, two calls with cuDNN logging (slower: the speeds here do not count)"
for n in 1 2; do
  CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGINFO_DBG=1 CUDNN_LOGDEST_DBG="$OUT/cudnn-$n.log" \
    $BENCH --options eager --steps 3 --warmup 1 > "$OUT/cudnn-call-$n.log" 2>&1
  # engine / algorithm names per convolution descriptor, in call order
  grep -oE "(engineId|engine_id|algo|Algo|ENGINE)[^,;]*" "$OUT/cudnn-$n.log" 2>/dev/null | sort | uniq -c | sort -rn > "$OUT/cudnn-engines-$n.txt"
  echo "-- call $n: $(wc -l < "$OUT/cudnn-$n.log" 2>/dev/null || echo 0) log lines, $(wc -l < "$OUT/cudnn-engines-$n.txt") distinct engine/algo mentions"
done
if diff -q "$OUT/cudnn-engines-1.txt" "$OUT/cudnn-engines-2.txt" > /dev/null; then
  echo "cuDNN engine choices: identical in both calls"
else
  echo "cuDNN engine choices DIFFER between the two calls:"; diff "$OUT/cudnn-engines-1.txt" "$OUT/cudnn-engines-2.txt" | head -40
fi
fi

echo; echo "== clocks after all calls"
nvidia-smi -q -d CLOCK,PERFORMANCE 2>&1 | grep -v '^$' | sed -n '1,60p'
echo "outputs in $OUT/"
