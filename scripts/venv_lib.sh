# Shared by install_cpu.sh and check_cuda_build.sh (sourced): make a venv and install pinned packages
# into it once (a stamp file remembers the pin list).
#   ensure_venv VENV PYTHON STEP_FN      create VENV with PYTHON unless it exists
#   pip_in VENV FAIL_FN WHAT ARGS...     pip install ARGS into VENV; on failure the log's tail, then FAIL_FN
#   pins_installed VENV KEY              true when the pins recorded as KEY were installed into VENV
#   record_pins VENV KEY                 remember that they were

ensure_venv() {
  local venv=$1 python=$2
  if [ ! -x "$venv/bin/python" ]; then
    "$3" "creating $venv with $python"
    "$python" -m venv "$venv"
  else
    "$3" "using existing $venv ($("$venv/bin/python" --version))"
  fi
}

pip_in() {
  local venv=$1 fail_fn=$2 what=$3
  shift 3
  local log
  log=$(mktemp)
  if ! "$venv/bin/python" -m pip install "$@" >"$log" 2>&1; then
    tail -40 "$log"
    "$fail_fn" "$what (full log: $log)"
  fi
  rm -f "$log"
}

# The venv's bundled pip (23.x) turns an editable install without pyproject.toml into
# `setup.py develop`, which setuptools >= 80 re-runs *with* build isolation (no torch there): pin pip.
PIP_PIN=pip==26.3

pins_installed() {
  [ -f "$1/.lowcost-pins" ] && [ "$(cat "$1/.lowcost-pins")" = "$2" ]
}

record_pins() {
  printf '%s' "$2" > "$1/.lowcost-pins"
}
