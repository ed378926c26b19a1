"""Checkpoint policies on a Llama-shaped model: saved-activation bytes vs step time, in one run.

Model: HF LlamaForCausalLM from a config (hidden 512, 4 layers, seq 256, batch 4), LoRA r=16 on every
linear layer via PEFT. Providers: no checkpointing, HF gradient checkpointing (PEFT +
``gradient_checkpointing_enable``), and lowcost's full / every_k / sqrt / selective / offload / budget on
the same PEFT model; plus the model with fused LoRA from ``lowcost.apply`` (none / full / selective, and
selective+o_proj: selective with ``recompute=("self_attn.o_proj",)``, which recomputes the attention output
projection instead of keeping its output — one fused matmul per block, below selective's zero-recompute floor).

Saved bytes are exact: ``harness.saved_activation_bytes`` (storages seen by saved_tensors_hooks) plus
what lowcost frames keep elsewhere (inputs, selective cache, offload buffers, from
``lowcost.checkpoint.track``). Step time (zero_grad + forward + backward) is timed round-robin over the
providers so that machine load hits all of them alike. Recomputed matmuls are counted with a dispatch
mode during backward. Rows go to benchmarks/results/checkpoint.csv, the plot to checkpoint_cpu.png.

The saved bytes of none[lowcost-lora] and selective[lowcost-lora] are also broken down by category (block
inputs, selective-cache entries by op and module, bytes outside the blocks) next to the analytic floor for
zero matmul recompute; the table goes to checkpoint_selective_breakdown.csv (rewritten each run).

Before anything is measured, every provider's loss and gradients (same RNG seed) are checked against no
checkpointing on the same model: a policy that changes the result is refused (tolerance 1e-5 relative;
on the CPU they are measured bit-equal). ``--quick``: a tiny model, one round.

    .venv/bin/python benchmarks/bench_checkpoint.py [--rounds 5] [--budget 0.35] [--breakdown-only] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from lowcost.checkpoint import CheckpointConfig, RecomputeCounter, apply_checkpointing, track  # noqa: E402
from lowcost.checkpoint.install import install, resolve_blocks, uninstall  # noqa: E402
from lowcost.checkpoint.offload import Offloader  # noqa: E402

SHAPE = dict(hidden=512, layers=4, seq=256, batch=4, vocab=2048, intermediate=1376, heads=8, r=16)


def build_model(lowcost_lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["heads"], vocab_size=SHAPE["vocab"], use_cache=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    if lowcost_lora:
        import lowcost
        linears = {name for name, m in model.named_modules()
                   if name.startswith("model.layers.") and isinstance(m, nn.Linear)}
        report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=SHAPE["r"], alpha=32, dropout=0.05,
                                                              targets="all-linear"))
        # every linear of the decoder blocks (7 per block), fused, and nothing else (lm_head is the output head)
        assert set(report.names) == linears and len(linears) == 7 * SHAPE["layers"], sorted(report.names)
        assert report.paths() == {"fused": len(linears)}, report.paths()
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=SHAPE["r"], lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear"))
    return model.train()


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
            # enable() also registered transformers' input-requires-grad hook, which disable() leaves in place:
            # without removing it the PEFT rows measured after this one (the "none" baseline) saved 8 MiB more
            self.model.disable_input_require_grads()
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
        with RecomputeCounter() as counter:
            loss.backward()
    finally:
        p.off()
    kept_bytes = kept.bytes() + sum(closure.values())
    return {"hook_bytes": hook_bytes, "kept_bytes": kept_bytes, "saved_bytes": hook_bytes + kept_bytes,
            "recomputed_matmuls": counter.count}


TOLERANCE = 1e-5
QUICK_SHAPE = dict(hidden=64, layers=2, seq=32, batch=2, vocab=256, intermediate=176, heads=4, r=8)


def loss_and_grads(p: Provider, ids) -> dict:
    """Loss and every trainable gradient of one step under ``p`` (RNG seeded, so dropout masks agree)."""
    p.on()
    try:
        p.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = p.model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        p.off()
    out = {"loss": loss.detach()}
    out.update({name: q.grad.clone() for name, q in p.model.named_parameters() if q.grad is not None})
    p.model.zero_grad(set_to_none=True)
    return out


def check_providers(provs, ids) -> None:
    """Each provider against no checkpointing on its own model (``harness.check_providers``)."""
    plain = {id(p.model): p for p in provs if p.kind == "plain"}
    for model_id, reference in plain.items():
        others = [p for p in provs if id(p.model) == model_id and p is not reference]
        harness.check_providers(loss_and_grads(reference, ids), {p.name: loss_and_grads(p, ids) for p in others},
                                TOLERANCE, f"{reference.name} vs checkpointing: ")


def time_round(p: Provider, ids) -> None:
    def step():
        p.model.zero_grad(set_to_none=True)
        p.model(input_ids=ids, labels=ids).loss.backward()
    p.on()
    try:
        p.samples.append(harness.time_step(step, torch.device("cpu"), warmup=0, repeats=1)["median_ms"])
    finally:
        p.off()


def lowcost_lora_providers(ids, policies=("full", "selective")):
    lc_model = build_model(True)
    out = [Provider("none[lowcost-lora]", lc_model, "plain")]
    for policy in policies:
        out.append(lowcost_provider(f"{policy}[lowcost-lora]", lc_model, CheckpointConfig(policy=policy), ids))
    out.append(lowcost_provider("selective+o_proj[lowcost-lora]", lc_model,
                                CheckpointConfig(policy="selective", recompute=("self_attn.o_proj",)), ids))
    return out


def print_sizes(provs, sizes) -> None:
    """Saved bytes, ratio to the matching no-checkpoint provider and recomputed matmuls (no timing)."""
    for p in provs:
        base = sizes["none[lowcost-lora]" if "lowcost-lora" in p.name else "none"]["saved_bytes"]
        s = sizes[p.name]
        decisions = " ".join(str(d) for d in p.decisions) if p.decisions else p.kind
        print(f"{p.name:32s} saved {s['saved_bytes'] / 2**20:8.2f} MiB ({s['saved_bytes'] / base:.3f}× none)  "
              f"recomputed matmuls {s['recomputed_matmuls']}  [{decisions}]")


def providers(ids, budget):
    peft_model = build_model(False)
    out = [Provider("none", peft_model, "plain"), Provider("hf_gradient_checkpointing", peft_model, "hf")]
    for policy in ("full", "every_k", "sqrt", "selective", "offload"):
        out.append(lowcost_provider(policy, peft_model, CheckpointConfig(policy=policy, k=2), ids))
    out.append(lowcost_provider("budget", peft_model, CheckpointConfig(budget=budget), ids))
    return out + lowcost_lora_providers(ids)


# ------------------------------------------------------------------------------------ selective breakdown
BREAKDOWN_PROVIDERS = ("none[lowcost-lora]", "selective[lowcost-lora]")
_LEAF_NAMES = {("lora_linear", 0): "y", ("lora_linear", 1): "u (LoRA x̃Aᵀ)",
               ("_scaled_dot_product_flash_attention_for_cpu", 0): "output",
               ("_scaled_dot_product_flash_attention_for_cpu", 1): "logsumexp"}
_OP_NAMES = {"_scaled_dot_product_flash_attention_for_cpu": "SDPA"}


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Producers(TorchDispatchMode):
    """Forward only: storage pointer → (op, output leaf index, innermost module) of the op that allocated
    it. An output whose storage is one of the op's inputs' (a view, an in-place or out= op) keeps its
    producer; a freed and reused pointer gets the new one."""

    def __init__(self, where: list):
        super().__init__()
        self.where, self.by_ptr = where, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for i, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor) and _storage(t)[0] not in inputs:
                self.by_ptr[_storage(t)[0]] = (func.overloadpacket.__name__, i, self.where[-1] if self.where else "")
        return out


def _block_of(name: str):
    """("model.layers.2.mlp.up_proj") → (2, "mlp.up_proj"); outside the blocks: (None, name)."""
    parts = name.split(".")
    if name.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[3:]) or "decoder block"
    return None, name or "top level (loss)"


def _describe(producer, full: bool = False) -> str:
    """'<op> <output> of <module>': the module relative to its block, or its full name with ``full``."""
    if producer is None:
        return "?"
    op, leaf, module = producer
    what = _LEAF_NAMES.get((op, leaf), f"[{leaf}]" if leaf else "")
    where = (module or "top level (loss)") if full else _block_of(module)[1]
    return f"{_OP_NAMES.get(op, op)} {what}".strip() + f" of {where}"


def breakdown(p: Provider, ids) -> tuple[list[dict], dict]:
    """Every byte ``measure_bytes`` counts for ``p``, by category: one forward with an outer saved-tensor
    hook (what autograd saves outside lowcost frames, each storage once, parameters excluded — the same
    rule as ``harness.saved_activation_bytes``) and ``track`` (what frames keep: inputs, selective cache).
    Producers come from a dispatch mode under the frames' own modes; modules from forward hooks."""
    params = list(p.model.parameters())
    exclude = {_storage(t)[0] for t in params}
    where: list[str] = []
    inputs: dict[int, str] = {}   # storage ptr → the block-forward argument it came in as
    saved: dict[int, tuple] = {}  # storage ptr → (nbytes, module running at pack time)

    def push(name):
        return lambda module, args: where.append(name)

    def pop(module, args, out):
        where.pop()

    def block_args(module, args, kwargs):
        named = [(f"arg{i}" if i else "hidden_states", a) for i, a in enumerate(args)] + list(kwargs.items())
        for key, value in named:
            for j, t in enumerate(tree_flatten(value)[0]):
                if isinstance(t, torch.Tensor):
                    label = key + (f"[{j}]" if isinstance(value, (tuple, list)) else "")
                    inputs.setdefault(_storage(t)[0], label)

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in exclude and nbytes:
            saved.setdefault(ptr, (nbytes, where[-1] if where else ""))
        return t

    handles = []
    for name, module in p.model.named_modules():
        handles += [module.register_forward_pre_hook(push(name)), module.register_forward_hook(pop)]
    handles += [b.register_forward_pre_hook(block_args, with_kwargs=True) for _, b in p.blocks]
    p.on()
    try:
        with track(params) as kept, _Producers(where) as producers, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = p.model(input_ids=ids, labels=ids).loss
        del loss
    finally:
        p.off()
        for h in handles:
            h.remove()

    totals: dict[str, int] = {}

    def add(category, nbytes):
        totals[category] = totals.get(category, 0) + nbytes

    for ptr, (nbytes, module) in saved.items():
        block, rel = _block_of(module)
        producer = producers.by_ptr.get(ptr)
        if block is None:
            add(f"outside blocks: {rel} saves {_describe(producer, full=True)}", nbytes)
        else:
            add(f"in blocks (autograd): {rel} saves {_describe(producer)}", nbytes)
    for ptr, (nbytes, label, kind, _) in kept.storages.items():
        if kind == "input":
            add(f"block inputs (checkpoint inputs): {inputs.get(ptr, 'other')}", nbytes)
        elif kind == "cache":
            add(f"selective cache: {_describe(producers.by_ptr.get(ptr))}", nbytes)
        else:
            add(f"{kind}: {_describe(producers.by_ptr.get(ptr))}", nbytes)
    if any(c.startswith("selective cache") for c in totals):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            add(f"selective cache: lora_linear y of {name}", 0)  # a zero row says "not kept" explicitly
    for name in ("model.embed_tokens", "lm_head"):
        if not any(c.startswith(f"outside blocks: {name} ") for c in totals):
            add(f"outside blocks: {name} saves nothing (frozen weight)", 0)
    total = sum(totals.values())
    rows = [{"provider": p.name, "category": c, "bytes": b, "MiB": round(b / 2**20, 3), "share": round(b / total, 4)}
            for c, b in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]
    overlap = set(saved) & set(kept.storages)
    info = {"total": total, "hook_bytes": sum(n for n, _ in saved.values()), "kept_bytes": kept.bytes(),
            "overlap_bytes": sum(saved[ptr][0] for ptr in overlap),
            "outside_bytes": sum(n for n, m in saved.values() if _block_of(m)[0] is None),
            "extra_input_bytes": sum(n for ptr, (n, _, kind, _) in kept.storages.items()
                                     if kind == "input" and inputs.get(ptr) != "hidden_states")}
    return rows, info


# floor item → the breakdown categories that hold it (selective cache / checkpoint inputs)
_FLOOR_MATCH = [
    ("block input (hidden_states)", ("block inputs (checkpoint inputs): hidden_states",)),
    ("q, k, v projections", tuple(f"selective cache: lora_linear y of self_attn.{n}_proj" for n in "qkv")),
    ("SDPA output", ("selective cache: SDPA output of self_attn",)),
    ("SDPA logsumexp", ("selective cache: SDPA logsumexp of self_attn",)),
    ("o projection output", ("selective cache: lora_linear y of self_attn.o_proj",)),
    ("gate, up projections", ("selective cache: lora_linear y of mlp.gate_proj",
                              "selective cache: lora_linear y of mlp.up_proj")),
    ("LoRA u, 7 adapters", tuple(f"selective cache: lora_linear u (LoRA x̃Aᵀ) of {m}" for m in
                                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))),
]


def analytic_floor(outside_bytes: int, extra_input_bytes: int, dtype_bytes: int = 4) -> list[tuple[str, int]]:
    """Saved bytes with zero matmul recompute on SHAPE: per block and token the tensors backward needs that
    descend from a matmul and cannot be rebuilt without one, plus the block input; plus what lies outside
    the blocks and the blocks' other (shared) inputs, both as measured."""
    h, inter, heads, r = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["heads"], SHAPE["r"]
    per_token = {"block input (hidden_states)": h, "q, k, v projections": 3 * h, "SDPA output": h,
                 "SDPA logsumexp": heads, "o projection output": h, "gate, up projections": 2 * inter,
                 "LoRA u, 7 adapters": 7 * r}
    scale = SHAPE["batch"] * SHAPE["seq"] * SHAPE["layers"] * dtype_bytes
    items = [(name, n * scale) for name, n in per_token.items()]
    return items + [("block inputs: RoPE cos/sin, positions (shared, measured)", extra_input_bytes),
                    ("outside the blocks (measured)", outside_bytes)]


def report_breakdown(provs, ids, sizes=None) -> list[dict]:
    """Prints the breakdown of the two lowcost-LoRA providers and the zero-recompute floor; writes the CSV."""
    by_name = {p.name: p for p in provs}
    rows, infos = [], {}
    for name in BREAKDOWN_PROVIDERS:
        part, info = breakdown(by_name[name], ids)
        if sizes is not None and info["total"] != sizes[name]["saved_bytes"]:
            raise AssertionError(f"{name}: breakdown {info['total']} B != measured {sizes[name]['saved_bytes']} B")
        rows += part
        infos[name] = info
        print(f"\n{name}: {info['total']} B = {info['total'] / 2**20:.3f} MiB (autograd-saved outside frames "
              f"{info['hook_bytes']} B + kept by frames {info['kept_bytes']} B; storages in both: "
              f"{info['overlap_bytes']} B)")
        for row in part:
            print(f"  {row['bytes']:>11,d} B {row['MiB']:9.3f} MiB {100 * row['share']:6.2f}%  {row['category']}")
    none, sel = (infos[n]["total"] for n in BREAKDOWN_PROVIDERS)
    cats = {r["category"]: r["bytes"] for r in rows if r["provider"] == "selective[lowcost-lora]"}
    floor = analytic_floor(infos["selective[lowcost-lora]"]["outside_bytes"],
                           infos["selective[lowcost-lora]"]["extra_input_bytes"])
    matched = {name: sum(cats.get(c, 0) for c in where) for name, where in _FLOOR_MATCH}
    matched["block inputs: RoPE cos/sin, positions (shared, measured)"] = \
        infos["selective[lowcost-lora]"]["extra_input_bytes"]
    matched["outside the blocks (measured)"] = infos["selective[lowcost-lora]"]["outside_bytes"]
    floor_total = sum(b for _, b in floor)
    no_u = floor_total - dict(floor)["LoRA u, 7 adapters"]
    print(f"\nzero-matmul-recompute floor, {SHAPE['layers']} blocks × {SHAPE['batch'] * SHAPE['seq']} tokens "
          f"(analytic; outside-block and shared-input bytes measured):")
    print(f"  {'item':58s} {'floor MiB':>10s} {'selective MiB':>14s}")
    for name, b in floor:
        print(f"  {name:58s} {b / 2**20:10.3f} {matched.get(name, 0) / 2**20:14.3f}")
    excess = {c: b for c, b in cats.items()
              if b and not any(c in where for _, where in _FLOOR_MATCH) and not c.startswith("block inputs")
              and not c.startswith("outside blocks")}
    print(f"  floor {floor_total / 2**20:.3f} MiB = {floor_total / none:.4f}× none[lowcost-lora] "
          f"({no_u / 2**20:.3f} MiB = {no_u / none:.4f}× without the LoRA u tensors); "
          f"selective measured {sel / 2**20:.3f} MiB = {sel / none:.4f}×, {sel - floor_total:+,d} B vs the floor")
    print("  selective bytes outside the floor's items: " +
          (", ".join(f"{c} {b:,d} B" for c, b in excess.items()) if excess else "none"))
    rows += [{"provider": "floor[zero matmul recompute]", "category": name, "bytes": b,
              "MiB": round(b / 2**20, 3), "share": round(b / floor_total, 4)} for name, b in floor]
    path = harness.RESULTS_DIR / "checkpoint_selective_breakdown.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["provider", "category", "bytes", "MiB", "share"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"breakdown → {path}")
    return rows


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", default="0.35", help="bytes ('40MiB') or a fraction of no-checkpoint bytes")
    parser.add_argument("--breakdown-only", action="store_true",
                        help="only the saved-bytes breakdown of none/selective[lowcost-lora] and the "
                             "zero-recompute floor (writes checkpoint_selective_breakdown.csv), plus the saved "
                             "bytes of the lowcost-lora providers it measures (no timing)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        SHAPE.update(QUICK_SHAPE)
        args.rounds = 1
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0))
    if args.breakdown_only:
        provs = lowcost_lora_providers(ids, policies=("selective",))
        check_providers(provs, ids)
        sizes = {p.name: measure_bytes(p, ids) for p in provs}
        report_breakdown(provs, ids, sizes)
        print()
        print_sizes(provs, sizes)
        return 0
    provs = providers(ids, budget)
    check_providers(provs, ids)
    sizes = {p.name: measure_bytes(p, ids) for p in provs}
    report_breakdown(provs, ids, sizes)
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
        print(f"{p.name:32s} saved {row['saved_mib']:8.2f} MiB ({row['ratio_vs_none']:.3f}× none)  "
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
    harness.run_script(main)
