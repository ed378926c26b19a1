"""Compile every Triton kernel configuration the LoRA launchers launch, for sm_90, without a GPU.

    python tools/triton_aot_check.py [--jobs N] [--filter TEXT] [--keep-cache]

The launches come from ``kernels.lora_linear.aot_launches()``, which builds them with the launchers' own
plan functions (same kernels, same runtime-argument types, same constexprs, same num_warps/num_stages).
Each is compiled with ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90,
32))``, which runs the real backend (TTGIR, LLVM, PTX, ptxas) and so catches what the interpreter does
not (tl.dot dimensions < 16, unsupported casts, layout errors). A config also fails when its shared memory
exceeds what an sm_90 block can get (227 KiB). One line per configuration; exit status 1 on any failure.

Runs with TRITON_INTERPRET unset (the kernels must be decorated for the compiler, not the interpreter).
Not covered: the JIT's value specialisations (an integer argument equal to 1 becomes a constant, and
divisibility-by-16 hints) -- the generic variant compiled here is the one those refine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90


def _launches(text: str):
    sys.path.insert(0, REPO)
    from kernels.lora_linear import aot_launches
    from kernels import linear_cross_entropy, lora_gated_mlp  # the fused loss and MLP kernels (issue #12)
    launches = [*aot_launches(), *linear_cross_entropy.aot_launches(), *lora_gated_mlp.aot_launches()]
    return [launch for launch in launches if text in launch.label]


def _compile_one(index_and_filter: tuple[int, str]) -> tuple[str, bool, str]:
    """(label, ok, detail) for launch ``index`` of the filtered list (rebuilt in each worker)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    index, text = index_and_filter
    launch = _launches(text)[index]
    start = time.perf_counter()
    try:
        src = ASTSource(fn=launch.kernel, signature=launch.signature(), constexprs=launch.constexprs)
        options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        shared = compiled.metadata.shared
        detail = f"shared={shared}B {time.perf_counter() - start:.1f}s"
        if shared > SM90_MAX_SHARED:
            return launch.label, False, f"{detail}: shared memory over the sm_90 limit {SM90_MAX_SHARED}B"
        return launch.label, True, detail
    except Exception as exc:  # report every failing config, keep going
        return launch.label, False, _root_cause(exc)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain (Triton wraps the real error in one CompilationError per call
    level) with the source location of the outermost kernel-level frame that names it."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    where = [line for e in chain for line in str(e).splitlines() if line.startswith("at ")]
    root = chain[-1]
    message = " ".join(str(root).split())[:400]
    return f"{type(root).__name__}: {message}" + (f" [{where[-1]}]" if where else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--filter", default="", help="only configurations whose label contains TEXT")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the normal Triton cache (default: a fresh one, so everything really compiles)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
        return 2
    cache = None if args.keep_cache else tempfile.TemporaryDirectory(prefix="lowcost-aot-")
    if cache is not None:
        os.environ["TRITON_CACHE_DIR"] = cache.name
    start = time.perf_counter()
    count = len(_launches(args.filter))
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        work = [(i, args.filter) for i in range(count)]
        for label, ok, detail in pool.map(_compile_one, work):
            failures += not ok
            print(f"{'OK  ' if ok else 'FAIL'} {label}: {detail}", flush=True)
    print(f"{count - failures}/{count} configurations compiled for sm_90 in {time.perf_counter() - start:.0f}s"
          f" ({failures} failed)")
    if cache is not None:
        cache.cleanup()
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
