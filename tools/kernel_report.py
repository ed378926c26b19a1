"""Kernel report: compile exactly what the LoRA kernels launch, for sm_90a without a GPU, and read the code.

    python tools/kernel_report.py [--shape M,K,N,r ...] [--dtype bf16] [--dropout P ...] [--arch sm_90a]
                                  [--backend triton|cuda|all] [--op OP ...] [--json | --markdown] [--check]
    python tools/kernel_report.py --all-configs        # compile every configuration the launchers can launch
                                                       # (dense LoRA kernels, the dequantizing GEMMs, the
                                                       # fused gated MLP, dense and quantized, the
                                                       # quantized grouped dgrad's ACCUMULATE mode and
                                                       # the fused loss)
    python tools/kernel_report.py --update-readme after   # rewrite the README table between its markers

Per kernel launch at a shape (default: the benchmark shapes, bf16, M=8192, K=4096, N in {4096, 14336},
r=16, p in {0, 0.05}): configuration, grid, registers, spills, shared memory, CTAs per SM and what limits
them, the MMA kind (wgmma / mma.sync / none, from the SASS), whether loads use TMA (UTMALDG /
cp.async.bulk.tensor), global atomic/reduction instructions (RED/ATOM) and CTA barriers (BAR). Next to each
big GEMM a plain reference GEMM of the same tile (tools/kernel_report_reference.py, ``reference: true``),
so the cost of the fusion is visible.

Ops (``--op``, default all): "lora_linear" at the shapes above; "lora_gated_mlp" (the down projection's
kernels of the fused MLP, at Llama-3-8B's MLP: M=8192, H=4096, I=14336, r=16); "lora_grouped_linear" (the
grouped q/k/v kernels at Llama-3-8B's attention input: M=8192, K=4096, q 4096 and k/v 1024 outputs, r=16) and "linear_cross_entropy"
(the fused loss's row kernel on one chunk at hidden 4096, vocabulary 128256), from
``kernels.fused_launches``. Only when named: "qlora_linear" (the dequantizing GEMMs, per --scheme, at the
lora_linear shapes), "qlora_gated_mlp" (the fused MLP's down-projection GEMMs with W_d decoded in the
loop, per --scheme, at the lora_gated_mlp shape; ``kernels.qlora_gated_mlp``) and "qlora_grouped_linear" (every
launch of the grouped q/k/v projections on quantized weights, per --scheme, at the lora_grouped_linear shape:
the grouped u and dA passes, each projection's dequantizing y GEMM, g-pass and dgrad, the later dgrads labelled
ACCUMULATE, the x-passes with dropout, the reductions; ``kernels.qlora_grouped_linear``). A --shape is read by every
selected op (M, K=H, N=I, r for the MLPs; M, hidden, vocabulary for the loss).

The Triton launches come from ``kernels.lora_linear.report_launches`` (the launchers' own planning code:
same kernels, constexprs, grids and options) and are compiled the way a JIT launch compiles them (same
constant and divisibility specialisation; tools/kernel_report_compile.py). The CUDA rows come from
tools/kernel_report_cuda.py when it is present and its toolchain is installed.

``--check`` asserts the targets of issue #9 on the report and exits 1 naming each kernel and target
violated; ``--all-configs`` exits 1 if any configuration fails to compile. The Triton version used is
printed first, so CI logs show which one passed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.dirname(os.path.abspath(__file__))
BENCH_SHAPES = ((8192, 4096, 4096, 16), (8192, 4096, 14336, 16))
BENCH_DROPOUTS = (0.0, 0.05)
SM90_SMS = 132  # H100/H200 SXM: the SM count the report plans persistent grids and row tiles for
SM90_MAX_SHARED = 232448
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPS = ("lora_linear", "lora_gated_mlp", "lora_grouped_linear", "linear_cross_entropy")
# qlora_linear (--op qlora_linear, not in the default report): the dequantizing GEMMs on a quantized weight,
# at the lora_linear shapes, one group per --scheme (internally the op "qlora_linear:SCHEME")
QLORA = "qlora_linear"
QLORA_SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")   # kernels.qlora_dequant
# qlora_gated_mlp (--op qlora_gated_mlp, not in the default report either): the fused MLP's down-projection
# GEMMs on a quantized W_d at the lora_gated_mlp shape, one group per --scheme ("qlora_gated_mlp:SCHEME")
QGATED = "qlora_gated_mlp"
# qlora_grouped_linear (--op qlora_grouped_linear, not in the default report either): every launch of the grouped
# q/k/v projections on quantized weights at the lora_grouped_linear shape, one group per --scheme
QGROUPED = "qlora_grouped_linear"
QUANTIZED_OPS = (QLORA, QGATED, QGROUPED)
# lora_linear: M, K, N, r; lora_gated_mlp: M tokens, H = K, I = N, r (Llama-3-8B's MLP); linear_cross_entropy:
# M tokens, hidden K, vocabulary N (Llama-3's 128256), r unused (the head's GEMMs are torch's)
DEFAULT_SHAPES = {"lora_linear": BENCH_SHAPES, QLORA: BENCH_SHAPES, "lora_gated_mlp": ((8192, 4096, 14336, 16),),
                  QGATED: ((8192, 4096, 14336, 16),), "lora_grouped_linear": ((8192, 4096, 4096, 16),),
                  QGROUPED: ((8192, 4096, 4096, 16),),
                  "linear_cross_entropy": ((8192, 4096, 128256, 16),)}
JSON_KEYS = ("kernel", "backend", "role", "grid", "persistent", "regs", "spills", "smem", "ctas_per_sm", "mma",
             "tma", "atomics", "barriers")


# ------------------------------------------------------------------------------------------- the jobs
def _setup_paths() -> None:
    for path in (REPO, TOOLS):
        if path not in sys.path:
            sys.path.insert(0, path)


def _op_launches(op: str, shape, dtype, p: float, num_sms: int) -> list:
    from kernels.fused_launches import report_launches as fused_launches
    from kernels.lora_linear import report_launches
    from kernels.qlora_gated_mlp import report_launches as quantized_mlp_launches
    from kernels.qlora_grouped_linear import report_launches as quantized_grouped_launches
    from kernels.qlora_linear import report_launches as quantized_launches
    if op == "lora_linear":
        return report_launches(*shape, dtype, p, num_sms)
    if op.startswith(QLORA + ":"):
        return quantized_launches(op.split(":", 1)[1], *shape, dtype, p, num_sms)
    if op.startswith(QGATED + ":"):
        return quantized_mlp_launches(op.split(":", 1)[1], *shape, dtype, p, num_sms)
    if op.startswith(QGROUPED + ":"):
        return quantized_grouped_launches(op.split(":", 1)[1], *shape, dtype, p, num_sms)
    return fused_launches(op, *shape, dtype, p, num_sms)


def report_jobs(shapes, dtype_name: str, dropouts, num_sms: int, ops=OPS) -> list[dict]:
    """Every launch to compile for the report: one dict per kernel and per reference GEMM. ``shapes`` None:
    each op at its own benchmark shapes (DEFAULT_SHAPES)."""
    _setup_paths()
    import torch
    from kernel_report_reference import ReferenceSpec, reference_launch

    dtype = getattr(torch, DTYPES[dtype_name])
    jobs = []
    for op in ops:
        for shape in shapes or DEFAULT_SHAPES[op.split(":")[0]]:
            # the loss's row kernel has no dropout: once, under the first p
            for p in dropouts if op != "linear_cross_entropy" else dropouts[:1]:
                launches = _op_launches(op, shape, dtype, p, num_sms)
                for launch in launches:
                    where = {"op": op, "shape": ",".join(map(str, shape)), "dropout": p, "dtype": dtype_name}
                    jobs.append({**where, "launch": launch, "kernel": launch.label, "role": launch.role,
                                 "persistent": launch.persistent, "config": launch.config_text()})
                    if launch.reference is not None:
                        spec = ReferenceSpec(dtype=dtype, **launch.reference)
                        kernel, grid, args, meta = reference_launch(spec)
                        jobs.append({**where, "kernel": f"reference GEMM ({launch.label})", "role": "gemm",
                                     "reference": True, "persistent": spec.persistent,
                                     "raw": (kernel, grid, args, meta), "options": (spec.num_warps, spec.num_stages),
                                     "config": _reference_config(spec)})
    return jobs


def _reference_config(spec) -> str:
    return (f"{spec.block_m}x{spec.block_n}x{spec.block_k} w{spec.num_warps} s{spec.num_stages}"
            f"{' tma' if spec.tma else ''}")


def all_config_jobs(text: str) -> list[dict]:
    _setup_paths()
    from kernels.fused_launches import aot_launches as fused_launches      # gated MLP and loss (issue #12)
    from kernels.lora_linear import aot_launches
    from kernels.qlora_gated_mlp import aot_launches as quantized_mlp_launches  # the MLP's, W_d quantized (#13)
    from kernels.qlora_grouped_linear import aot_launches as quantized_grouped_launches  # its ACCUMULATE dgrads
    from kernels.qlora_linear import aot_launches as quantized_launches   # the dequantizing GEMMs (issue #13)
    launches = itertools.chain(aot_launches(), quantized_launches(), fused_launches(), quantized_mlp_launches(),
                               quantized_grouped_launches())
    return [{"launch": launch, "kernel": launch.label} for launch in launches if text in launch.label]


_JOBS: dict = {}


def _compile_job(key_and_index) -> dict:
    """Compiles job ``index`` of the job list ``key`` (rebuilt once per worker process) -> result row."""
    from triton.backends.compiler import GPUTarget
    from kernel_report_compile import compile_like_jit, resources

    key, index = key_and_index
    if key not in _JOBS:
        _JOBS[key] = all_config_jobs(key[1]) if key[0] == "all" else report_jobs(*key[1:])
    job = _JOBS[key][index]
    if "launch" in job:
        launch = job["launch"]
        kernel, grid, args, meta = launch.kernel, launch.grid, launch.args, launch.constexprs
        warps, stages = launch.num_warps, launch.num_stages
    else:
        (kernel, grid, args, meta), (warps, stages) = job["raw"], job["options"]
    row = {k: v for k, v in job.items() if k not in ("launch", "raw", "options")}
    row.update(backend="triton", grid=_programs(grid))
    start = time.perf_counter()
    try:
        compiled, log = compile_like_jit(kernel, args, meta, warps, stages, GPUTarget("cuda", 90, 32))
        if key[0] == "all":  # compile coverage: success and shared memory only (no SASS reading)
            row.update(ok=True, smem=compiled.metadata.shared, regs="", spills="")
        else:
            row.update(resources(compiled, log, warps), ok=True)
    except Exception as exc:  # report every failing configuration and keep going
        row.update(ok=False, error=_root_cause(exc))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain (Triton wraps the real error once per call level) with the
    outermost kernel-source location that names it."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    where = [line for e in chain for line in str(e).splitlines() if line.startswith("at ")]
    root = next((e for e in chain if type(e).__name__ == "CompileError" and " -- " in str(e)), chain[-1])
    message = " ".join(str(root).split())[:400]
    return f"{type(root).__name__}: {message}" + (f" [{where[-1]}]" if where else "")


def run_jobs(key: tuple, count: int, jobs: int, progress: bool) -> list[dict]:
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, row in enumerate(pool.map(_compile_job, [(key, i) for i in range(count)]), 1):
            rows.append(row)
            if progress:
                status = "OK  " if row["ok"] else "FAIL"
                detail = row["error"] if not row["ok"] else (
                    f"smem={row['smem']}B" if row["regs"] == "" else
                    f"regs={row['regs']} spills={row['spills']} smem={row['smem']}B")
                print(f"[{i}/{count}] {status} {row['kernel']}: {detail} ({row['seconds']}s)", file=sys.stderr,
                      flush=True)
    return rows


# ------------------------------------------------------------------------------------------- CUDA rows
def cuda_rows(shapes, dtype_name: str, dropouts, arch: str) -> tuple[list[dict], str]:
    """(rows, error): the CUDA kernels' rows from tools/kernel_report_cuda.py, or why there are none."""
    _setup_paths()
    try:
        from kernel_report_cuda import cuda_kernel_rows
    except ImportError as exc:
        return [], f"CUDA kernel report unavailable: tools/kernel_report_cuda.py not importable ({exc})"
    rows = []
    try:
        for shape in shapes:
            for p in dropouts:
                for row in cuda_kernel_rows(*shape, dtype_name, p, arch):
                    rows.append({**row, "shape": ",".join(map(str, shape)), "dropout": p, "dtype": dtype_name,
                                 "ok": True})
    except RuntimeError as exc:
        return rows, f"CUDA kernel report unavailable: {exc}"
    return rows, ""


# ------------------------------------------------------------------------------------------- output
COLUMNS = (("kernel", "kernel"), ("role", "role"), ("config", "config"), ("grid", "grid"),
           ("persistent", "persistent"), ("regs", "regs"), ("spills", "spills"), ("smem", "smem KiB"),
           ("ctas_per_sm", "CTAs/SM (limit)"), ("mma", "MMA"), ("tma", "TMA"), ("atomics", "atomics"),
           ("barriers", "barriers"))


def _cell(row: dict, key: str) -> str:
    if not row.get("ok", True) and key not in ("kernel", "role", "config", "grid", "persistent"):
        return "FAILED" if key == "regs" else ""
    value = row.get(key, "")
    if key == "smem":
        return f"{value / 1024:.1f}"
    if key == "ctas_per_sm":
        return f"{value} ({row['limiter']})" if row.get("limiter") else str(value)
    if key in ("persistent", "tma"):
        return "yes" if value else "no"
    if key == "kernel" and row.get("backend") == "cuda":
        return f"{value} (cuda)"
    return str(value)


def _groups(rows: list[dict]):
    seen = {}
    for row in rows:
        seen.setdefault((row.get("op", "lora_linear"), row["shape"], row["dropout"], row["dtype"]), []).append(row)
    return seen.items()


def _title(op: str, shape: str, p: float, dtype: str) -> str:
    M, K, N, r = shape.split(",")
    if op == "lora_gated_mlp":
        return (f"lora_gated_mlp, down projection's kernels (gate and up are the lora_linear launches at "
                f"M={M} K={K} N={N}): M={M} H={K} I={N} r={r} {dtype} p={p}")
    if op == "lora_grouped_linear":
        return (f"lora_grouped_linear, grouped q/k/v kernels (q: N={N} outputs, k and v: N/4; their y GEMMs and "
                f"g-passes are the lora_linear launches): M={M} K={K} N={N} r={r} {dtype} p={p}")
    if op == "linear_cross_entropy":
        return f"linear_cross_entropy, row kernel of one chunk: M={M} hidden={K} vocab={N} {dtype}"
    if op.startswith(QLORA + ":"):
        return (f"qlora_linear, dequantizing GEMMs on a {op.split(':')[1]} weight: M={M} K={K} N={N} r={r} "
                f"{dtype} p={p}")
    if op.startswith(QGATED + ":"):
        return (f"qlora_gated_mlp, down projection's dequantizing GEMMs on a {op.split(':')[1]} W_d (gate and up "
                f"are the qlora_linear GEMMs at M={M} K={K} N={N}): M={M} H={K} I={N} r={r} {dtype} p={p}")
    if op.startswith(QGROUPED + ":"):
        return (f"qlora_grouped_linear, every launch of the grouped q/k/v projections on {op.split(':')[1]} weights "
                f"(q: N={N} outputs, k and v: N/4): M={M} K={K} N={N} r={r} {dtype} p={p}")
    return f"M={M} K={K} N={N} r={r} {dtype} p={p}"


def format_table(rows: list[dict], markdown: bool) -> str:
    out = []
    for (op, shape, p, dtype), group in _groups(rows):
        title = _title(op, shape, p, dtype)
        cells = [[_cell(row, key) for key, _ in COLUMNS] for row in group]
        heads = [head for _, head in COLUMNS]
        if markdown:
            out += [f"**{title}**", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
            out += ["| " + " | ".join(line) + " |" for line in cells] + [""]
            continue
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        out += [title, "  ".join(h.ljust(w) for h, w in zip(heads, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells] + [""]
    errors = [f"{row['kernel']} at {row['shape']} p={row['dropout']}: {row['error']}" for row in rows
              if not row.get("ok", True)]
    return "\n".join(out + [f"compile error: {e}" for e in errors])


def json_rows(rows: list[dict]) -> list[dict]:
    extra = ("op", "reference", "shape", "dropout", "dtype", "config", "limiter", "ok", "error")
    return [{**{k: row.get(k) for k in JSON_KEYS}, **{k: row[k] for k in extra if k in row}} for row in rows]


# ------------------------------------------------------------------------------------------- README
def update_readme(section: str, text: str, path: str = os.path.join(REPO, "README.md")) -> None:
    """Replaces what lies between <!-- kernel-report:SECTION --> and <!-- /kernel-report:SECTION --> in
    README.md (written atomically: temp file + rename)."""
    begin, end = f"<!-- kernel-report:{section} -->", f"<!-- /kernel-report:{section} -->"
    with open(path) as handle:
        readme = handle.read()
    if begin not in readme or end not in readme:
        raise SystemExit(f"error: README.md has no {begin} ... {end} markers")
    head, rest = readme.split(begin, 1)
    tail = rest.split(end, 1)[1]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".README.")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    os.replace(tmp, path)


def _versions() -> str:
    import triton
    return f"Triton {triton.__version__}"


# ------------------------------------------------------------------------------------------- main
def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shape", action="append", help="M,K,N,r (repeatable; default: the benchmark shapes)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--dropout", action="append", type=float, help="p (repeatable; default 0 and 0.05)")
    parser.add_argument("--arch", default="sm_90a", choices=["sm_90a"], help="compile target")
    parser.add_argument("--backend", default="all", choices=["triton", "cuda", "all"])
    parser.add_argument("--op", action="append", choices=OPS + QUANTIZED_OPS,
                        help="Triton ops to report (repeatable; default all but the quantized ones: "
                             "qlora_linear, qlora_gated_mlp and qlora_grouped_linear). With --shape, each op reads "
                             "it as it reads its default (see DEFAULT_SHAPES)")
    parser.add_argument("--scheme", action="append", choices=QLORA_SCHEMES,
                        help="--op qlora_linear / qlora_gated_mlp / qlora_grouped_linear: weight formats "
                             "(repeatable; default all)")
    parser.add_argument("--num-sms", type=int, default=SM90_SMS, help="SM count the launches are planned for")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="a JSON list, one object per kernel")
    out.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target of issue #9 is violated")
    parser.add_argument("--all-configs", action="store_true",
                        help="compile every configuration the launchers can launch (all dtypes, ranks, flags)")
    parser.add_argument("--filter", default="", help="--all-configs: only labels containing TEXT")
    parser.add_argument("--update-readme", metavar="SECTION", help="write the markdown table into README.md")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the normal Triton cache (default: a fresh one, so everything really compiles)")
    args = parser.parse_args(argv)
    ops = tuple(args.op) if args.op else OPS
    schemes = tuple(args.scheme) if args.scheme else QLORA_SCHEMES
    args.ops = tuple(o for op in ops for o in ((f"{op}:{s}" for s in schemes) if op in QUANTIZED_OPS else (op,)))
    try:
        args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else BENCH_SHAPES
    except ValueError:
        parser.error("--shape must be four integers M,K,N,r")
    if any(len(s) != 4 or min(s) < 1 for s in args.shapes):
        parser.error("--shape must be four positive integers M,K,N,r")
    args.dropouts = tuple(args.dropout) if args.dropout else BENCH_DROPOUTS
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        parser.error("--dropout must be in [0, 1)")
    return args


def all_configs(args) -> int:
    count = len(all_config_jobs(args.filter))
    start = time.perf_counter()
    rows = run_jobs(("all", args.filter), count, args.jobs, progress=True)
    failed = [r for r in rows if not r["ok"] or r["smem"] > SM90_MAX_SHARED]
    for row in failed:
        reason = row.get("error") or f"shared memory {row['smem']}B over the limit {SM90_MAX_SHARED}B"
        print(f"FAIL {row['kernel']}: {reason}")
    print(f"{count - len(failed)}/{count} configurations compiled for {args.arch} with {_versions()} in "
          f"{time.perf_counter() - start:.0f}s ({len(failed)} failed)")
    return 1 if failed or count == 0 else 0


def report(args) -> int:
    rows, notes = [], []
    if args.backend in ("triton", "all"):
        key = ("report", tuple(args.shapes) if args.shape else None, args.dtype, args.dropouts, args.num_sms,
               args.ops)
        rows += run_jobs(key, len(report_jobs(*key[1:])), args.jobs, progress=not args.json)
    if args.backend in ("cuda", "all"):
        cuda, error = cuda_rows(args.shapes, args.dtype, args.dropouts, args.arch)
        rows += cuda
        if error:
            notes.append(error)
    header = f"kernel report: {_versions()}, {args.arch}, {args.num_sms} SMs"
    if args.json:
        print(json.dumps(json_rows(rows), indent=1))
    else:
        print(f"{header}\n\n{format_table(rows, args.markdown)}")
    for note in notes:
        print(note, file=sys.stderr)
    if args.update_readme:
        update_readme(args.update_readme, f"Generated by `python tools/kernel_report.py --update-readme "
                      f"{args.update_readme}` ({header}).\n\n{format_table(rows, True)}")
    failed = [r for r in rows if not r.get("ok", True)]
    status = 1 if failed or (args.backend == "cuda" and notes) else 0
    if args.check:
        from kernel_report_targets import violations
        broken = violations(rows, args.num_sms)
        for line in broken:
            print(f"TARGET VIOLATED: {line}", file=sys.stderr)
        print(f"check: {len(broken)} target violations in {len(rows)} kernels ({_versions()})", file=sys.stderr)
        status = max(status, 1 if broken else 0)
    return status


def main(argv=None) -> int:
    args = _parse_args(argv)
    # The kernels must be decorated for the compiler, not the interpreter (the tool never runs them).
    os.environ.pop("TRITON_INTERPRET", None)
    _setup_paths()
    cache = None if args.keep_cache else tempfile.TemporaryDirectory(prefix="kernel-report-cache-")
    if cache is not None:
        os.environ["TRITON_CACHE_DIR"] = cache.name
    try:
        return all_configs(args) if args.all_configs else report(args)
    finally:
        if cache is not None:
            cache.cleanup()


if __name__ == "__main__":
    sys.exit(main())
