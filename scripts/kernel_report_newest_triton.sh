#!/usr/bin/env bash
# The kernel report with the newest Triton that pip offers (issue #9), next to the pinned 3.6.0 of .venv:
# a small venv .venv-triton-new (CPU torch 2.13.0 + unpinned triton, upgraded on every run) in which every
# Triton kernel configuration must compile for sm_90a and the targets must hold at the benchmark shapes.
# The Triton version it got is printed first.
#
#   bash scripts/kernel_report_newest_triton.sh        # PYTHON=python3.11 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-triton-new
step() { printf '[newest-triton] %s\n' "$*"; }
fail() { printf '[newest-triton] FAILED: %s\n' "$*" >&2; exit 1; }

. scripts/venv_lib.sh
ensure_venv "$VENV" "${PYTHON:-python3.11}" step
pip_in "$VENV" fail "pip install of torch 2.13.0 and the newest triton" --upgrade torch==2.13.0 triton numpy
step "Triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)') (the newest pip offers)"
# Triton 3.9 warns when this is unset; 1 keeps the FMA contraction every earlier version applies.
export TRITON_DEFAULT_FP_FUSION=1
"$VENV/bin/python" tools/kernel_report.py --all-configs
"$VENV/bin/python" tools/kernel_report.py --backend triton --check
"$VENV/bin/python" tools/kernel_report.py --op qlora_linear --op qlora_gated_mlp --op qlora_grouped_linear --backend triton --check
