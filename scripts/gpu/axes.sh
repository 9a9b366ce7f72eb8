#!/usr/bin/env bash
# The axes presets of issues 15 and 18 on one GPU host (an H200 with 16 cores), with everything the
# docs need printed: per-config tables and verdicts, the effective settings that matter, warnings.
#
#   bash scripts/gpu/axes.sh [OUTDIR]            # default OUTDIR: axes-out
#   PRESETS="precision dropout-device" bash scripts/gpu/axes.sh
#
# Expected wall time on one H200 host (16 cores), all five presets: about 18 minutes
#   dropout-device    ~2 min   (3 configs x 5 seeds; the GPU runs must carry the pairing warning)
#   dropout-portable  ~2 min   (same, portable_random = true; no warning)
#   precision         ~4 min   (6 configs x 5 seeds, 1000 steps)
#   compile-check     ~4 min   (5 configs x 3 seeds; max-autotune compiles for a while)
#   noise-hypothesis  ~5 min   (6 configs x 5 seeds of a 3-layer PredNet, 48 windows)
# Each preset is one `devicediff run` in its own store; a preset that exceeds the device tool's
# 10-minute limit per command can be run alone (PRESETS=...) and resumes where it stopped.
# Also runs the GPU tests of the axes (tests marked gpu in the two files below, ~1 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-axes-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DD="$PY -m devicediff"
PRESETS=${PRESETS:-"dropout-device dropout-portable precision compile-check noise-hypothesis"}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

$PY - <<'PY'
import torch, shutil, importlib.util
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "triton", importlib.util.find_spec("triton") is not None,
      "g++", shutil.which("g++"))
PY

jobs_for() {
  case "$1" in
    precision) echo 6 ;; compile-check) echo 1 ;; noise-hypothesis) echo 8 ;; *) echo 3 ;;
  esac
}

for p in $PRESETS; do
  echo "=================== $p ==================="
  t0=$(date +%s)
  $DD run "$p" --store "$OUT/$p.db" --jobs "$(jobs_for "$p")" --gpu-slots 4 2>&1 | tail -n 80
  echo "[$p: $(( $(date +%s) - t0 )) s]"
  $PY - "$OUT/$p.db" <<'PY'
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
rows = con.execute("select json_extract(config_json, '$.name'), seed, state, error, effective, wall_time "
                   "from runs order by 1, 2").fetchall()
keys = ("precision", "autocast_dtype", "tf32_conv", "tf32_matmul", "compile", "cuda_graphs", "grad_noise",
        "portable_random")
seen = set()
for name, seed, state, error, eff, wall in rows:
    eff = json.loads(eff or "{}")
    if name not in seen:
        seen.add(name)
        print(f"-- {name}: " + ", ".join(f"{k}={eff.get(k)}" for k in keys))
        for k in ("grad_scaler", "cuda_graphs_detail", "grad_noise_detail", "portable_random_detail", "random_draws"):
            if eff.get(k):
                print(f"   {k}: {json.dumps(eff[k])}")
    warn = eff.get("warnings") or []
    print(f"   seed {seed}: {state} {round(wall or 0, 1)} s" + (f" error={error}" if error else "")
          + (f" warnings={warn}" if warn else ""))
for name, value in con.execute("select name, max(value) from metrics where name like 'amp_%' group by name"):
    print(f"   metric {name}: max {value}")
PY
done

echo "=================== GPU tests ==================="
$PY -m pytest -q -m gpu tests/frameworks/test_torch_axes.py tests/portable/test_portable_wiring.py 2>&1 | tail -n 30
