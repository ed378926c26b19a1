#!/usr/bin/env bash
# Compile-and-link check of the CUDA build of lowcost._C on a host without a GPU.
#
# Creates (if missing) .venv-cu with a CUDA build of torch, builds lowcost with LOWCOST_BUILD_CUDA=1
# (a normal, non-editable install into .venv-cu; objects under build/cuda, apart from the CPU build),
# imports lowcost._C outside the source tree and checks that every op has a CUDA kernel registered,
# without running any. Then compiles the kernels for sm_90a and checks the kernel report's CUDA targets
# at the benchmark shapes (tools/kernel_report_cuda.py --check: HMMA in the skinny kernels and the
# dequantizing GEMMs of every quantized format, no atomics, no spills, >= 2 blocks per SM). Fails loudly (non-zero exit, compiler errors printed) if anything
# does not compile, link or register, or a target is missed.
#
#   bash scripts/check_cuda_build.sh        # CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PYTHON=${PYTHON:-python3.11}
VENV=.venv-cu
step() { printf '[check_cuda_build] %s\n' "$*"; }
fail() { printf '[check_cuda_build] FAILED: %s\n' "$*" >&2; exit 1; }

PINS=(torch==2.14.1 ninja==1.13.2 pybind11==3.1.0 setuptools==84.2.1 wheel==0.48.0 numpy==2.4.6)

. scripts/venv_lib.sh
ensure_venv "$VENV" "$PYTHON" step
if pins_installed "$VENV" "${PINS[*]}"; then
  step "pinned packages already installed"
else
  step "installing ${PINS[*]} (CUDA torch, several GB on first run)"
  pip_in "$VENV" fail "upgrading pip" "$PIP_PIN"
  pip_in "$VENV" fail "pip install of the pinned packages" "${PINS[@]}"
  record_pins "$VENV" "${PINS[*]}"
fi
cuda_version=$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')
[ -n "$cuda_version" ] || fail "torch in $VENV is not a CUDA build"

if [ -z "${CUDA_HOME:-}" ]; then
  command -v nvcc >/dev/null || fail "nvcc not found and CUDA_HOME not set"
  # nvcc on PATH may be a wrapper script: ask nvcc for its real toolkit root.
  top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$top" ] || fail "could not derive CUDA_HOME from nvcc --dryrun"
  CUDA_HOME=$(readlink -f "$top")
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export LOWCOST_BUILD_CUDA=1
export LOWCOST_BUILD_BASE=build/cuda
step "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') (CUDA $cuda_version), CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

step "building lowcost with the CUDA kernels"
log=$ROOT/build/check_cuda_build.log
mkdir -p "$ROOT/build"
if ! "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . >"$log" 2>&1; then
  grep -nE "error|Error|FAILED" "$log" | grep -v "^.*-Werror" | head -60 || true
  tail -30 "$log"
  fail "the CUDA build did not compile or link (full log: $log)"
fi
grep -q "building lowcost._C with CUDA" "$log" || fail "setup.py did not take the CUDA path (see $log)"

step "importing lowcost._C (outside the source tree) and checking the CUDA kernels are registered"
cd "$(mktemp -d)"
"$ROOT/$VENV/bin/python" - <<'PY'
import torch
import lowcost._C as ext

print(f"  lowcost._C: {ext.__file__}")
assert ext.WITH_CUDA == 1, "lowcost._C was built without the CUDA kernels"
ops = ["philox_dropout", "lora_down", "lora_up", "lora_grad_pass", "lora_dx_da",
       "lora_down_grouped",                          # the grouped linear's forward with dropout (issue #12)
       "lora_dx_da_grouped",                         # ... and its backward's low-rank terms with dropout
       "gated_act_mul", "gated_act_mul_backward",   # the fused MLP's elementwise steps (issue #12)
       "softmax_xent_rows"]                          # the fused linear cross-entropy's row pass (issue #12)
cuda_only = ["dequant_gemm", "dequant_gemm_dgrad"]  # the quantized base GEMMs (issue #13): no CPU kernel
missing = [(op, key) for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lowcost::{op}", key)]
missing += [(op, "CUDA") for op in cuda_only
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lowcost::{op}", "CUDA")]
assert not missing, f"kernels not registered: {missing}"
print(f"  {len(ops)} ops with CPU and CUDA kernels, {len(cuda_only)} with CUDA kernels; "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}")
try:
    import lowcost.kernels  # noqa: F401  top-level kernels/ installed as lowcost.kernels
    print("  lowcost.kernels imports from the installed package")
except ImportError as error:
    raise SystemExit(f"lowcost.kernels is not importable from the installed package: {error}")
PY

step "kernel report of the CUDA kernels at the benchmark shapes (sm_90a, tools/kernel_report_cuda.py --check)"
cd "$ROOT"
LOWCOST_CUDA_VENV="$ROOT/$VENV" "$VENV/bin/python" tools/kernel_report_cuda.py --check \
  || fail "the CUDA kernels miss a kernel-report target or did not compile for sm_90a (see above)"
step "OK"
