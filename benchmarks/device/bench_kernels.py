"""Per-kernel timing of the Triton LoRA launches against cuBLAS / torch, at the benchmark shapes (GPU).

    python benchmarks/device/bench_kernels.py                  # bf16, M=8192, K=4096, N in {4096, 14336},
                                                               # r=16, p in {0, 0.05}; rows -> kernels.csv
    python benchmarks/device/bench_kernels.py --dry-run        # no GPU: tiny shapes under the Triton
                                                               # interpreter, to check the script runs

For each shape and dropout, one forward and one backward (dx, dA, dB; no bias) are planned with the
launchers' own plan functions (kernels/lora_linear.py: the launches the op makes, the same ones the kernel
report compiles) and each launch is timed alone: CUDA events around a batch of launches, median of the
batches. Next to it, the torch / cuBLAS computation of the same result:

    fwd_y  (y = x Wᵀ + su Bᵀ)      F.linear(x, W)                        the frozen GEMM alone
    bwd_dx (dx = g W [+ du A])      g @ W                                 the frozen dgrad alone
    fwd_u  (u = (D⊙x) Aᵀ)           F.dropout(x) @ Aᵀ  (x @ Aᵀ at p = 0)
    bwd_g  (du, dB, dbias partials) g @ B, gᵀ @ u
    bwd_x  (dA partials [, dx +=]) duᵀ @ (D⊙x) [, dx += D⊙(du A)]
    reduce_*                        part.sum(0)

plus the bytes each memory-bound launch must move and the bandwidth that makes. Rows (with hardware,
versions and git sha) are appended to benchmarks/results/kernels.csv, or written to --out/kernels.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setup(dry_run: bool):
    """Imports torch and the kernels (under the interpreter for a dry run without a GPU)."""
    import torch
    if dry_run and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
    from kernels import lora_linear
    return torch, lora_linear


def time_ms(fn, device, repeats: int, batches: int = 5) -> float:
    """Median over ``batches`` of the mean time of ``repeats`` back-to-back calls (CUDA events on a GPU),
    after one untimed call."""
    import torch
    fn()
    samples = []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / repeats)
        else:
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / repeats)
    return statistics.median(samples)


def launch_bytes(launch) -> int:
    """Bytes a memory-bound launch must move: every tensor argument read or written once (the x-pass's dx
    twice when it adds to it); adapters and placeholders count too but are small."""
    import torch
    total = 0
    for name, value in launch.args.items():
        tensor = value.base if type(value).__name__ == "TensorDescriptor" else value
        if isinstance(tensor, torch.Tensor):
            times = 1 if name != "dx_src" else 2 if launch.constexprs.get("DX_LOWRANK") else 0  # 0: stand-in
            total += times * tensor.numel() * tensor.element_size()
    return total


def baselines(torch, t: dict, p: float) -> dict:
    """label -> a zero-argument torch / cuBLAS computation of what that launch computes."""
    import torch.nn.functional as F
    x, w, a, b, g, u, du = (t[k] for k in ("x", "w", "a", "b", "g", "u", "du"))
    drop = (lambda v: F.dropout(v, p)) if p > 0 else (lambda v: v)
    return {"fwd_y": lambda: F.linear(x, w), "bwd_dx": lambda: g @ w, "fwd_u": lambda: drop(x) @ a.t(),
            "bwd_g": lambda: (g @ b, g.t() @ u.to(g.dtype)),
            "bwd_x": lambda: du.t() @ drop(x), "reduce": None}


def _operands(torch, M, K, N, r, dtype, device) -> dict:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device)
    return {"x": randn(M, K), "w": randn(N, K, std=K ** -0.5), "a": randn(r, K, std=K ** -0.5),
            "b": randn(N, r, std=0.02), "g": randn(M, N), "du": randn(M, r)}


def bench_shape(torch, lora_linear, shape, p, dtype, device, repeats, batches=5) -> list[dict]:
    """One row per launch of a forward + backward at ``shape`` = (M, K, N, r), plus a total row."""
    M, K, N, r = shape
    t = _operands(torch, M, K, N, r, dtype, device)
    sms = lora_linear.sm_count(device)
    fwd, _, u = lora_linear.plan_forward(t["x"], t["w"], t["a"], t["b"], None, 2.0, p, 1, sms)
    for launch in fwd:
        launch.run()  # u for the backward's plan (and the JIT compiles here, outside the timing)
    t["u"] = u
    bwd, _ = lora_linear.plan_backward(t["g"], t["x"], t["w"], t["a"], t["b"], u, 2.0, p, 1,
                                       (True, True, True, False), sms)
    base = baselines(torch, t, p)
    rows = []
    for launch in fwd + bwd:
        ms = time_ms(launch.run, device, repeats, batches)
        ref = base.get(launch.label) or (lambda part=launch.args.get("part_ptr"): part.sum(0))
        ref_ms = time_ms(ref, device, repeats, batches)
        moved = launch_bytes(launch) if launch.role == "pass" else 0
        rows.append({"kernel": launch.label, "config": launch.config_text(), "grid": _programs(launch.grid),
                     "ms": round(ms, 4), "torch_ms": round(ref_ms, 4), "vs_torch": round(ms / ref_ms, 3),
                     "bytes": moved, "GBps": round(moved / ms / 1e6, 1) if moved else ""})
    floor_ms = time_ms(base["fwd_y"], device, repeats, batches) + time_ms(base["bwd_dx"], device, repeats, batches)
    total = sum(row["ms"] for row in rows)
    rows.append({"kernel": "all launches (fwd+bwd)", "config": "", "grid": "", "ms": round(total, 4),
                 "torch_ms": round(floor_ms, 4), "vs_torch": round(total / floor_ms, 3), "bytes": "", "GBps": ""})
    return [{"M": M, "K": K, "N": N, "r": r, "dropout": p, "dtype": str(dtype).split(".")[-1], **row}
            for row in rows]


def _programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x4096x4096", "8192x4096x14336"], help="MxKxN")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.05])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=20, help="launches per timed batch")
    parser.add_argument("--out", help="directory for kernels.csv (default: append to benchmarks/results/)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; the interpreter when no GPU")
    args = parser.parse_args(argv)
    torch, lora_linear = _setup(args.dry_run)
    import harness
    device = harness.device_for_run(args.dry_run)
    if device is None:
        return 2
    shapes = ["64x96x80"] if args.dry_run else args.shapes
    repeats = 1 if args.dry_run else args.repeats
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    rows = []
    for text, p in ((s, p) for s in shapes for p in args.dropouts):
        shape = tuple(int(v) for v in text.split("x")) + (args.rank,)
        for row in bench_shape(torch, lora_linear, shape, p, getattr(torch, args.dtype), device, repeats,
                               batches=1 if args.dry_run else 5):
            rows.append(row)
            print(f"{text} p={p} {row['kernel']:24s} {row['ms']:9.4f} ms  torch {row['torch_ms']:9.4f} ms  "
                  f"x{row['vs_torch']:<6} {row['GBps'] and str(row['GBps']) + ' GB/s'}", flush=True)
    path = harness.append_rows_to(args.out, "kernels.csv", rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
