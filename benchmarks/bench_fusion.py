"""Fusions (``lowcost.apply(fused=...)``): saved activations and step time against PEFT, in one run.

Models: the Llama-shaped benchmark model of bench_checkpoint.py (hidden 512, 4 layers, 8 heads, 4 × 256
tokens, vocab 2048, fp32) and a Qwen2 shape with grouped-query attention (same sizes, 2 KV heads); LoRA r=16
on every linear of the blocks, alpha 32, dropout 0.05 unless stated. Providers:

- ``peft``: PEFT ``get_peft_model`` (target_modules="all-linear");
- ``unfused``: ``lowcost.apply(..., fused=None)`` (fused LoRA linears only: the state before issue #12);
- ``fused``: ``lowcost.apply(...)`` with the default fusions (gated MLP, norm, grouped q/k/v, loss);
- ``fused no-qkv``: the same without the "qkv" fusion (q, k and v each their own fused LoRA linear), so the
  grouped projections' share is the difference of the two rows;
- each lowcost one also with ``CheckpointConfig(policy="selective")``.

Saved bytes are exact, as bench_checkpoint.py counts them (saved_tensors_hooks storages + what checkpoint
frames keep), with the matmuls recomputed in backward counted. The saved bytes of unfused/fused, with and
without selective, are broken down by tensor (bench_checkpoint.breakdown) into fusion_breakdown.csv
(rewritten each run); the totals go to fusion.csv. Step time (zero_grad + forward + backward) is timed
round-robin: PEFT, unfused, fused no-qkv and fused at dropout 0.05, and unfused and fused at dropout 0 (the dropout
cost of each).

    .venv/bin/python benchmarks/bench_fusion.py [--rounds 5] [--families llama qwen2] [--no-timing]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from bench_checkpoint import SHAPE, Provider, breakdown, lowcost_provider, measure_bytes, time_round  # noqa: E402
from lowcost.checkpoint import CheckpointConfig  # noqa: E402

KV_HEADS = {"llama": SHAPE["heads"], "qwen2": 2}


def build(family: str, kind: str, dropout: float = 0.05, fused=("mlp", "norm", "qkv", "loss")):
    """A fresh model of ``family`` with LoRA per ``kind`` ("peft" | "unfused" | "fused": with ``fused`` | "fused
    no-qkv": ``fused`` without "qkv"), same weights."""
    import transformers
    import lowcost
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(
        hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"], num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"], num_key_value_heads=KV_HEADS[family], vocab_size=SHAPE["vocab"],
        use_cache=False, attn_implementation="sdpa", tie_word_embeddings=False)
    model = getattr(transformers, model_cls)(cfg)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=SHAPE["r"], lora_alpha=32, lora_dropout=dropout,
                                                 target_modules="all-linear"))
        return model.train(), None
    if kind == "fused no-qkv":
        fused = tuple(f for f in fused if f != "qkv")
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=SHAPE["r"], alpha=32, dropout=dropout),
                           fused=None if kind == "unfused" else fused)
    return model.train(), report


def providers(family: str, ids) -> list[Provider]:
    out = []
    peft_model, _ = build(family, "peft")
    out.append(Provider(f"{family} peft", peft_model, "plain"))
    for kind in ("unfused", "fused no-qkv", "fused"):
        model, report = build(family, kind)
        if report.fusion is not None:
            print(f"{family} {kind}: {report.fusion}", flush=True)
        out.append(Provider(f"{family} {kind}", model, "plain"))
        out.append(lowcost_provider(f"{family} {kind} selective", model, CheckpointConfig(policy="selective"), ids))
    return out


def write_breakdown(rows: list[dict]) -> Path:
    path = harness.RESULTS_DIR / "fusion_breakdown.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["provider", "category", "bytes", "MiB", "share"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def measure_family(family: str, ids, breakdown_rows: list[dict]) -> list[dict]:
    provs = providers(family, ids)
    sizes = {p.name: measure_bytes(p, ids) for p in provs}
    peft_bytes = sizes[f"{family} peft"]["saved_bytes"]
    rows = []
    for p in provs:
        s = sizes[p.name]
        if p.name != f"{family} peft":
            part, info = breakdown(p, ids)
            assert info["total"] == s["saved_bytes"], (p.name, info["total"], s["saved_bytes"])
            breakdown_rows += part
        row = {"provider": p.name, "saved_bytes": s["saved_bytes"], "saved_mib": round(s["saved_bytes"] / 2**20, 3),
               "saved_vs_peft": round(s["saved_bytes"] / peft_bytes, 4), "recomputed_matmuls": s["recomputed_matmuls"],
               "kv_heads": KV_HEADS[family], "dropout": 0.05,
               "shape": "h{hidden} L{layers} S{seq} B{batch} V{vocab} I{intermediate} r{r}".format(**SHAPE)}
        rows.append(row)
        print(f"  {p.name:28s} saved {row['saved_mib']:8.2f} MiB = {row['saved_vs_peft']:.3f}× PEFT   "
              f"recomputed matmuls {row['recomputed_matmuls']}", flush=True)
    return rows


def time_family(family: str, ids, rounds: int) -> list[dict]:
    provs = [Provider(f"{family} peft", build(family, "peft")[0], "plain")]
    provs += [Provider(f"{family} {kind}", build(family, kind)[0], "plain")
              for kind in ("unfused", "fused no-qkv", "fused")]
    provs += [Provider(f"{family} {kind} p=0", build(family, kind, dropout=0.0)[0], "plain") for kind in ("unfused", "fused")]
    for p in provs:                       # warm-up, then round-robin
        time_round(p, ids)
        p.samples.clear()
    for _ in range(rounds):
        for p in provs:
            time_round(p, ids)
    medians = {p.name: statistics.median(p.samples) for p in provs}
    rows = []
    for p in provs:
        samples = sorted(p.samples)
        row = {"provider": p.name, "median_ms": round(medians[p.name], 1),
               "p20_ms": round(samples[int(0.2 * len(samples))], 1),
               "p80_ms": round(samples[min(len(samples) - 1, int(0.8 * len(samples)))], 1),
               "time_vs_peft": round(medians[p.name] / medians[f"{family} peft"], 4), "rounds": rounds}
        rows.append(row)
        print(f"  {p.name:28s} step {row['median_ms']:8.1f} ms [{row['p20_ms']}, {row['p80_ms']}] = "
              f"{row['time_vs_peft']:.3f}× PEFT", flush=True)
    for kind in ("unfused", "fused"):
        ratio = medians[f"{family} {kind}"] / medians[f"{family} {kind} p=0"]
        print(f"  {family}: {kind} dropout 0.05 / dropout 0 = {ratio:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=["llama", "qwen2"], choices=sorted(KV_HEADS))
    parser.add_argument("--no-timing", action="store_true", help="saved bytes and breakdown only")
    args = parser.parse_args(argv)
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0))
    rows, breakdown_rows = [], []
    for family in args.families:
        print(f"{family}: saved activations (kv_heads {KV_HEADS[family]})", flush=True)
        rows += measure_family(family, ids, breakdown_rows)
    print(f"breakdown → {write_breakdown(breakdown_rows)}")
    if not args.no_timing:
        for family in args.families:
            print(f"{family}: step time, {args.rounds} rounds", flush=True)
            timing = {r["provider"]: r for r in time_family(family, ids, args.rounds)}
            for row in rows:
                row.update({k: v for k, v in timing.get(row["provider"], {}).items() if k != "provider"})
            rows += [r for name, r in timing.items() if name.endswith("p=0")]
    print(f"rows → {harness.append_rows('fusion.csv', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
