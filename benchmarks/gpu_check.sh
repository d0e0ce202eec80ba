#!/usr/bin/env bash
# One prepared GPU check for bitnet_jax (H100/H200 device machine: jax 0.11.2, CUDA 13, no
# internet). Prints one JSON object per line; full logs go to $OUT (the device tool returns
# them) or /tmp/bitnet_gpu_check.
#
# Usage (repo root):
#   bash benchmarks/gpu_check.sh [STAGE ...]     on a GPU; stages: env tests kernels parity decode
#                                                 (default, in this order) and sweep (extra)
#   bash benchmarks/gpu_check.sh --smoke [STAGE ...]   the same stages on CPU with tiny shapes
#                                                 (Pallas in interpret mode): checks the script
# Per-stage wall limits (seconds, env): T_ENV=30 T_TESTS=120 T_KERNELS=60 T_PARITY=60
# T_DECODE=170 T_SWEEP=120. The default stages sum to 440 s, under 8 minutes with start-up, so a
# rerun fits in a 15-minute GPU window. Through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540, carry=[".whl"])
# PYTHON=... picks the interpreter (default python3; --smoke prefers .venv/bin/python).
#
# Packages. The device image has jax 0.11.2 (+ jax-cuda13 plugin/pjrt), numpy, sentencepiece,
# tokenizers, tiktoken, jinja2, tqdm, flax, optax and pytest. Wheels in .whl/ (git-ignored;
# name it in `carry`) are installed first when present, e.g. gguf:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf==0.19.0
#
# What each stage answers:
#   env      device kind, jax/jaxlib versions, Pallas Triton backend present, nvidia-smi.
#   tests    tests/test_kernels_pallas.py and tests/test_fused_decode.py compiled on the GPU
#            (interpret=None -> compiled): ternary matmul (fused, stacked, masked) bit for bit,
#            cached attention, and the fused decode kernels and layers against XLA.
#   kernels  Pallas == XLA (exact flag) and timings on the 2B4T linear shapes at M=1,8,64,512.
#   parity   device logits (f32/bf16, pallas/xla) vs the CPU float32 reference, 4 layers.
#   decode   the real engine (runtime.benchmark) on a random 2B4T-shaped model built on the
#            host: decode tokens/s at batch 1, 8, 64 in bf16 and f32, peak memory_stats().
#   sweep    Pallas block-config sweep, to retune pallas.default_config (not in the default).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1
  shift
fi
OUTDIR="${OUT:-/tmp/bitnet_gpu_check}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ "$SMOKE" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/tmp/bitnet_pip.log 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    echo '{"bench": "wheels", "status": "installed"}'
  else
    echo "{\"bench\": \"wheels\", \"status\": \"failed\", \"log\": \"$(tail -1 /tmp/bitnet_pip.log | tr -d '"\\')\"}"
  fi
fi

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests kernels parity decode)

if [ "$SMOKE" = 1 ]; then  # tiny shapes on CPU: Pallas in interpret mode
  ALLOW=(--allow-cpu)
  CONFIG=configs/tiny.json
  KERNEL_ARGS=(--shapes 48x32,16x48 --ms 1,3,70 --reps 1 --max-copies 4)
  PARITY_ARGS=(--config "$CONFIG" --tokens 8)
  DECODE_ARGS=(--config "$CONFIG" --batch 1,8 --prompt-len 8 --new-tokens 8)
  SWEEP_ARGS=(--shapes 48x32 --ms 1 --reps 1 --max-copies 4)
else
  ALLOW=()
  CONFIG=configs/bitnet-b1.58-2B-4T.json
  KERNEL_ARGS=(--ms 1,8,64,512 --methods pallas,xla_int8,bf16_dot --reps 3)
  PARITY_ARGS=(--config "$CONFIG" --layers 4 --tokens 16)
  DECODE_ARGS=(--config "$CONFIG" --batch 1,8,64 --prompt-len 16 --new-tokens 64)
  SWEEP_ARGS=(--ms 1,8,64,512 --reps 3)
fi

# stage NAME LIMIT CMD...: run with a wall limit, tee the log, print a JSON status line.
stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"bench\": \"stage\", \"stage\": \"$name\", \"smoke\": $SMOKE, \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ "$rc" = 124 ] && echo true || echo false)}"
}

tests_to_json() {
  "$PY" - "$OUTDIR/pallas_tests.xml" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(json.dumps({"bench": "test", "error": f"no junit xml: {e}"}))
    sys.exit(0)
for case in root.iter("testcase"):
    outcome, detail = "passed", ""
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            detail = (node.get("message") or "")[:300]
    if outcome == "passed":
        continue  # the summary line says how many passed
    rec = {"bench": "test", "name": case.get("name"), "outcome": outcome,
           "seconds": round(float(case.get("time", 0)), 2)}
    if detail:
        rec["detail"] = detail
    print(json.dumps(rec))
EOF
}

for s in "${STAGES[@]}"; do
  case "$s" in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
        --format=csv,noheader >/tmp/bitnet_nvidia_smi.txt 2>&1 || true
      echo "{\"bench\": \"nvidia-smi\", \"line\": \"$(head -1 /tmp/bitnet_nvidia_smi.txt | tr -d '"\\')\"}"
      stage env "${T_ENV:-30}" "$PY" -m benchmarks.bench_gpu env
      ;;
    tests)
      stage tests "${T_TESTS:-120}" "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_kernels_pallas.py tests/test_fused_decode.py --junitxml="$OUTDIR/pallas_tests.xml"
      tests_to_json
      ;;
    kernels)
      stage kernels "${T_KERNELS:-60}" "$PY" -m benchmarks.bench_gpu kernels "${ALLOW[@]}" \
        "${KERNEL_ARGS[@]}"
      ;;
    parity)
      stage parity "${T_PARITY:-60}" "$PY" -m benchmarks.bench_gpu parity "${ALLOW[@]}" \
        "${PARITY_ARGS[@]}"
      ;;
    decode)
      stage decode "${T_DECODE:-170}" "$PY" -m benchmarks.bench_gpu decode "${ALLOW[@]}" \
        "${DECODE_ARGS[@]}" --policies bf16,f32 --kernels auto
      ;;
    sweep)
      # bench_gpu stops itself at its budget, 10 s before the stage's wall limit.
      stage sweep "${T_SWEEP:-120}" "$PY" -m benchmarks.bench_gpu sweep "${ALLOW[@]}" \
        "${SWEEP_ARGS[@]}" --budget-s "$(( ${T_SWEEP:-120} - 10 ))"
      ;;
    *)
      echo "{\"bench\": \"error\", \"error\": \"unknown stage $s\"}"
      ;;
  esac
done
