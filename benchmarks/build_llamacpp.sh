#!/usr/bin/env bash
# Build llama.cpp's own llama-bench from the source that the llama-cpp-python sdist on PyPI
# vendors (the peer for benchmarks/bench_cpu.py), natively tuned for this CPU.
#   usage: benchmarks/build_llamacpp.sh [BUILD_DIR]   (default: ~/.cache/bitnet_jax/llamacpp)
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${1:-$HOME/.cache/bitnet_jax/llamacpp}"
mkdir -p "$DIR"
cd "$DIR"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON >/dev/null
cmake --build "$DIR/build" --target llama-bench -j "$(nproc)" >/dev/null
echo "$DIR/build/bin/llama-bench"
