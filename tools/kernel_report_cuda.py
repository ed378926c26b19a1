"""The CUDA half of the kernel report: the launches of the ``cuda`` backend, compiled for sm_90a, no GPU needed.

    python tools/kernel_report_cuda.py --shape 8192,4096,4096,16 --dtype bf16 --dropout 0.05 [--quant nf4] [--json]
                                       [--check]

``cuda_kernel_rows(M, K, N, r, dtype, dropout, arch)`` (imported by tools/kernel_report.py) returns one dict per
kernel launch of a fused LoRA forward + backward on the ``cuda`` backend (lora_down, lora_up, lora_grad_pass,
lora_dx_da, and sum_partials after each op that split a reduction; the two cuBLAS GEMMs are not ours; with
``quant`` (nf4, nf4-dq, int8, q8_0, q4_0, q4_1, q4_k, q6_k) the base GEMMs on a quantized weight are ours, dequant_gemm and
dequant_gemm_dgrad, which decode the W tile into shared memory before the MMA, and are listed), with the
keys kernel, backend, role, grid (blocks), persistent, regs, spills (bytes stored + loaded), smem (static +
dynamic bytes per block), ctas_per_sm and limiter (sm_90: registers, shared memory, threads, blocks), mma
(wgmma | mma.sync | none, from HGMMA / HMMA in the SASS), tma (UTMALDG), atomics (RED/ATOM instructions) and
barriers (BAR instructions).

Where each figure comes from:
  * the launches: csrc/tools/print_launch_plan.cpp prints the plans of csrc/cuda/launch_plan.h, the same
    functions csrc/cuda/host_launchers.h launches with (template instantiation, grid, dynamic shared memory);
  * the resources: every csrc/cuda/*.cu compiled with ``nvcc -cubin -arch=<arch> -Xptxas -v`` against the CUDA
    build of torch in .venv-cu (scripts/check_cuda_build.sh makes it; or $LOWCOST_CUDA_VENV), ptxas's report
    for registers, spills and static shared memory, ``cuobjdump -sass`` for the instruction counts.
The dropout probability selects no different kernel (the mask is a runtime branch of the same kernels); it is
accepted so the rows line up with the Triton report. Compiles are cached by the sources' hash in
$LOWCOST_CACHE/kernel_report_cuda (default ~/.cache/lowcost). Missing tools or headers raise RuntimeError
naming what is missing.

``gated_act_rows(M, I, dtype, act)`` lists the fused gated MLP's own launches on the ``cuda`` backend (issue #12,
lowcost/ops/_cuda_gated_mlp.py; its three projections are the LoRA-linear launches above): gated_act_mul in the
forward, gated_act_mul again (h recomputed) and gated_act_mul_backward in the backward. Elementwise and
memory-bound, so their targets are 0 spills and no local memory (LDL/STL in the SASS), no atomics, and no MMA.

``xent_rows_rows(C, V, dtype)`` lists the fused linear cross-entropy's row pass on the ``cuda`` backend (issue #12,
lowcost/ops/linear_cross_entropy.py; its GEMMs are torch's): softmax_xent_rows over one chunk of C rows of V logits,
without and with dz: one launch per row pass when the rows fill the GPU, else a partials launch and a finish launch
with each row's pieces (8192 columns) split over S blocks (csrc/cuda/launch_plan.h's plan_xent_rows). A reduction
over V per row, in registers and a shared-memory tree: targets 0 spills, no local memory, no atomics, no MMA, and
every launch that streams the logits fills the GPU: >= min(C x pieces, 8 x 132) blocks (8 blocks of 256 threads are
an SM's 2048 threads; 1056 blocks for the default chunk of a 132-SM GPU, 264 rows of 128,256 logits: 4 per row).
The loss-only finish launch reads no logits (it folds each row's partials) and runs one block per row.

``grouped_down_rows(M, K, ranks, dtype)`` lists the grouped q/k/v linear's forward lora_down with dropout on the
``cuda`` backend (issue #12, lowcost/ops/_cuda_grouped_linear.py; the rest of its launches are the LoRA-linear ones
above, per projection): lora_down_grouped over one x for projections of the given ranks (each x tile staged once,
masked per projection into a second tile), then sum_partials when K is split. A skinny GEMM like lora_down: the
targets of the skinny kernels (HMMA for bf16/fp16, 0 spills, no atomics, >= 2 x 132 blocks at M >= 8192).
``grouped_dx_da_rows(M, K, ranks, dtype)`` lists its backward's low-rank terms with dropout: lora_dx_da_grouped
over one x (each x tile staged once, masked per projection; t = the fp32 sum of the D_i (du_i A_i), the dA_i
accumulated in shared memory across row tiles), then sum_partials when rows are cut into segments; the same targets.

``--check`` asserts the CUDA targets of issue #9 on the rows: HMMA in the skinny kernels' and the dequantizing
GEMMs' SASS (bf16/fp16), no atomic or reduction instruction in any kernel, 0 spills, and at least 2 x 132
blocks per launch at M >= 8192; by default on the dense weight and on each quantized format the CUDA tile
decodes (issue #13), and on the grouped lora_down and lora_dx_da at M, K = 8192, 4096 for ranks 16,16,16 and
64,64,64.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_SMS = 132  # H100/H200 SXM
SM90 = {"regs": 65536, "reg_unit": 256, "quadrants": 4, "threads": 2048, "blocks": 32, "smem": 233472,
        "smem_block": 232448, "smem_reserved": 1024}
DTYPES = ("bf16", "fp16", "fp32")
SKINNY = ("lora_down", "lora_up", "lora_grad_pass", "lora_dx_da", "lora_down_grouped", "lora_dx_da_grouped")
GROUPED_DOWN_CHECK_RANKS = ((16, 16, 16), (64, 64, 64))   # q/k/v at the benchmark rank, and at the largest rank tile
MAX_GROUPED_DOWN = 8                                       # lowcost._C's kMaxGroupedProjections
MAX_GROUPED_DX_DA_ROWS = 256                               # lowcost._C's kMaxGroupedDxDaRows (r_i rounded up to 16)
DEQUANT = ("dequant_gemm", "dequant_gemm_dgrad")
ELEMENTWISE = ("gated_act_mul", "gated_act_mul_backward")     # the fused MLP's steps between its projections
XENT = ("softmax_xent_rows",)                                  # the fused linear cross-entropy's row pass
XENT_CHECK_SHAPE = (264, 128256)   # the cuda backend's default chunk on a 132-SM GPU at Llama-3's vocabulary
XENT_PIECE_GROUPS = 2048           # csrc/xent_rows.h's kXentPieceGroups (groups of 4 logits per piece)
XENT_BLOCKS_PER_SM = 8             # csrc/cuda/launch_plan.h's kXentBlocksPerSm (the SM's 2048 threads)
GATED_ACTS = ("silu", "gelu_tanh", "gelu")                       # lowcost.reference.lora_gated_mlp.ACTIVATIONS
QUANT_FORMATS = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")  # _quant_backends.CUDA_FORMATS
KEYS = ("kernel", "backend", "role", "grid", "persistent", "regs", "spills", "smem", "ctas_per_sm", "limiter", "mma",
        "tma", "atomics", "barriers")


# ---------------------------------------------------------------------------------------------- toolchain
def _cuda_site_packages() -> str:
    """site-packages of a Python environment with a CUDA build of torch (.venv-cu, or $LOWCOST_CUDA_VENV)."""
    venv = os.environ.get("LOWCOST_CUDA_VENV", os.path.join(REPO, ".venv-cu"))
    found = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages")))
    for site in found:
        if glob.glob(os.path.join(site, "torch", "include", "c10", "cuda", "impl", "cuda_cmake_macros.h")):
            return site
    raise RuntimeError(f"no CUDA build of torch in {venv} (needed for its CUDA headers); run "
                       "`bash scripts/check_cuda_build.sh` to create .venv-cu, or set LOWCOST_CUDA_VENV")


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc") or "")
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("nvcc not found: install the CUDA toolkit (>= 12.0 for sm_90a) or set CUDA_HOME")


def _tool(name: str, site: str) -> str:
    """cuobjdump from the toolkit, or the copy Triton bundles (triton/backends/nvidia/bin)."""
    nvcc_bin = os.path.dirname(os.path.realpath(_nvcc()))
    for path in (os.path.join(nvcc_bin, name), os.path.join(site, "triton", "backends", "nvidia", "bin", name),
                 shutil.which(name) or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} not found next to nvcc, in Triton's bundled tools ({site}/triton/backends/nvidia/bin) "
                       "or on PATH")


def _demangler() -> str:
    for name in ("c++filt", "cu++filt"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("c++filt (binutils) or cu++filt not found: needed to read the kernels' names")


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{tail}")
    return done


# ---------------------------------------------------------------------------------------------- launches
def _cache_dir() -> str:
    return os.path.join(os.environ.get("LOWCOST_CACHE", os.path.expanduser("~/.cache/lowcost")), "kernel_report_cuda")


def _plan_printer() -> str:
    """csrc/tools/print_launch_plan.cpp built once per version of it and of the headers it includes (cached)."""
    sources = [os.path.join(REPO, "csrc", "tools", "print_launch_plan.cpp"),
               os.path.join(REPO, "csrc", "cuda", "launch_plan.h"), os.path.join(REPO, "csrc", "xent_rows.h"),
               os.path.join(REPO, "csrc", "host_device.h")]
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    exe = os.path.join(_cache_dir(), f"print_launch_plan-{digest.hexdigest()[:16]}")
    if not os.path.exists(exe):
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("no host C++ compiler (c++, g++ or clang++) to build csrc/tools/print_launch_plan.cpp")
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp = f"{exe}.{os.getpid()}.tmp"
        _run([cxx, "-std=c++17", "-O1", "-o", tmp, sources[0]], "building the launch-plan printer")
        os.replace(tmp, exe)
    return exe


def launches(M: int, K: int, N: int, r: int, dtype: str, adapter_dtype: str | None = None, sms: int = SM90_SMS,
             bias: bool = False, quant: str | None = None) -> list[dict]:
    """The launches host_launchers.h (and, with ``quant``, dequant_launchers.h) make for one forward + backward
    (from csrc/cuda/launch_plan.h)."""
    extra = [quant] if quant else []
    done = _run([_plan_printer(), str(M), str(K), str(N), str(r), dtype, adapter_dtype or dtype, str(sms),
                 "1" if bias else "0", *extra], "printing the launch plan")
    return json.loads(done.stdout)


def gated_act_launches(M: int, I: int, dtype: str, act: str, sms: int = SM90_SMS) -> list[dict]:
    """The elementwise launches of one fused-MLP forward + backward on the cuda backend (csrc/cuda/launch_plan.h)."""
    done = _run([_plan_printer(), "gated_act", str(M), str(I), dtype, act, str(sms)], "printing the launch plan")
    return json.loads(done.stdout)


def xent_rows_launches(C: int, V: int, dtype: str, sms: int = SM90_SMS) -> list[dict]:
    """The row-pass launches of one logits chunk (C, V) on the cuda backend (csrc/cuda/launch_plan.h)."""
    done = _run([_plan_printer(), "xent_rows", str(C), str(V), dtype, str(sms)], "printing the launch plan")
    return json.loads(done.stdout)


def grouped_down_launches(M: int, K: int, ranks: tuple[int, ...], dtype: str, adapter_dtype: str | None = None,
                          sms: int = SM90_SMS) -> list[dict]:
    """The launches of one lora_down_grouped over x (M, K) for projections of ``ranks`` (csrc/cuda/launch_plan.h)."""
    done = _run([_plan_printer(), "down_grouped", str(M), str(K), dtype, adapter_dtype or dtype, str(sms),
                 ",".join(str(r) for r in ranks)], "printing the launch plan")
    return json.loads(done.stdout)


def grouped_dx_da_launches(M: int, K: int, ranks: tuple[int, ...], dtype: str, adapter_dtype: str | None = None,
                           sms: int = SM90_SMS) -> list[dict]:
    """The launches of one lora_dx_da_grouped over x (M, K) for projections of ``ranks`` (csrc/cuda/launch_plan.h)."""
    done = _run([_plan_printer(), "dx_da_grouped", str(M), str(K), dtype, adapter_dtype or dtype, str(sms),
                 ",".join(str(r) for r in ranks)], "printing the launch plan")
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------- compile
def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))


def _cache_key(arch: str, nvcc: str, site: str) -> str:
    digest = hashlib.sha256()
    # The kernels include csrc/*.h (philox, checks, dispatch, the gated-activation and row-pass math) as well.
    files = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*")) + glob.glob(os.path.join(REPO, "csrc", "*.h"))
                   + [os.path.abspath(__file__)])
    for path in files:
        with open(path, "rb") as handle:
            digest.update(os.path.basename(path).encode() + b"\0" + handle.read())
    version = _run([nvcc, "--version"], "nvcc --version").stdout
    digest.update(f"{arch}\0{version}\0{site}".encode())
    return digest.hexdigest()[:24]


_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _ptxas_resources(log: str) -> dict[str, dict]:
    """Per mangled kernel: registers, spill bytes (stores + loads), static shared memory, from ptxas -v."""
    out, current = {}, None
    for line in log.splitlines():
        match = _FUNCTION.search(line)
        if match:
            current = out.setdefault(match.group(1), {"regs": 0, "spills": 0, "static_smem": 0})
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spills"] = int(spills.group(1)) + int(spills.group(2))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            current["regs"] = int(regs.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(smem.group(1)) if smem else 0
    return out


def _sass_counts(sass: str) -> dict[str, Counter]:
    """Per mangled kernel: counts of SASS opcodes (without modifiers)."""
    out, current = {}, None
    for line in sass.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = out.setdefault(match.group(1), Counter())
        elif current is not None:
            op = _SASS_OP.search(line)
            if op:
                current[op.group(1)] += 1
    return out


def _compile_one(source: str, arch: str, nvcc: str, site: str, workdir: str) -> tuple[str, str]:
    includes = [os.path.join(site, "torch", "include"), os.path.join(site, "torch", "include", "torch", "csrc", "api",
                                                                       "include")]
    includes += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    cubin = os.path.join(workdir, os.path.basename(source) + ".cubin")
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
           "-DLOWCOST_WITH_CUDA", *(f"-I{d}" for d in includes), "-o", cubin, source]
    log = _run(cmd, f"compiling {os.path.relpath(source, REPO)} for {arch}")
    sass = _run([_tool("cuobjdump", site), "-sass", cubin], "cuobjdump -sass").stdout
    return log.stdout + log.stderr, sass


def kernel_resources(arch: str = "sm_90a") -> dict[str, dict]:
    """Per demangled kernel name (no parameters): regs, spills, static_smem and SASS opcode counts of every kernel
    in csrc/cuda/*.cu compiled for ``arch`` (cached by the sources' hash)."""
    site, nvcc = _cuda_site_packages(), _nvcc()
    cache_dir = _cache_dir()
    cache = os.path.join(cache_dir, f"{_cache_key(arch, nvcc, site)}.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as handle:
            return json.load(handle)
    mangled = {}
    with tempfile.TemporaryDirectory(prefix="lowcost-cubin-") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, min(len(_sources()), os.cpu_count() or 1))) as pool:
        compiled = pool.map(lambda source: _compile_one(source, arch, nvcc, site, tmp), _sources())
        for log, sass in compiled:
            counts = _sass_counts(sass)
            for name, res in _ptxas_resources(log).items():
                mangled[name] = {**res, "ops": dict(counts.get(name, Counter()))}
    demangled = subprocess.run([_demangler()], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout
    result = {}
    for name, plain in zip(mangled, demangled.splitlines()):
        key = plain.strip()
        key = key[len("void "):] if key.startswith("void ") else key
        result[key.split("(")[0]] = mangled[name]
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    os.replace(tmp_path, cache)
    return result


# ---------------------------------------------------------------------------------------------- rows
def occupancy(regs: int, threads: int, smem: int) -> tuple[int, str]:
    """(blocks per SM, what limits them) on sm_90 for a block of ``threads`` threads."""
    warps = threads // 32
    regs_per_warp = -(-max(regs, 1) * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    warps_by_regs = SM90["quadrants"] * (SM90["regs"] // SM90["quadrants"] // regs_per_warp)
    limits = {"regs": warps_by_regs // warps, "threads": SM90["threads"] // threads, "blocks": SM90["blocks"]}
    if smem > 0:
        limits["smem"] = 0 if smem > SM90["smem_block"] else SM90["smem"] // (smem + SM90["smem_reserved"])
    order = ("regs", "smem", "threads", "blocks")
    limiter = min(limits, key=lambda k: (limits[k], order.index(k)))
    return limits[limiter], limiter


def _mma_kind(ops: dict) -> str:
    return "wgmma" if ops.get("HGMMA") else ("mma.sync" if ops.get("HMMA") else "none")


def _short(kernel: str) -> str:
    return kernel.replace("lowcost::cuda::", "").replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16") \
        .replace("float", "fp32")


def launch_rows(M: int, K: int, N: int, r: int, dtype: str, dropout: float = 0.0, arch: str = "sm_90a",
                adapter_dtype: str | None = None, bias: bool = False, quant: str | None = None) -> list[dict]:
    """cuda_kernel_rows plus ``op``, ``grid_dims``, ``config`` (what the launch plan chose) and ``local`` (LDL/STL
    instructions in the kernel's SASS)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if arch not in ("sm_90", "sm_90a"):
        raise ValueError(f"arch must be sm_90 or sm_90a (the occupancy limits are sm_90's), got {arch!r}")
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(f"quant must be one of {QUANT_FORMATS} (the formats with a CUDA tile), got {quant!r}")
    resources = kernel_resources(arch)
    return [_launch_row(launch, resources) for launch in launches(M, K, N, r, dtype, adapter_dtype, SM90_SMS, bias,
                                                                   quant)]


def _launch_row(launch: dict, resources: dict[str, dict]) -> dict:
    """One report row: a planned launch joined with its kernel's compiled resources."""
    res = resources.get(launch["kernel"])
    if res is None:
        raise RuntimeError(f"{launch['kernel']} is launched but was not found in the compiled csrc/cuda/*.cu")
    ops = res["ops"]
    smem = res["static_smem"] + launch["smem"]
    ctas, limiter = occupancy(res["regs"], launch["threads"], smem)
    grid = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    return {"kernel": _short(launch["kernel"]), "backend": "cuda", "role": "pass", "grid": grid,
            "persistent": False, "regs": res["regs"], "spills": res["spills"], "smem": smem,
            "ctas_per_sm": ctas, "limiter": limiter, "mma": _mma_kind(ops), "tma": ops.get("UTMALDG", 0) > 0,
            "atomics": sum(ops.get(op, 0) for op in ("RED", "REDG", "ATOM", "ATOMG", "ATOMS")),
            "barriers": ops.get("BAR", 0), "op": launch["op"], "grid_dims": launch["grid"],
            "config": launch["config"], "local": ops.get("LDL", 0) + ops.get("STL", 0)}


def gated_act_rows(M: int, I: int, dtype: str, act: str = "silu", arch: str = "sm_90a") -> list[dict]:
    """Rows (as ``launch_rows``) of the fused gated MLP's elementwise launches: gate and up (M, I), ``act``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if act not in GATED_ACTS:
        raise ValueError(f"act must be one of {GATED_ACTS}, got {act!r}")
    resources = kernel_resources(arch)
    return [_launch_row(launch, resources) for launch in gated_act_launches(M, I, dtype, act)]


def xent_rows_rows(C: int, V: int, dtype: str, arch: str = "sm_90a") -> list[dict]:
    """Rows (as ``launch_rows``) of the fused linear cross-entropy's row pass over a (C, V) logits chunk."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if C < 1 or V < 1:
        raise ValueError(f"C and V must be >= 1, got C={C}, V={V}")
    resources = kernel_resources(arch)
    return [_launch_row(launch, resources) for launch in xent_rows_launches(C, V, dtype)]


def grouped_down_rows(M: int, K: int, ranks: tuple[int, ...], dtype: str, arch: str = "sm_90a") -> list[dict]:
    """Rows (as ``launch_rows``) of the grouped linear's forward lora_down_grouped over x (M, K), ranks r_0, r_1, …"""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 1 <= len(ranks) <= MAX_GROUPED_DOWN or min(ranks) < 0 or sum(ranks) < 1:
        raise ValueError(f"ranks must be 1 to {MAX_GROUPED_DOWN} integers >= 0, not all 0, got {ranks}")
    resources = kernel_resources(arch)
    return [_launch_row(launch, resources) for launch in grouped_down_launches(M, K, tuple(ranks), dtype)]


def grouped_dx_da_rows(M: int, K: int, ranks: tuple[int, ...], dtype: str, arch: str = "sm_90a") -> list[dict]:
    """Rows (as ``launch_rows``) of the grouped linear's backward lora_dx_da_grouped over x (M, K), ranks r_0, …"""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 1 <= len(ranks) <= MAX_GROUPED_DOWN or min(ranks) < 0 or sum(ranks) < 1:
        raise ValueError(f"ranks must be 1 to {MAX_GROUPED_DOWN} integers >= 0, not all 0, got {ranks}")
    if sum(-(-r // 16) * 16 for r in ranks) > MAX_GROUPED_DX_DA_ROWS:
        raise ValueError(f"ranks rounded up to 16 must sum to at most {MAX_GROUPED_DX_DA_ROWS}, got {ranks}")
    resources = kernel_resources(arch)
    return [_launch_row(launch, resources) for launch in grouped_dx_da_launches(M, K, tuple(ranks), dtype)]


def check_xent_rows(rows: list[dict], C: int, V: int) -> list[str]:
    """The row pass's targets: those of check_rows, no MMA, and every launch that streams the logits (all but the
    loss-only fold) at least min(C x pieces, XENT_BLOCKS_PER_SM x 132) blocks."""
    failures = check_rows(rows, C, "fp32")
    want = min(C * xent_pieces(V), XENT_BLOCKS_PER_SM * SM90_SMS)
    for row in rows:
        if row["mma"] != "none":
            failures.append(f"{row['kernel']}: {row['mma']} in the SASS (target: none, a reduction)")
        streams = not row["kernel"].startswith("xent_finish_kernel") or row["kernel"].endswith("true>")
        if streams and row["grid"] < want:
            failures.append(f"{row['kernel']} [{row['config']}]: {row['grid']} blocks for {C} rows of V={V} "
                            f"(target >= {want})")
    return failures


def xent_pieces(V: int) -> int:
    """Pieces of a row of V logits (csrc/xent_rows.h's xent_pieces: groups of 4 columns, XENT_PIECE_GROUPS each)."""
    groups = -(-V // 4)
    return max(1, -(-groups // XENT_PIECE_GROUPS))


def cuda_kernel_rows(M: int, K: int, N: int, r: int, dtype: str, dropout: float, arch: str) -> list[dict]:
    """One dict per CUDA kernel launch of a fused LoRA forward + backward (keys: see the module docstring)."""
    return [{k: row[k] for k in KEYS} for row in launch_rows(M, K, N, r, dtype, dropout, arch)]


# ---------------------------------------------------------------------------------------------- check
def check_rows(rows: list[dict], M: int, dtype: str) -> list[str]:
    """The issue's CUDA targets, as failure messages (empty when all hold)."""
    failures = []
    for row in rows:
        name = f"{row['kernel']} [{row['config']}]"
        if row["spills"]:
            failures.append(f"{name}: {row['spills']} bytes of spills (target 0)")
        if row["atomics"]:
            failures.append(f"{name}: {row['atomics']} atomic/reduction instructions (target 0: deterministic sums)")
        if row["op"] in SKINNY + DEQUANT and dtype != "fp32" and row["mma"] == "none":
            failures.append(f"{name}: no HMMA/HGMMA in the SASS (target: tensor cores for {dtype})")
        if row["op"] in ELEMENTWISE + XENT and row.get("local"):
            failures.append(f"{name}: {row['local']} local-memory instructions (target 0: elementwise in registers)")
        if M >= 8192 and not row["persistent"] and row["grid"] < 2 * SM90_SMS:
            failures.append(f"{name}: {row['grid']} blocks at M={M} (target >= {2 * SM90_SMS})")
    return failures


# ---------------------------------------------------------------------------------------------- CLI
def format_table(rows: list[dict]) -> str:
    header = ("kernel", "config", "grid", "regs", "spills", "smem KiB", "CTAs/SM (limit)", "MMA", "TMA", "atomics",
              "barriers")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        dims = "x".join(str(d) for d in row["grid_dims"])
        cells = (row["kernel"], row["config"], f"{row['grid']} ({dims})", row["regs"], row["spills"],
                 f"{row['smem'] / 1024:.1f}", f"{row['ctas_per_sm']} ({row['limiter']})", row["mma"],
                 "yes" if row["tma"] else "no", row["atomics"], row["barriers"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be M,K,N,r with positive integers, got {text!r}")
    return values


def _ranks(text: str, option: str = "--grouped-down") -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= MAX_GROUPED_DOWN or min(values) < 0 or sum(values) < 1:
        raise argparse.ArgumentTypeError(f"{option} must be 1 to {MAX_GROUPED_DOWN} ranks r_0,r_1,... (integers "
                                         f">= 0, not all 0), got {text!r}")
    return values


def _dx_da_ranks(text: str) -> tuple[int, ...]:
    values = _ranks(text, "--grouped-dx-da")
    if sum(-(-r // 16) * 16 for r in values) > MAX_GROUPED_DX_DA_ROWS:
        raise argparse.ArgumentTypeError(f"--grouped-dx-da ranks rounded up to 16 must sum to at most "
                                         f"{MAX_GROUPED_DX_DA_ROWS}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, action="append",
                        help="M,K,N,r (repeatable; default with --check: 8192,4096,4096,16 and 8192,4096,14336,16)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--dropout", type=float, action="append", help="repeatable; default 0.05 (with --check: 0 "
                        "and 0.05)")
    parser.add_argument("--quant", action="append", choices=("none",) + QUANT_FORMATS,
                        help="repeatable: the weight's format ('none': dense, cuBLAS base GEMMs); default: none, and "
                        "with --check also each quantized format")
    parser.add_argument("--mlp-act", action="append", choices=GATED_ACTS,
                        help="repeatable: also list the fused gated MLP's elementwise launches for this activation, "
                        "at M,I = the shape's M and N (default with --check: each activation, at M=8192, I=14336)")
    parser.add_argument("--xent", action="append", type=int, nargs=2, metavar=("C", "V"),
                        help="repeatable: also list the fused linear cross-entropy's row pass over a (C, V) logits "
                        f"chunk (default with --check: {XENT_CHECK_SHAPE[0]} {XENT_CHECK_SHAPE[1]})")
    parser.add_argument("--grouped-down", action="append", type=_ranks, metavar="R0,R1,...",
                        help="repeatable: also list the grouped linear's forward lora_down_grouped for projections of "
                        "these ranks, at M,K = the shape's (default with --check: "
                        f"{' and '.join(','.join(map(str, r)) for r in GROUPED_DOWN_CHECK_RANKS)} at M=8192, K=4096)")
    parser.add_argument("--grouped-dx-da", action="append", type=_dx_da_ranks, metavar="R0,R1,...",
                        help="repeatable: also list the grouped linear's backward lora_dx_da_grouped (dropout) for "
                        "projections of these ranks, at M,K = the shape's (default with --check: "
                        f"{' and '.join(','.join(map(str, r)) for r in GROUPED_DOWN_CHECK_RANKS)} at M=8192, K=4096)")
    parser.add_argument("--arch", default="sm_90a", choices=("sm_90", "sm_90a"))
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per kernel launch")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the issue's CUDA targets hold")
    args = parser.parse_args(argv)
    shapes = args.shape or ([(8192, 4096, 4096, 16), (8192, 4096, 14336, 16)] if args.check else [(8192, 4096, 4096, 16)])
    dropouts = args.dropout or ([0.0, 0.05] if args.check else [0.05])
    quants = args.quant or (["none", *QUANT_FORMATS] if args.check else ["none"])
    mlp_acts = args.mlp_act or (list(GATED_ACTS) if args.check else [])
    mlp_shapes = [(8192, 14336)] if args.check and not args.shape else [(s[0], s[2]) for s in shapes]
    xent_shapes = [tuple(shape) for shape in args.xent or ([XENT_CHECK_SHAPE] if args.check else [])]
    down_ranks = args.grouped_down or (list(GROUPED_DOWN_CHECK_RANKS) if args.check else [])
    down_shapes = [(8192, 4096)] if args.check and not args.shape else [(s[0], s[1]) for s in shapes]
    dx_da_ranks = args.grouped_dx_da or (list(GROUPED_DOWN_CHECK_RANKS) if args.check else [])
    all_rows, mlp_rows, xent_rows, down_rows, dx_da_rows, failures = [], [], [], [], [], []
    try:
        for name, make_rows, rank_sets, out in (("lora_down", grouped_down_rows, down_ranks, down_rows),
                                                ("lora_dx_da", grouped_dx_da_rows, dx_da_ranks, dx_da_rows)):
            for ranks in rank_sets:
                for M, K in down_shapes:
                    rows = make_rows(M, K, ranks, args.dtype, args.arch)
                    where = f"grouped {name} M={M} K={K} ranks={','.join(map(str, ranks))}"
                    failures += [f"{where}: {f}" for f in check_rows(rows, M, args.dtype)]
                    out.append(((M, K), ranks, rows))
        for C, V in xent_shapes:
            rows = xent_rows_rows(C, V, args.dtype, args.arch)
            failures += [f"linear cross-entropy rows C={C} V={V}: {f}" for f in check_xent_rows(rows, C, V)]
            xent_rows.append(((C, V), rows))
        for act in mlp_acts:
            for M, inter in mlp_shapes:
                rows = gated_act_rows(M, inter, args.dtype, act, args.arch)
                failures += [f"fused MLP M={M} I={inter} {act}: {f}" for f in check_rows(rows, M, args.dtype)]
                mlp_rows.append(((M, inter), act, rows))
        for quant in quants:
            for shape in shapes:
                for p in dropouts:
                    q = None if quant == "none" else quant
                    rows = launch_rows(*shape, args.dtype, p, args.arch, quant=q)
                    where = f"{','.join(map(str, shape))} p={p}" + (f" {q}" if q else "")
                    failures += [f"{where}: {f}" for f in check_rows(rows, shape[0], args.dtype)]
                    all_rows.append((shape, p, q, rows))
    except (RuntimeError, ValueError) as exc:
        print(f"kernel_report_cuda: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{k: row[k] for k in KEYS} | {"shape": list(shape), "dropout": p, "quant": q}
                          for shape, p, q, rows in all_rows for row in rows]
                         + [{k: row[k] for k in KEYS} | {"shape": list(shape), "activation": act}
                            for shape, act, rows in mlp_rows for row in rows]
                         + [{k: row[k] for k in KEYS} | {"shape": list(shape), "op": "softmax_xent_rows"}
                            for shape, rows in xent_rows for row in rows]
                         + [{k: row[k] for k in KEYS} | {"shape": list(shape), "ranks": list(ranks)}
                            for shape, ranks, rows in down_rows + dx_da_rows for row in rows], indent=1))
    else:
        for shape, p, q, rows in all_rows:
            M, K, N, r = shape
            weight = f"{q} weight" if q else "dense weight"
            print(f"\ncuda backend, {weight}, {args.dtype}, M={M} K={K} N={N} r={r}, p={p}, {args.arch}:")
            print(format_table(rows))
        for (M, inter), act, rows in mlp_rows:
            print(f"\ncuda backend, fused gated MLP's elementwise launches, {args.dtype}, M={M} I={inter}, {act}, "
                  f"{args.arch}:")
            print(format_table(rows))
        for (C, V), rows in xent_rows:
            print(f"\ncuda backend, fused linear cross-entropy's row pass, {args.dtype}, C={C} V={V}, {args.arch}:")
            print(format_table(rows))
        for (M, K), ranks, rows in down_rows:
            print(f"\ncuda backend, grouped linear's forward lora_down with dropout, {args.dtype}, M={M} K={K}, "
                  f"ranks {','.join(map(str, ranks))}, {args.arch}:")
            print(format_table(rows))
        for (M, K), ranks, rows in dx_da_rows:
            print(f"\ncuda backend, grouped linear's backward lora_dx_da with dropout, {args.dtype}, M={M} K={K}, "
                  f"ranks {','.join(map(str, ranks))}, {args.arch}:")
            print(format_table(rows))
    if args.check:
        for failure in failures:
            print(f"TARGET MISSED: {failure}", file=sys.stderr)
        print(f"kernel_report_cuda --check: {'FAILED' if failures else 'all targets hold'} "
              f"({sum(len(rows) for *_, rows in all_rows + mlp_rows + xent_rows + down_rows + dx_da_rows)} launches)",
              file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
