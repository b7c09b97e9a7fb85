#!/usr/bin/env bash
# One GPU session's device check, sized for a 15-minute device budget (estimated 3-5 minutes
# on one H100): the throughput/MFU benchmark at l=4 and l=8 (separate runs: ratios
# compare within a run), merged into one JSON the README report renders.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: benchmarks/results
# then, on the development machine: python -m benchmarks.report
# GPU_CHECK_ARGS is appended to both runs (a CPU smoke run of this script:
#   GPU_CHECK_ARGS="--device cpu --hidden 64 --heads 4 --seq 32 --vocab 128 --dtype float32
#   --codegen aot_eager --warmup 1 --iters 1 --rounds 1" bash benchmarks/gpu_check.sh /tmp/x)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
extra=(${GPU_CHECK_ARGS:-})
python benchmarks/gpu_throughput.py --layers 4 --rounds 5 --json "$out/gpu_l4.json" "${extra[@]}"
python benchmarks/gpu_throughput.py --layers 8 --rounds 3 --json "$out/gpu_l8.json" "${extra[@]}"
python - "$out" <<'PY'
import json, os, subprocess, sys
out = sys.argv[1]
runs = [json.load(open(os.path.join(out, f))) for f in ("gpu_l4.json", "gpu_l8.json")]
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
except OSError:   # no git where the device runs it
    rev = "unknown"
merged = {**runs[0], "rows": runs[0]["rows"] + runs[1]["rows"],
          "command": "bash benchmarks/gpu_check.sh  # gpu_throughput.py at --layers 4 "
                     "--rounds 5 and --layers 8 --rounds 3, two runs (ratios compare within a run)",
          "note": f"Recorded with commit {rev}."}
with open(os.path.join(out, "gpu_throughput.json"), "w") as f:
    json.dump(merged, f, indent=1)
for f in ("gpu_l4.json", "gpu_l8.json"):
    os.remove(os.path.join(out, f))
print("wrote", os.path.join(out, "gpu_throughput.json"))
PY
