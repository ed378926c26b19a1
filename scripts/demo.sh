#!/usr/bin/env bash
# Installs everything into .venv and runs the main job on the embedded default: a frozen model
# fine-tuned with fused LoRA, offline (python -m lowcost.cli.demo --help for options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
. .venv/bin/activate
python -m lowcost.cli.demo "$@"
