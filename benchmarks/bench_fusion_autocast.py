"""The "norm" fusion under ``torch.autocast`` bf16: saved activations of the bench_fusion Llama model.

Model: bench_fusion.py's Llama shape (hidden 512, 4 layers, 4 × 256 tokens, vocab 2048, fp32 parameters, LoRA
r=16 all-linear, dropout 0.05, no checkpointing). Providers, each measured with the forward under
``torch.autocast("cpu", bfloat16)`` and, for comparison, in plain fp32:

- ``unfused``: ``lowcost.apply(..., fused=None)``;
- ``fused -norm``: the default fusions without "norm" (gated MLP, loss; qkv refused);
- ``fused``: the default fusions (gated MLP, norm, loss).

Saved bytes are exact (``harness.saved_activation_bytes``: distinct storages seen by saved_tensors_hooks,
parameters excluded; no checkpoint frames here, so nothing is kept elsewhere). Forward only: no timing (the
CPU is shared). What "norm" saves (fused -norm minus fused) is printed next to its exact expectation: one
(tokens × hidden) normed tensor per LoRA consumer that keeps its own copy of a tagged norm's output. The
norms of blocks 1-3's input_layernorm and of every post_attention_layernorm are tagged (block 0's first norm
reads the frozen embedding); the fused MLP is post_attention_layernorm's one consumer. In fp32 q/k/v share one
tensor (7 tensors in all); under autocast each casts its own bf16 copy (3 · 3 + 4 = 13 copies).
Rows go to benchmarks/results/fusion_autocast.csv.

    .venv/bin/python benchmarks/bench_fusion_autocast.py [--modes bf16 fp32]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from bench_checkpoint import SHAPE  # noqa: E402
from bench_fusion import build  # noqa: E402

KINDS = {"unfused": ("unfused", None), "fused -norm": ("fused", ("mlp", "qkv", "loss")),
         "fused": ("fused", ("mlp", "norm", "qkv", "loss"))}
MODES = {"bf16": (torch.bfloat16, 2, 3 * (SHAPE["layers"] - 1) + SHAPE["layers"]),   # dtype, bytes, copies
         "fp32": (torch.float32, 4, 2 * SHAPE["layers"] - 1)}


def saved_bytes(kind: str, mode: str, ids) -> int:
    base, fused = KINDS[kind]
    model, _ = build("llama", base, fused=fused)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    with context:
        return harness.saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss, model.parameters())


def measure(mode: str, ids) -> list[dict]:
    _, width, copies = MODES[mode]
    sizes = {kind: saved_bytes(kind, mode, ids) for kind in KINDS}
    expected = copies * SHAPE["batch"] * SHAPE["seq"] * SHAPE["hidden"] * width
    norm_saves = sizes["fused -norm"] - sizes["fused"]
    print(f"{mode}: the norm fusion saves {norm_saves} bytes; expected {copies} normed copies = {expected} bytes "
          f"({'equal' if norm_saves == expected else 'DIFFERENT'})", flush=True)
    rows = []
    for kind, nbytes in sizes.items():
        rows.append({"provider": f"llama {kind}", "mode": "autocast bf16" if mode == "bf16" else "fp32",
                     "saved_bytes": nbytes, "saved_mib": round(nbytes / 2**20, 3),
                     "vs_unfused": round(nbytes / sizes["unfused"], 4), "norm_saves_bytes": norm_saves,
                     "norm_expected_bytes": expected, "dropout": 0.05,
                     "shape": "h{hidden} L{layers} S{seq} B{batch} V{vocab} I{intermediate} r{r}".format(**SHAPE)})
        print(f"  llama {kind:12s} saved {rows[-1]['saved_mib']:8.2f} MiB = {rows[-1]['vs_unfused']:.3f}× unfused",
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["bf16", "fp32"], choices=sorted(MODES))
    args = parser.parse_args(argv)
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0))
    rows = [row for mode in args.modes for row in measure(mode, ids)]
    print(f"rows → {harness.append_rows('fusion_autocast.csv', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
