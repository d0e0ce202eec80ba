#!/usr/bin/env bash
# One prepared GPU check for bitnet_jax (H100/H200 device machine: jax 0.11.2, CUDA 13, no
# internet). Prints one JSON object per line; full logs go to $OUT (the device tool returns
# them) or /tmp/bitnet_gpu_check.
#
# Usage (repo root):  bash benchmarks/gpu_check.sh [STAGE ...]
#   stages, in the default order: env tests kernels decode parity sweep
#   per-stage wall limits (seconds) via env: T_TESTS=150 T_KERNELS=150 T_DECODE=150
#   T_PARITY=60 T_SWEEP=40 (defaults sum to ~560 s, inside one 600 s device command).
#   Through the device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=600,
#   carry=[".whl"]); a second call can run the rest, e.g. "bash benchmarks/gpu_check.sh sweep"
#   with T_SWEEP=400.
#
# $OUT receives at most 7 files (the tool returns 8): one log per stage plus pallas_tests.xml.
#
# Packages. The device image already has jax 0.11.2 (+ jax-cuda13 plugin/pjrt), numpy,
# safetensors, sentencepiece, tokenizers, tiktoken, jinja2, tqdm, optax, flax and pytest
# (/work/.library/device/KINDS.md). Only **gguf** is missing; its own needs (numpy, pyyaml,
# requests, tqdm) are there. Fetch it once on the dev machine, in the repo root (.whl/ is
# git-ignored), and name .whl in `carry`:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# The kernel stages do not need gguf; the script installs .whl/*.whl when present and goes on
# without them otherwise.
#
# What each stage answers (nothing here has run on a GPU yet):
#   env      device kind, jax/jaxlib versions, whether the Pallas Triton backend is present.
#   tests    tests/test_kernels_pallas.py compiled on the GPU (interpret=None -> compiled):
#            does Triton IR -> PTX compile under jax 0.11.2 / CUDA 13, and is it exact?
#   kernels  timing table on the 2B4T shapes (OxI 2560x2560, 640x2560, 6912x2560, 2560x6912)
#            at M=1,8,32,64,512: pallas vs xla_int8 (in-graph unpack) vs xla_int8_dense vs
#            bf16_dot, with a parity flag for pallas.
#   decode   [lead-owned] greedy decode tokens/s, random 2B4T weights, batch 1/8/32/64,
#            bf16 policy with the pallas and xla kernels (f32 at batch 1 and 64).
#   parity   [lead-owned] GPU logits (f32/bf16, pallas/xla) vs the float32 CPU reference.
#   sweep    Pallas block-config sweep, to retune pallas_gpu.default_config.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-/tmp/bitnet_gpu_check}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/tmp/bitnet_pip.log 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    echo '{"bench": "wheels", "status": "installed"}'
  else
    echo "{\"bench\": \"wheels\", \"status\": \"failed\", \"log\": \"$(tail -1 /tmp/bitnet_pip.log | tr -d '"\\')\"}"
  fi
fi

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests kernels decode parity sweep)

# stage NAME LIMIT CMD...: run with a wall limit, tee the log, print a JSON status line.
stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"bench\": \"stage\", \"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ "$rc" = 124 ] && echo true || echo false)}"
}

tests_to_json() {
  python3 - "$OUTDIR/pallas_tests.xml" <<'EOF'
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
      stage env 60 python3 -m benchmarks.bench_gpu env
      ;;
    tests)
      stage tests "${T_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels_pallas.py --junitxml="$OUTDIR/pallas_tests.xml"
      tests_to_json
      ;;
    kernels)
      stage kernels "${T_KERNELS:-150}" python3 -m benchmarks.bench_gpu kernels
      ;;
    decode)
      # TODO(lead): extend once bitnet_jax.runtime.generate lands (see bench_gpu.cmd_decode).
      stage decode "${T_DECODE:-150}" bash -c '
        python3 -m benchmarks.bench_gpu decode --policies bf16 --kernels pallas,xla --batch 1,8,32,64 &&
        python3 -m benchmarks.bench_gpu decode --policies f32 --kernels pallas --batch 1,64'
      ;;
    parity)
      stage parity "${T_PARITY:-60}" python3 -m benchmarks.bench_gpu parity
      ;;
    sweep)
      # bench_gpu stops itself at its budget, 10 s before the stage's wall limit.
      stage sweep "${T_SWEEP:-40}" python3 -m benchmarks.bench_gpu sweep --ms 1,8,64,512 \
        --reps 3 --budget-s "$(( ${T_SWEEP:-40} - 10 ))"
      ;;
    *)
      echo "{\"bench\": \"error\", \"error\": \"unknown stage $s\"}"
      ;;
  esac
done
