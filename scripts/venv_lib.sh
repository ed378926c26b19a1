# Shared by install_cpu.sh and check_cuda_build.sh (sourced): make a venv and install pinned packages
# into it once (a stamp file remembers the pin list).
#   ensure_venv VENV PYTHON STEP_FN      create VENV with PYTHON unless it exists
#   pip_in VENV FAIL_FN WHAT ARGS...     pip install ARGS into VENV, printing its progress (packages collected,
#                                        downloaded, installed); on failure the log's tail, then FAIL_FN
#   pins_installed VENV KEY              true when the pins recorded as KEY were installed into VENV
#   record_pins VENV KEY                 remember that they were
#   build_progress LOG                   stdin → LOG, printing each compile/link step as it starts

ensure_venv() {
  local venv=$1 python=$2
  if [ ! -x "$venv/bin/python" ]; then
    command -v "$python" >/dev/null || { "$3" "$python not found: set PYTHON=/path/to/python (3.10 to 3.12)"; exit 1; }
    "$python" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' \
      || { "$3" "$python is $("$python" --version 2>&1); lowcost needs Python 3.10 to 3.12 (set PYTHON=...)"; exit 1; }
    "$3" "creating $venv with $python ($("$python" --version 2>&1))"
    "$python" -m venv "$venv"
  else
    "$3" "using existing $venv ($("$venv/bin/python" --version))"
  fi
}

pip_in() {
  local venv=$1 fail_fn=$2 what=$3
  shift 3
  local log status
  log=$(mktemp)
  set +o pipefail
  "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | tee "$log" \
    | grep --line-buffered -E '^(Collecting|Downloading|Installing collected|Successfully installed)' \
    | sed -u 's/^/    /'
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    tail -40 "$log"
    "$fail_fn" "$what (full log: $log)"
  fi
  rm -f "$log"
}

build_progress() {
  tee "$1" | sed -nuE \
    -e 's#^ *\[([0-9]+/[0-9]+)\] .* -c (-c )?[^ ]*/((csrc|kernels)/[^ ]+\.(cpp|cu)) .*#    [\1] compiling \3#p' \
    -e 's#^ *(g\+\+|c\+\+|x86_64-linux-gnu-g\+\+) .*-shared .* -o [^ ]*/([^/ ]+\.so)( .*)?$#    linking \2#p'
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
