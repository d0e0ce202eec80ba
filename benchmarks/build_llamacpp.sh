#!/usr/bin/env bash
# Build llama.cpp's own llama-bench, llama-batched-bench and llama-server from the source that
# the llama-cpp-python sdist on PyPI vendors (the peers for benchmarks/bench_cpu.py and the
# serving benchmarks), natively tuned for this CPU.
#   usage: benchmarks/build_llamacpp.sh [BUILD_DIR]   (default: ~/.cache/bitnet_jax/llamacpp)
#   LLAMA_TARGETS="llama-bench" limits the targets (default: all three).
# In that llama.cpp version (0.3.36 vendors the tools/ layout) llama-server sits behind
# LLAMA_BUILD_SERVER inside LLAMA_BUILD_TOOLS, and its web UI assets come from npm or a
# Hugging Face download; both are off here (no network in the build), so the server embeds an
# empty asset table and serves the HTTP API only.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${1:-$HOME/.cache/bitnet_jax/llamacpp}"
TARGETS="${LLAMA_TARGETS:-llama-bench llama-batched-bench llama-server}"
mkdir -p "$DIR"
cd "$DIR"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
LOG="$DIR/build.log"
# Compiler output goes to $LOG (thousands of lines of GCC 12 AVX-512 header warnings); on a
# failure its tail is printed.
fail() { tail -n 40 "$LOG" >&2; echo "llama.cpp build failed; full log: $LOG" >&2; exit 1; }
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF >"$LOG" 2>&1 || fail
# shellcheck disable=SC2086  # TARGETS is a word list on purpose
cmake --build "$DIR/build" --target $TARGETS -j "$(nproc)" >>"$LOG" 2>&1 || fail
for t in $TARGETS; do echo "$DIR/build/bin/$t"; done
