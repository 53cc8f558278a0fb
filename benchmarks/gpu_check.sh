#!/usr/bin/env bash
# GPU figures in one go, for a machine with one NVIDIA GPU (written for an H200); never needed elsewhere.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: $OUT, else ./gpu_check_out
#   OFFICIAL_SRC=/path/to/FoundationVision/VAR bash benchmarks/gpu_check.sh   # adds vs_official
#
# Steps (each under its own timeout; the whole run stays under 8 minutes):
#   1. bf16 training steps of the d16 preset, DeepSpeed ZeRO-2 and ZeRO-3 on one GPU
#   2. the fused attention path: block-causal masked SDPA, default vs each backend forced
#   3. generation images/s of d16 at 256 px, batch 64 (decoding included)
#   4. vs_official on the GPU (only if OFFICIAL_SRC points at a checkout of FoundationVision/VAR)
# Each step's JSON line goes to OUT_DIR/<step>.json (its log to OUT_DIR/<step>.log); OUT_DIR/gpu_check.json
# gathers them, with {"error": ...} for a step that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
START=$(date +%s)
STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  STEPS+=("$name")
  echo "== $name (timeout ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.stdout" 2>"$OUT_DIR/$name.log"
  local rc=$?
  if [ $rc -eq 0 ] && tail -n 1 "$OUT_DIR/$name.stdout" | "$PYTHON" -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    tail -n 1 "$OUT_DIR/$name.stdout" >"$OUT_DIR/$name.json"
  else
    local why="exit status $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="timed out after ${limit}s"
    "$PYTHON" -c 'import json,sys; print(json.dumps({"error": sys.argv[1], "log_tail": open(sys.argv[2]).read()[-1500:]}))' \
      "$why" "$OUT_DIR/$name.log" >"$OUT_DIR/$name.json"
  fi
  echo "   $(cut -c1-300 "$OUT_DIR/$name.json")" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/nvidia_smi.txt" 2>&1 || true

step train_d16_zero2 100 "$PYTHON" benchmarks/device_steps.py --mode train --device cuda --preset d16 \
  --zero-stage 2 --precision bf16 --batch 32 --steps 12 --warmup 2
step train_d16_zero3 100 "$PYTHON" benchmarks/device_steps.py --mode train --device cuda --preset d16 \
  --zero-stage 3 --precision bf16 --batch 32 --steps 12 --warmup 2
step attention_d16 40 "$PYTHON" benchmarks/device_steps.py --mode attention --device cuda --preset d16 \
  --precision bf16 --batch 32 --steps 10
step generate_d16_b64 80 "$PYTHON" benchmarks/device_steps.py --mode generate --device cuda --preset d16 \
  --batch 64 --steps 3
if [ -n "${OFFICIAL_SRC:-}" ] && [ -f "${OFFICIAL_SRC}/models/var.py" ]; then
  step vs_official 110 "$PYTHON" benchmarks/vs_official.py --official-src "$OFFICIAL_SRC" --device cuda \
    --threads 0 --batches 1,8,64 --runs 3
else
  echo "== vs_official skipped: set OFFICIAL_SRC to a checkout of FoundationVision/VAR" >&2
fi

"$PYTHON" - "$OUT_DIR" "$START" "${STEPS[@]}" <<'PY' >"$OUT_DIR/gpu_check.json"
import json, os, sys, time
out_dir, start, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
figures = {name: json.loads(open(os.path.join(out_dir, name + ".json")).read()) for name in steps}
gpu = open(os.path.join(out_dir, "nvidia_smi.txt")).read().strip()
print(json.dumps({"benchmark": "gpu_check", "gpu": gpu, "seconds": int(time.time()) - start, "steps": figures}))
PY
cat "$OUT_DIR/gpu_check.json"
