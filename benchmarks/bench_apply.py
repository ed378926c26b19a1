"""Model-level LoRA: ``lowcost.apply`` vs PEFT ``get_peft_model`` on a Llama-shaped model, LoRA all-linear.

    python benchmarks/bench_apply.py                                   # reference size, CPU
    python benchmarks/bench_apply.py --hidden 256 --seq 128 --batch 2  # smaller

One step is ``model(input_ids, labels).loss.backward()`` (training mode, so dropout is live). Reports the
median step time with its 20th–80th percentile spread and the saved-activation bytes of one forward,
counted exactly: distinct non-parameter storages seen by ``saved_tensors_hooks`` (the lowcost op keeps
nothing elsewhere: only floats/strings on ctx; PEFT's layers are plain modules that keep nothing else
either). A frozen model without LoRA is the floor. Rows go to benchmarks/results/apply.csv.

Before timing, each provider's loss and gradients (of the LoRA matrices; of the embedding for the floor) are
checked against a float64 copy of the PEFT model (of the floor) in eval mode, i.e. without dropout, whose
masks are each provider's own; a provider off by more than 1e-4 (relative) is refused and nothing is written.
``--quick``: a tiny model, 2 repeats.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowcost  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    return LlamaForCausalLM(config).train()


def make_providers(args, dropout: float) -> dict:
    """name → patched model; the same base weights and adapter values in each."""
    floor = build(args).requires_grad_(False)
    floor.model.embed_tokens.weight.requires_grad_(True)      # so that backward runs through the blocks
    ours = build(args)
    lowcost.apply(ours, lora=lowcost.LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=dropout))
    from lowcost.patch import lora_layers
    layers = lora_layers(ours)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    providers = {"frozen (no LoRA)": floor, "lowcost": ours}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft not installed: skipping the PEFT provider", file=sys.stderr)
        return providers
    peft_model = get_peft_model(build(args), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                        lora_dropout=dropout, target_modules=sorted(layers)))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[f"base_model.model.{name}"].lora_A["default"].weight.copy_(layer.lora_A)
            modules[f"base_model.model.{name}"].lora_B["default"].weight.copy_(layer.lora_B)
    providers["peft"] = peft_model.train()
    return providers


TOLERANCE = 1e-4


def _outputs(model, ids, modules) -> dict:
    """Loss and gradients of one eval-mode step: dA/dB of each adapted module in ``modules`` (name → the
    module holding them), or the embedding's gradient when ``modules`` is empty (the frozen floor)."""
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        model.train()
    out = {"loss": loss.detach()}
    for name, module in modules.items():
        a, b = (module.lora_A, module.lora_B) if hasattr(module.lora_A, "grad") else \
            (module.lora_A["default"].weight, module.lora_B["default"].weight)
        out[f"{name}.dA"], out[f"{name}.dB"] = a.grad, b.grad
    if not modules:
        out["embedding.grad"] = model.get_input_embeddings().weight.grad
    return out


def _reference(model, ids, names) -> dict:
    """``_outputs`` of a float64 copy of ``model`` (PEFT's, or lowcost's when PEFT is missing)."""
    import copy
    from lowcost.patch import lora_layers
    ref = copy.deepcopy(model).double()
    modules = dict(ref.named_modules())
    held = {n: modules[f"base_model.model.{n}"] for n in names} if f"base_model.model.{names[0]}" in modules \
        else {n: m for n, m in lora_layers(ref).items() if n in names}
    return _outputs(ref, ids, held)


def check_models(models: dict, ids) -> None:
    """Every provider against a float64 copy (``harness.check_providers``) before any timing."""
    import copy
    from lowcost.patch import lora_layers
    floor = models["frozen (no LoRA)"]
    harness.check_providers(_outputs(copy.deepcopy(floor).double(), ids, {}),
                            {"frozen (no LoRA)": _outputs(floor, ids, {})}, TOLERANCE)
    ours = lora_layers(models["lowcost"])
    got = {"lowcost": _outputs(models["lowcost"], ids, ours)}
    if "peft" in models:
        peft = dict(models["peft"].named_modules())
        got["peft"] = _outputs(models["peft"], ids, {n: peft[f"base_model.model.{n}"] for n in ours})
    harness.check_providers(_reference(models.get("peft", models["lowcost"]), ids, sorted(ours)), got, TOLERANCE)
    for model in models.values():
        model.zero_grad(set_to_none=True)


def bench(args, dropout: float) -> list[dict]:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = make_providers(args, dropout)
    check_models(models, ids)

    def step_of(model):
        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return step

    timings = harness.time_interleaved({name: step_of(m) for name, m in models.items()}, torch.device("cpu"),
                                       warmup=args.warmup, repeats=args.repeats)
    rows = []
    for name, model in models.items():
        timing = timings[name]
        saved = harness.saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss,
                                               list(model.parameters()))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"provider": name, "hidden": args.hidden, "intermediate": args.intermediate,
                     "layers": args.layers, "seq": args.seq, "batch": args.batch, "vocab": args.vocab,
                     "r": args.rank, "dropout": dropout, "trainable": trainable,
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
                     "saved_bytes": saved})
        print(f"  {name:18s} {timing['median_ms']:9.1f} ms [{timing['p20_ms']:.1f}, {timing['p80_ms']:.1f}]"
              f"  saved {saved / 2**20:8.2f} MiB", flush=True)
    ref = {row["provider"]: row for row in rows}.get("peft")
    for row in rows:
        row["time_vs_peft"] = round(row["median_ms"] / ref["median_ms"], 4) if ref else ""
        row["saved_vs_peft"] = round(row["saved_bytes"] / ref["saved_bytes"], 4) if ref else ""
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("hidden", 512), ("intermediate", 1376), ("layers", 4), ("heads", 8), ("kv_heads", 4),
                          ("seq", 256), ("batch", 4), ("vocab", 2048), ("rank", 16), ("warmup", 2),
                          ("repeats", 5)):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.05])
    parser.add_argument("--results", default="apply.csv", help="file name under benchmarks/results/")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 repeats (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 176, 2, 4, 2
        args.seq, args.batch, args.vocab, args.warmup, args.repeats = 32, 2, 256, 1, 2
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    rows = []
    for dropout in args.dropouts:
        print(f"llama hidden={args.hidden} layers={args.layers} seq={args.seq} batch={args.batch} r={args.rank} "
              f"dropout={dropout}", flush=True)
        rows += bench(args, dropout)
    print(f"appended {len(rows)} rows to {harness.append_rows(args.results, rows)}")


if __name__ == "__main__":
    harness.run_script(main)
