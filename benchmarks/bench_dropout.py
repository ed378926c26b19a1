"""Dropout cost of ``lowcost.ops.lora_linear`` on the CPU (torch backend): fwd+bwd at p and at 0, one run.

At each shape (M×K→N, r=16, fp32, the projections of the benchmark models: 4 × 256 tokens, hidden 512,
intermediate 1376) the step is timed at dropout p and at dropout 0, interleaved, and the ratio of the medians
is the cost of dropout (the Philox mask regenerated from the seed: once in forward for x̃, once in backward for
x̃ and the low-rank dx term together).

The clock is the process's CPU time on one torch thread, not wall time: on a shared machine another process's
load stretches wall time but not the CPU time this process uses, so the ratio stays comparable between a quiet
and a busy machine (cache sharing still adds a little noise). The model-level wall-clock ratio on a quiet
machine is bench_fusion.py's. Rows go to benchmarks/results/dropout.csv.

    .venv/bin/python benchmarks/bench_dropout.py [--repeats 25] [--p 0.05]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from lowcost.ops import lora_linear  # noqa: E402

SHAPES = ((1024, 512, 512), (1024, 512, 1376), (1024, 1376, 512))   # q/o, gate/up, down of the benchmark model
RANK = 16


def _operands(M: int, K: int, N: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape, std=1.0: torch.randn(*shape, generator=gen) * std  # noqa: E731
    return {"x": rand(M, K).requires_grad_(), "weight": rand(N, K, std=K ** -0.5),
            "lora_a": rand(RANK, K, std=K ** -0.5).requires_grad_(), "lora_b": rand(N, RANK, std=0.01).requires_grad_(),
            "grad": rand(M, N)}


def cpu_ms(step) -> float:
    start = time.process_time()
    step()
    return (time.process_time() - start) * 1e3


def measure(M: int, K: int, N: int, p: float, repeats: int, warmup: int = 3) -> dict:
    d = _operands(M, K, N)

    def step(dropout: float):
        y = lora_linear(d["x"], d["weight"], d["lora_a"], d["lora_b"], 2.0, None, dropout, 1234, backend="torch")
        y.backward(d["grad"])

    samples = {p: [], 0.0: []}
    for i in range(warmup + repeats):
        for dropout in (p, 0.0):
            elapsed = cpu_ms(lambda: step(dropout))
            if i >= warmup:
                samples[dropout].append(elapsed)
    on, off = statistics.median(samples[p]), statistics.median(samples[0.0])
    return {"shape": f"{M}x{K}->{N}", "r": RANK, "dtype": "float32", "dropout": p, "clock": "process cpu, 1 thread",
            "median_ms_p": round(on, 3), "median_ms_p0": round(off, 3), "ratio": round(on / off, 4),
            "repeats": repeats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--p", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    rows = []
    for M, K, N in SHAPES:
        row = measure(M, K, N, args.p, args.repeats)
        rows.append(row)
        print(f"  {row['shape']:>15s}: dropout {args.p} {row['median_ms_p']:8.2f} ms, dropout 0 "
              f"{row['median_ms_p0']:8.2f} ms, ratio {row['ratio']:.3f}", flush=True)
    print(f"rows → {harness.append_rows('dropout.csv', rows)}")
    return 0


if __name__ == "__main__":
    harness.run_script(main)
