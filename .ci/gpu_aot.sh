#!/usr/bin/env bash
# CI step: compile bitnet_jax for an H100 on a machine without a GPU, and run the gpu_aot tests.
#
# jax >= 0.11 with the CUDA 13 plugin compiles for a compile-only CUDA device built from an XLA
# target description (../shared/data/gpu/*.txtpb beside the checkout, or $BITNET_JAX_GPU_TARGETS), no GPU and no
# NVIDIA libraries needed (../shared/data/README.md §6). jax 0.11 needs Python >= 3.12, so this
# step uses its own venv, .venv312 (git-ignored), created on first use and reused afterwards;
# pip's wheel cache (~/.cache/pip) makes a rebuild cheap, and a fresh machine downloads the wheels.
#
# Usage (repo root): .ci/gpu_aot.sh [extra pytest args]
#   VENV312=DIR       the venv (default .venv312)
#   PYTHON312=EXE     the interpreter that creates it (default: pyenv's 3.12.1, else python3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true  # tests/conftest.py: in CI a gpu_aot test is never skipped
export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1  # the plugin is installed without NVIDIA's libraries
export BITNET_JAX_SKIP_FFI_BUILD=1  # the CPU kernels are not what this step checks

JAX_VERSION=0.11.2
VENV="${VENV312:-.venv312}"
PY="${PYTHON312:-}"
if [ -z "$PY" ]; then
  if command -v pyenv >/dev/null && pyenv prefix 3.12.1 >/dev/null 2>&1; then
    PY="$(pyenv prefix 3.12.1)/bin/python3.12"
  else
    PY=python3.12
  fi
fi

stamp="$VENV/.bitnet-gpu-aot-$JAX_VERSION"
if [ ! -f "$stamp" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/pip" install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" setuptools wheel
  # --no-deps: the plugin's NVIDIA runtime wheels (several GB) are only needed to run on a GPU.
  "$VENV/bin/pip" install -q --no-deps "jax-cuda13-plugin==$JAX_VERSION" \
    "jax-cuda13-pjrt==$JAX_VERSION"
  # The package's own pure-Python deps and the test runner (pyproject.toml: dependencies).
  "$VENV/bin/pip" install -q "numpy>=1.26" "ml_dtypes>=0.4" "sentencepiece>=0.2" \
    "tokenizers>=0.20" "tiktoken>=0.7" "jinja2>=3.1" "tqdm>=4.60" "pytest>=8" \
    "pytest-timeout>=2.3" packaging
  touch "$stamp"
fi
# Re-installed every run (seconds): the checkout may have moved since the venv was made.
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .

"$VENV/bin/python" -m pytest -q -m gpu_aot -p no:cacheprovider tests/test_gpu_aot.py \
  tests/test_gpu_aot_fused.py "$@"
