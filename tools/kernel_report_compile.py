"""Compile one Triton launch exactly as the JIT would, for a GPU target, and read what the compiled code uses.

    compile_like_jit(kernel, args, constexprs, num_warps, num_stages, target) -> CompiledKernel
    resources(compiled, num_warps, target) -> dict   registers, spills, shared memory, CTAs/SM, MMA, TMA, ...

Exactness: a JIT launch ``kernel[grid](**args)`` binds the arguments with a function that Triton generates
from the kernel's signature (``create_function_from_signature``): it types every argument, turns integer
arguments equal to 1 into constants, and marks pointers and integers divisible by 16 (``tt.divisibility``)
unless ``do_not_specialize`` says otherwise. ``JITFunction._pack_args`` then splits the bound values into
signature, constexprs and attributes, and ``triton.compile(ASTSource(...))`` compiles them. We call those
same functions with a backend made for the target instead of the active driver's, so without a GPU we
compile the variant a launch of the same arguments would compile on one. (Checked against Triton 3.6.0
and 3.9.0; both expose these functions with the same signatures.)

Resources come from the compiled artefacts: the cubin's resource usage (registers, static shared memory),
Triton's own ptxas -v log (spill bytes), the dynamic shared memory from Triton's metadata, and the SASS
(cuobjdump -sass, the cuobjdump Triton bundles) for the instruction mix.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

# sm_90 (H100/H200) limits used for occupancy
SM90 = {"regs_per_sm": 65536, "reg_alloc_unit": 256, "sub_partitions": 4, "max_threads": 2048,
        "max_ctas": 32, "smem_per_sm": 233472, "smem_per_cta": 232448, "smem_reserved_per_cta": 1024}


def compile_like_jit(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int, target):
    """(CompiledKernel, ptxas log) of what a JIT launch of ``kernel`` with these arguments compiles for
    ``target``. The log is Triton's own ptxas -v output (empty when the compile came from Triton's cache)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**args, **constexprs, "num_warps": num_warps, "num_stages": num_stages,
              "debug": kernel.debug or knobs.runtime.debug,
              "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, specialization, options = binder(**kwargs)
    options, signature, consts, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, consts, attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's output (our flags are Triton's)
    try:
        with contextlib.redirect_stdout(log), _native_stderr() as diagnostics:
            try:
                compiled = triton.compile(src, target=target, options=options.__dict__)
            except Exception as exc:
                raise CompileError(f"{type(exc).__name__}: {exc}", diagnostics()) from exc
    finally:
        knobs.nvidia.dump_ptxas_log = False
    return compiled, log.getvalue()


class CompileError(RuntimeError):
    """A compile failure with the compiler's own diagnostics (MLIR prints them to fd 2, not into the
    exception: e.g. "shared-memory element type bit width must be a multiple of 8; got 1")."""

    def __init__(self, message: str, diagnostics: str):
        lines = [line.strip() for line in diagnostics.splitlines() if "error" in line.lower()]
        super().__init__(message + (f" -- {' | '.join(lines[:3])}" if lines else ""))


@contextlib.contextmanager
def _native_stderr():
    """Captures file descriptor 2 (native code's stderr) into a temp file; yields a reader."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (os.fsync(2), sink.seek(0), sink.read())[2]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def specialization_summary(kernel, args: dict, constexprs: dict, target) -> str:
    """Which runtime arguments the JIT specialises: 'M:16 N:16 x_ptr:16 one=1' style (16 = divisible)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(target))
    _, specialization, _ = binder(**args, **constexprs)
    parts = []
    for name, (kind, attr) in zip(kernel.arg_names, specialization):
        if kind == "constexpr" and name in args:
            parts.append(f"{name}={args[name]}")
        elif attr == "D":
            parts.append(f"{name}:16")
    return " ".join(parts)


def _nvidia_tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name).path


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory(prefix="kernel-report-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        done = subprocess.run([_nvidia_tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True)
    return done.stdout


_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def sass_opcodes(sass: str) -> Counter:
    """Counts of SASS opcodes (without modifiers), e.g. {'HGMMA': 8, 'UTMALDG': 2, 'RED': 0, ...}."""
    return Counter(match.group(1) for match in _SASS_OP.finditer(sass))


def _first_int(pattern: str, text: str) -> int:
    found = [int(v) for v in re.findall(pattern, text)]
    return max(found) if found else 0


def occupancy(regs: int, num_warps: int, smem_bytes: int) -> tuple[int, str]:
    """(CTAs per SM, limiter) on sm_90 for a CTA of ``num_warps`` warps (limiter: regs/smem/threads/blocks)."""
    lim = SM90
    regs_per_warp = -(-max(regs, 1) * 32 // lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    warps_by_regs = lim["sub_partitions"] * (lim["regs_per_sm"] // lim["sub_partitions"] // regs_per_warp)
    limits = {"regs": warps_by_regs // num_warps, "threads": lim["max_threads"] // (32 * num_warps),
              "blocks": lim["max_ctas"]}
    if smem_bytes > 0:
        limits["smem"] = (0 if smem_bytes > lim["smem_per_cta"]
                          else lim["smem_per_sm"] // (smem_bytes + lim["smem_reserved_per_cta"]))
    limiter = min(limits, key=lambda k: (limits[k], ["regs", "smem", "threads", "blocks"].index(k)))
    return limits[limiter], limiter


def resources(compiled, ptxas_log: str, num_warps: int) -> dict:
    """Registers, spills, shared memory, occupancy, MMA kind, TMA, atomics and barriers of a compile.

    Registers, static shared memory and local memory from the cubin (cuobjdump -res-usage: what launches);
    spill bytes from Triton's ptxas -v log, or, when the compile came from the cache and there is no log,
    the cubin's local memory (an upper bound: local memory is spills plus stack arrays).
    """
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    ops = sass_opcodes(_cuobjdump(compiled.asm["cubin"], "-sass"))
    regs = _first_int(r"REG:(\d+)", usage)
    if "spill stores" in ptxas_log:
        spills = _first_int(r"(\d+) bytes spill stores", ptxas_log) + _first_int(r"(\d+) bytes spill loads", ptxas_log)
    else:
        spills = _first_int(r"LOCAL:(\d+)", usage)
    smem = compiled.metadata.shared + _first_int(r"SHARED:(\d+)", usage)
    ctas, limiter = occupancy(regs, num_warps, smem)
    mma = "wgmma" if ops["HGMMA"] else "mma.sync" if ops["HMMA"] else "none"
    return {"regs": regs, "spills": spills, "smem": smem, "ctas_per_sm": ctas, "limiter": limiter, "mma": mma,
            "tma": bool(ops["UTMALDG"]) or "cp.async.bulk.tensor" in compiled.asm["ptx"],
            "tma_store": bool(ops["UTMASTG"]), "atomics": ops["RED"] + ops["REDG"] + ops["ATOM"] + ops["ATOMG"],
            "barriers": ops["BAR"], "mbarrier_ops": ops["SYNCS"]}
