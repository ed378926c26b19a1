#!/usr/bin/env bash
# Installs everything into .venv (CPU torch 2.13, pinned triton, the C++ ops) and runs the test suite:
# pytest with the Triton kernels under the interpreter, then the sm_90 ahead-of-time compile of every
# Triton kernel configuration (what the interpreter accepts but a GPU would reject).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== pytest (TRITON_INTERPRET=1 is set by tests/conftest.py when no GPU is present)"
python -m pytest -q -ra "$@"
echo "== Triton ahead-of-time compile check for sm_90"
env -u TRITON_INTERPRET python tools/triton_aot_check.py
