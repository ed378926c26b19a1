"""Offload vs full checkpointing at 4k+ tokens: step time and the activation bytes left on the device.

Issue #4's GPU target: ``offload`` within +2 % of ``full``'s step time at ≤ 0.05× the no-checkpoint
activation bytes, at 4k+ tokens. Model: a Llama from a config with fused LoRA on every linear of the blocks
(``lowcost.apply``), run on ``--device`` in ``--dtype``. Providers, timed round-robin in one run: no
checkpointing, ``full``, ``offload`` (block inputs to pinned host memory on a side stream, prefetched one
block ahead in backward).

Device bytes are exact: ``lowcost.checkpoint.track(hook=True)`` counts the storages autograd saves outside
lowcost frames and what the frames keep (inputs, offload buffers), each once, by device; host copies are
reported apart. Rows go
to benchmarks/results/offload.csv. Before timing, each setup's loss and gradients are checked against no
checkpointing (``bench_checkpoint.check_providers``): a setup that changes the result is refused.
``--quick``: a tiny float32 model on the CPU, one round.

    python benchmarks/bench_offload.py --device cuda                       # the device script's run
    python benchmarks/bench_offload.py --device cpu --tokens 512 --layers 2 --hidden 256 --repeats 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
import lowcost  # noqa: E402
from lowcost.checkpoint import CheckpointConfig, apply_checkpointing, track  # noqa: E402
from lowcost.checkpoint.install import resolve_blocks, uninstall  # noqa: E402
from bench_checkpoint import Provider, check_providers  # noqa: E402  (a model + how to switch a setup on/off)


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or int(2.6875 * args.hidden),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, vocab_size=args.vocab, use_cache=False,
                      max_position_embeddings=max(4096, args.seq), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
    return model.train()


def device_bytes(setup: Provider, forward, device) -> dict:
    """Device and host bytes kept for backward by one forward under ``setup``: ``track(hook=True)`` sees
    what autograd saves outside lowcost frames and what the frames keep, each storage once, by device."""
    setup.on()
    try:
        with track(list(setup.model.parameters()), hook=True) as kept:
            loss = forward()
        del loss
    finally:
        setup.off()
    host = kept.bytes(device_type="cpu") if device.type != "cpu" else kept.bytes(kinds=["offload"])
    return {"device_bytes": kept.bytes(device_type=device.type), "host_bytes": host}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=0, help="shortcut: batch 1 × this many tokens")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a tiny float32 model on the CPU (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.dtype, args.hidden, args.layers, args.heads = "cpu", "float32", 64, 2, 4
        args.vocab, args.tokens, args.repeats = 256, 128, 1
    if args.tokens:
        args.batch, args.seq = 1, args.tokens
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args, device, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def forward():
        return model(input_ids=ids, labels=ids).loss

    setups = [Provider("none", model, "plain")]
    for policy in ("full", "offload"):
        report = apply_checkpointing(model, CheckpointConfig(policy=policy))
        uninstall(resolve_blocks(model))
        setups.append(Provider(policy, model, "lowcost", report.decisions))
    check_providers(setups, ids)
    sizes = {}
    for s in setups:
        sizes[s.name] = device_bytes(s, forward, device)
        print(f"{s.name:8s} device bytes {sizes[s.name]['device_bytes'] / 2**20:9.2f} MiB, host "
              f"{sizes[s.name]['host_bytes'] / 2**20:8.2f} MiB", flush=True)

    def step():
        model.zero_grad(set_to_none=True)
        forward().backward()

    samples = {s.name: [] for s in setups}
    for round_ in range(args.repeats + 1):            # round 0 warms up; on/off stay outside the timing
        for s in setups:
            s.on()
            try:
                ms = harness.time_step(step, device, warmup=1 if round_ == 0 else 0, repeats=1)["median_ms"]
            finally:
                s.off()
            if round_:
                samples[s.name].append(ms)
        print(f"\r  timing round {round_}/{args.repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    times = {name: {"median_ms": statistics.median(v)} for name, v in samples.items()}
    base, full = sizes["none"]["device_bytes"], times["full"]["median_ms"]
    rows = []
    for s in setups:
        t = times[s.name]
        rows.append({"provider": s.name, "tokens": args.batch * args.seq, "device": args.device,
                     "dtype": args.dtype, "shape": f"h{args.hidden} L{args.layers} B{args.batch} S{args.seq} "
                     f"V{args.vocab}", **sizes[s.name],
                     "ratio_vs_none": round(sizes[s.name]["device_bytes"] / base, 4),
                     "median_ms": round(t["median_ms"], 3), "time_vs_full": round(t["median_ms"] / full, 4),
                     "repeats": args.repeats})
        print(f"{s.name:8s} {rows[-1]['ratio_vs_none']:.4f}× none's device bytes, step "
              f"{t['median_ms']:.2f} ms ({rows[-1]['time_vs_full']:.3f}× full)", flush=True)
    offload = rows[-1]
    print(f"target (GPU): offload ≤ 1.02× full's time and ≤ 0.05× none's bytes: time "
          f"{offload['time_vs_full']:.3f}×, bytes {offload['ratio_vs_none']:.4f}×")
    print(f"rows → {harness.append_rows('offload.csv', rows)}")
    return 0


if __name__ == "__main__":
    harness.run_script(main)
