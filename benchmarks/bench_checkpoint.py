"""Checkpoint policies on a Llama-shaped model: saved-activation bytes vs step time, in one run.

Model: HF LlamaForCausalLM from a config (hidden 512, 4 layers, seq 256, batch 4), LoRA r=16 on every
linear layer via PEFT. Providers: no checkpointing, HF gradient checkpointing (PEFT +
``gradient_checkpointing_enable``), and lowcost's full / every_k / sqrt / selective / offload / budget on
the same PEFT model; plus the model with ``lowcost.LoRALinear`` swapped in (none / full / selective).

Saved bytes are exact: ``harness.saved_activation_bytes`` (storages seen by saved_tensors_hooks) plus
what lowcost frames keep elsewhere (inputs, selective cache, offload buffers, from
``lowcost.checkpoint.track``). Step time (zero_grad + forward + backward) is timed round-robin over the
providers so that machine load hits all of them alike. Recomputed matmuls are counted with a dispatch
mode during backward. Rows go to benchmarks/results/checkpoint.csv, the plot to checkpoint_cpu.png.

    .venv/bin/python benchmarks/bench_checkpoint.py [--rounds 5] [--budget 0.35]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from lowcost.checkpoint import CheckpointConfig, apply_checkpointing, recomputing, track  # noqa: E402
from lowcost.checkpoint.install import install, resolve_blocks, uninstall  # noqa: E402
from lowcost.checkpoint.offload import Offloader  # noqa: E402
from lowcost.checkpoint.selective import default_save_ops  # noqa: E402

SHAPE = dict(hidden=512, layers=4, seq=256, batch=4, vocab=2048, intermediate=1376, heads=8, r=16)


def build_model(lowcost_lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["heads"], vocab_size=SHAPE["vocab"], use_cache=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    if lowcost_lora:  # TODO(#3): lowcost.apply(model, lora=...) once it lands; a local swap for now
        from lowcost import LoRALinear
        model.requires_grad_(False)
        for module in list(model.model.layers.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, LoRALinear.from_linear(child, r=SHAPE["r"], alpha=32, dropout=0.05))
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=SHAPE["r"], lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear"))
    return model.train()


class CountRecomputedMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.count = default_save_ops(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if recomputing() and func.overloadpacket in self.ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Provider:
    """A model plus how to switch one checkpointing setup on and off."""

    def __init__(self, name, model, kind, decisions=None, report=None):
        self.name, self.model, self.kind, self.decisions, self.report = name, model, kind, decisions, report
        self.blocks = resolve_blocks(model)
        self.samples: list[float] = []

    def on(self):
        if self.kind == "hf":
            (getattr(self.model, "activation_checkpointing_enable", None)
             or self.model.gradient_checkpointing_enable)()
        elif self.kind == "lowcost":
            offload = any(d.mode == "offload" for d in self.decisions)
            self.offloader = Offloader() if offload else None
            install(self.blocks, self.decisions, self.offloader)

    def off(self):
        if self.kind == "hf":
            (getattr(self.model, "activation_checkpointing_disable", None)
             or self.model.gradient_checkpointing_disable)()
        elif self.kind == "lowcost":
            uninstall(self.blocks)


def lowcost_provider(name, model, config, ids):
    report = apply_checkpointing(model, config, profile_step=lambda: model(input_ids=ids, labels=ids).loss)
    uninstall(resolve_blocks(model))
    return Provider(name, model, "lowcost", report.decisions, report)


def _closure_inputs(p: Provider, params):
    """For HF checkpointing: torch.utils.checkpoint keeps each layer's tensor inputs in a closure, which no
    saved-tensor hook sees; record their distinct storages with forward pre-hooks on the blocks."""
    exclude = {t.untyped_storage().data_ptr() for t in params}
    seen: dict = {}

    def pre(module, args, kwargs):
        leaves = list(args) + [v for v in kwargs.values()]
        leaves += [t for v in kwargs.values() if isinstance(v, (tuple, list)) for t in v]
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for _, b in p.blocks] if p.kind == "hf" else []
    return seen, handles


def measure_bytes(p: Provider, ids) -> dict:
    params = list(p.model.parameters())
    p.on()
    closure, handles = _closure_inputs(p, params)
    try:
        with track(params) as kept:
            hook_bytes = harness.saved_activation_bytes(lambda: p.model(input_ids=ids, labels=ids).loss, params)
        for h in handles:
            h.remove()
        p.model.zero_grad(set_to_none=True)
        loss = p.model(input_ids=ids, labels=ids).loss
        with CountRecomputedMatmuls() as counter:
            loss.backward()
    finally:
        p.off()
    kept_bytes = kept.bytes() + sum(closure.values())
    return {"hook_bytes": hook_bytes, "kept_bytes": kept_bytes, "saved_bytes": hook_bytes + kept_bytes,
            "recomputed_matmuls": counter.count}


def time_round(p: Provider, ids) -> None:
    def step():
        p.model.zero_grad(set_to_none=True)
        p.model(input_ids=ids, labels=ids).loss.backward()
    p.on()
    try:
        p.samples.append(harness.time_step(step, torch.device("cpu"), warmup=0, repeats=1)["median_ms"])
    finally:
        p.off()


def providers(ids, budget):
    peft_model, lc_model = build_model(False), build_model(True)
    out = [Provider("none", peft_model, "plain"), Provider("hf_gradient_checkpointing", peft_model, "hf")]
    for policy in ("full", "every_k", "sqrt", "selective", "offload"):
        out.append(lowcost_provider(policy, peft_model, CheckpointConfig(policy=policy, k=2), ids))
    out.append(lowcost_provider("budget", peft_model, CheckpointConfig(budget=budget), ids))
    out.append(Provider("none[lowcost-lora]", lc_model, "plain"))
    for policy in ("full", "selective"):
        out.append(lowcost_provider(f"{policy}[lowcost-lora]", lc_model, CheckpointConfig(policy=policy), ids))
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        marker = "s" if "lowcost-lora" in row["provider"] else ("^" if row["provider"].startswith("hf") else "o")
        ax.errorbar(row["saved_mib"], row["median_ms"], yerr=[[row["median_ms"] - row["p20_ms"]],
                    [row["p80_ms"] - row["median_ms"]]], fmt=marker, capsize=3)
        ax.annotate(row["provider"], (row["saved_mib"], row["median_ms"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("saved activation bytes after forward (MiB, exact)")
    ax.set_ylabel("CPU step time, forward + backward (ms, median, p20–p80)")
    ax.set_title(f"Checkpoint policies, Llama h{SHAPE['hidden']} L{SHAPE['layers']} "
                 f"B{SHAPE['batch']}×S{SHAPE['seq']}, LoRA r{SHAPE['r']} all-linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", default="0.35", help="bytes ('40MiB') or a fraction of no-checkpoint bytes")
    args = parser.parse_args()
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0))
    provs = providers(ids, budget)
    sizes = {p.name: measure_bytes(p, ids) for p in provs}
    for p in provs:  # warm-up, then round-robin timing
        time_round(p, ids)
        p.samples.clear()
    for _ in range(args.rounds):
        for p in provs:
            time_round(p, ids)
    rows = []
    for p in provs:
        base = sizes["none[lowcost-lora]" if "lowcost-lora" in p.name else "none"]["saved_bytes"]
        s, samples = sizes[p.name], sorted(p.samples)
        row = {"provider": p.name, "decisions": " ".join(str(d) for d in p.decisions) if p.decisions else p.kind,
               **s, "saved_mib": round(s["saved_bytes"] / 2**20, 3),
               "ratio_vs_none": round(s["saved_bytes"] / base, 4),
               "median_ms": round(statistics.median(samples), 2),
               "p20_ms": round(samples[int(0.2 * len(samples))], 2),
               "p80_ms": round(samples[min(len(samples) - 1, int(0.8 * len(samples)))], 2),
               "predicted_bytes": getattr(p.report, "predicted_bytes", None) or "",
               "budget_bytes": getattr(p.report, "budget_bytes", None) or "",
               "shape": "h{hidden} L{layers} S{seq} B{batch} V{vocab} I{intermediate} r{r}".format(**SHAPE),
               "rounds": args.rounds}
        rows.append(row)
        print(f"{p.name:28s} saved {row['saved_mib']:8.2f} MiB ({row['ratio_vs_none']:.3f}× none)  "
              f"step {row['median_ms']:8.1f} ms [{row['p20_ms']:.1f}, {row['p80_ms']:.1f}]  "
              f"recomputed matmuls {s['recomputed_matmuls']}")
    budget_row = next(r for r in rows if r["provider"] == "budget")
    rel = budget_row["saved_bytes"] / budget_row["predicted_bytes"] - 1
    print(f"budget: measured {budget_row['saved_bytes']} vs predicted {budget_row['predicted_bytes']} "
          f"({rel:+.2%}), budget {budget_row['budget_bytes']}; "
          f"decisions {budget_row['decisions']}")
    path = harness.append_rows("checkpoint.csv", rows)
    plot(rows, harness.RESULTS_DIR / "checkpoint_cpu.png")
    print(f"rows → {path}; plot → {harness.RESULTS_DIR / 'checkpoint_cpu.png'}")
    return 0 if math.isfinite(rel) else 1


if __name__ == "__main__":
    sys.exit(main())
