#!/usr/bin/env bash
# Installs everything into .venv (CPU torch 2.13, pinned triton, the C++ ops) and runs the test suite:
# pytest with the Triton kernels under the interpreter, then the kernel report: every Triton kernel
# configuration compiled for sm_90a (what the interpreter accepts but a GPU would reject) and the report at
# the benchmark shapes with its target check (tools/kernel_report.py; the CUDA kernels' rows join when
# tools/kernel_report_cuda.py and its toolchain are there).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# GGUF conversions made by the tests stay inside this checkout (build/), not in the user's ~/.cache/lowcost
export LOWCOST_CACHE="${LOWCOST_CACHE:-$PWD/build/lowcost-cache}"
echo "== pytest (TRITON_INTERPRET=1 is set by tests/conftest.py when no GPU is present)"
python -m pytest -q -ra "$@"
echo "== kernel report (Triton $(python -c 'import triton; print(triton.__version__)')): every configuration compiles for sm_90a"
python tools/kernel_report.py --all-configs
echo "== kernel report at the benchmark shapes: the targets of issue #9 (--check)"
python tools/kernel_report.py --check
echo "== kernel report of the dequantizing GEMMs (every weight format; LoRA linear, the fused MLP's down projection, the grouped q/k/v) at the benchmark shapes (--check)"
python tools/kernel_report.py --op qlora_linear --op qlora_gated_mlp --op qlora_grouped_linear --backend triton --check
