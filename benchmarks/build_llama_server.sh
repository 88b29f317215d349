#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source the llama-cpp-python sdist vendors (a benchmark step, not a test
# dependency). About 10 minutes on 2 cores. Prints the binary's path; LLAMA_DIR overrides where it builds.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${LLAMA_DIR:-.venv/llama.cpp}
BIN="$DIR/build/bin/llama-server"
if [ ! -x "$BIN" ]; then
  mkdir -p "$DIR"
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$src" llama-cpp-python
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  rm -rf "$DIR/src" && mv "$src"/llama_cpp_python-*/vendor/llama.cpp "$DIR/src"
  cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >/dev/null
fi
echo "$BIN"
