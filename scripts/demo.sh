#!/usr/bin/env bash
# The main job: installs everything into .venv (first run: a few minutes; later runs reuse it), then runs
# `lowcost demo`: SmolLM2-135M fine-tuned on real news text twice, PEFT + HF checkpointing vs lowcost,
# offline, with a table of what each cost (lowcost demo --help; e.g. bash scripts/demo.sh --quick).
#   PYTHON=/path/to/python3.x bash scripts/demo.sh     # the interpreter for .venv (default python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/lowcost demo "$@"
