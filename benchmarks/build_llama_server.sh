#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source the llama-cpp-python sdist vendors (a benchmark step, not a test
# dependency). About 10 minutes on 2 cores. Prints the binary's path; LLAMA_DIR overrides where it builds.
#
# AMX is compiled out on purpose. With GGML_NATIVE=ON on an AMX CPU (Sapphire Rapids and later), -march=native
# defines __AMX_INT8__ and ggml builds its AMX matmul backend. GCC 12's _tile_loadconfig() tells the compiler it
# reads only 8 bytes of the 64-byte tile config, so the compiler drops the rows/colsb stores in ggml's
# ggml_tile_config_init(). The tiles then get loaded with a zero-sized config, and llama-server crashes on the
# first matmul (the warmup, right after "llama threadpool init"): SIGILL on tilezero or SIGSEGV in
# ggml_backend_amx_mul_mat, seen as exit 139. The -mno-amx-* flags win over -march=native whatever their order,
# so the rest of the native ISA (AVX-512, VNNI, BF16) stays on. They do nothing on CPUs without AMX.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${LLAMA_DIR:-.venv/llama.cpp}
BIN="$DIR/build/bin/llama-server"
NO_AMX=""
if echo 'int main(){}' | "${CXX:-c++}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c++ -fsyntax-only - 2>/dev/null; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
FLAGS="-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF"
STAMP="$DIR/build/lmgen-build-flags"
# An older build (other flags, e.g. one with AMX in it) counts as missing and is rebuilt from scratch.
if [ ! -x "$BIN" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$FLAGS $NO_AMX" ]; then
  rm -rf "$DIR/build"
  mkdir -p "$DIR"
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$src" llama-cpp-python
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  rm -rf "$DIR/src" && mv "$src"/llama_cpp_python-*/vendor/llama.cpp "$DIR/src"
  # shellcheck disable=SC2086  # FLAGS is a list of words
  cmake -S "$DIR/src" -B "$DIR/build" $FLAGS -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >/dev/null
  cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >/dev/null
  echo "$FLAGS $NO_AMX" >"$STAMP"
fi
echo "$BIN"
