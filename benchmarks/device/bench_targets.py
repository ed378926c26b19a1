"""The GPU targets of issues #12 and #13, in one run (for benchmarks/device/run.sh's ``targets`` part).

    python benchmarks/device/bench_targets.py --out DIR          # on a GPU: bf16, the shapes below
    python benchmarks/device/bench_targets.py --dry-run --out DIR  # no GPU: tiny shapes on the CPU (torch
                                                                  # backend), to check the script runs

``layer`` (#12): one Llama-3-8B decoder layer (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, RMSNorm,
SwiGLU, sdpa attention), bf16, 8192 tokens (batch 1), forward + backward to the layer's input (the input requires
grad, as inside a model). Providers, timed round-robin in the same run:
- ``frozen``: the layer without LoRA, every weight frozen: the floor;
- ``lowcost <backend> p=<p>``: ``lowcost.apply`` with LoRA r=16, alpha 32 on all seven projections and the default
  fusions ("mlp", "norm", "qkv"; there is no lm_head), for each backend that runs (triton, cuda) and p in {0, 0.05};
- ``peft p=<p>``: PEFT's LoRA with the same settings, where peft is installed.
Target: lowcost ≤ 1.08× frozen. Each row also has the step's peak allocated memory above the weights.

``qlora`` (#13): the LoRA linear op (``lowcost.ops.lora_linear``), M = 8192, K = 4096, N ∈ {4096, 14336}, r = 16, bf16,
forward + backward (dx, dA, dB), on the dense bf16 W and on its NF4 (block 64) quantization, per backend; and
bitsandbytes' ``Linear4bit`` (NF4, bf16 compute) under PEFT's LoRA where bitsandbytes has CUDA. Target: NF4 ≤ 1.15×
the bf16 fused op, and faster than bitsandbytes + PEFT.

Times: CUDA events around ``--repeats`` steps, the median of ``--batches`` batches, after warm-up steps (Triton's
JIT and the autotuning happen there). Rows go to DIR/targets.csv (default: benchmarks/results/targets.csv), with
the hardware, versions and git sha; a summary line per target is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
LAYER = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "tokens": 8192}
LAYER_DRY = {"hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "tokens": 48}
QLORA_SHAPES = ((8192, 4096, 4096), (8192, 4096, 14336))
QLORA_SHAPES_DRY = ((33, 128, 48),)
RANK, ALPHA, TARGET_LAYER, TARGET_NF4 = 16, 32, 1.08, 1.15


@dataclass
class Provider:
    name: str
    step: Callable[[], None]
    samples: list = field(default_factory=list)
    peak_mib: Optional[float] = None


def _setup(dry_run: bool):
    import torch
    if dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # benchmarks/ for harness; lowcost is the installed package (the repository root is not put on the path: its
    # kernels/ directory would shadow a third-party package named "kernels" that bitsandbytes imports)
    sys.path.insert(0, str(REPO / "benchmarks"))
    return torch


def time_batch(torch, step, device, repeats: int) -> float:
    """Mean ms of ``repeats`` back-to-back steps (CUDA events on a GPU, the wall clock otherwise)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) * 1e3 / repeats


def peak_mib(torch, step, device) -> Optional[float]:
    """Peak allocated memory of one step above what was allocated before it (MiB); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def run_round_robin(torch, providers: list[Provider], device, repeats: int, batches: int, warmup: int) -> None:
    for p in providers:
        for _ in range(warmup):
            p.step()
        p.peak_mib = peak_mib(torch, p.step, device)
    for b in range(batches):
        for p in providers:
            p.samples.append(time_batch(torch, p.step, device, repeats))
        print(f"  batch {b + 1}/{batches} done", flush=True)


# ----------------------------------------------------------------------------------------------- #12: layer
def _layer_model(torch, shape: dict, dtype, device):
    """A one-layer Llama (vocab 256: the embedding and head are never run) with fixed random weights."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                   num_hidden_layers=1, num_attention_heads=shape["heads"],
                                   num_key_value_heads=shape["kv_heads"], vocab_size=256, use_cache=False,
                                   attn_implementation="sdpa", tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _layer_step(torch, model, x, grad):
    """Forward through the decoder (layer + final norm) from embeddings, backward to them."""
    def step():
        x.grad = None
        model.model(inputs_embeds=x).last_hidden_state.backward(grad)
    return step


def layer_providers(torch, shape: dict, dtype, device, backends: list[str]) -> list[Provider]:
    import lowcost
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1, shape["tokens"], shape["hidden"], generator=gen) * 0.5).to(device=device, dtype=dtype)
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    frozen = _layer_model(torch, shape, dtype, device).requires_grad_(False)
    out = [Provider("frozen", _layer_step(torch, frozen, x, grad))]
    for backend in backends:
        for p in (0.0, 0.05):
            model = _layer_model(torch, shape, dtype, device)
            report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=RANK, alpha=ALPHA, dropout=p, backend=backend),
                                   fused=("mlp", "norm", "qkv"))
            print(f"lowcost {backend} p={p}: {report.fusion}", flush=True)
            _nonzero_b(torch, model)
            out.append(Provider(f"lowcost {backend} p={p}", _layer_step(torch, model, x, grad)))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft is not installed: no PEFT rows", flush=True)
        return out
    for p in (0.0, 0.05):
        model = get_peft_model(_layer_model(torch, shape, dtype, device),
                               LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules="all-linear"))
        _nonzero_b(torch, model)
        out.append(Provider(f"peft p={p}", _layer_step(torch, model.base_model.model, x, grad)))
    return out


def _nonzero_b(torch, model) -> None:
    """LoRA B starts at zero; give it values so no kernel can skip work on zeros."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name.lower():
                param.normal_(0.0, 0.01)


# ----------------------------------------------------------------------------------------------- #13: qlora op
def _nf4(torch, dense):
    from lowcost.reference.quant import QuantizedWeight, quantize_nf4
    return QuantizedWeight("nf4", tuple(dense.shape), quantize_nf4(dense.double().cpu(), 64, False), 64,
                           dense.dtype).to(dense.device)


def _op_step(torch, x, weight, a, b, grad, backend):
    import lowcost

    def step():
        for t in (x, a, b):
            t.grad = None
        y = lowcost.ops.lora_linear(x, weight, a, b, ALPHA / RANK, None, 0.0, 1, backend=backend)
        y.backward(grad)
    return step


def qlora_providers(torch, shape, dtype, device, backends: list[str]) -> list[Provider]:
    M, K, N = shape
    gen = torch.Generator().manual_seed(2)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
    x, w = rand(M, K).requires_grad_(), rand(N, K, std=K ** -0.5)
    a, b, grad = rand(RANK, K, std=K ** -0.5).requires_grad_(), rand(N, RANK, std=0.01).requires_grad_(), rand(M, N)
    nf4 = _nf4(torch, w)
    out = []
    for backend in backends:
        out.append(Provider(f"{backend} bf16 W", _op_step(torch, x, w, a, b, grad, backend)))
        out.append(Provider(f"{backend} nf4 W", _op_step(torch, x, nf4, a, b, grad, backend)))
    try:   # a third-party baseline: its failure must not cost the run's other rows
        bnb = _bitsandbytes_provider(torch, w, x, grad, device)
        if bnb is not None:
            bnb.step()
    except Exception as err:  # noqa: BLE001
        print(f"bitsandbytes + PEFT row skipped: {type(err).__name__}: {err}", flush=True)
        bnb = None
    return out + ([bnb] if bnb else [])


def _bitsandbytes_provider(torch, w, x, grad, device) -> Optional[Provider]:
    """bitsandbytes' Linear4bit (NF4, bf16 compute) with PEFT's LoRA, where both import and run on this device."""
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        print(f"bitsandbytes + PEFT row skipped: {err}", flush=True)
        return None
    N, K = w.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=w.dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4")
    holder = torch.nn.Sequential(layer).to(device)
    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["0"]))
    _nonzero_b(torch, model)

    def step():
        x.grad = None
        model(x).backward(grad)
    return Provider("bitsandbytes nf4 + peft", step)


# ----------------------------------------------------------------------------------------------- main
def _rows(part: str, shape_text: str, providers: list[Provider], floor_name: str, dtype) -> list[dict]:
    floor = statistics.median(next(p for p in providers if p.name == floor_name).samples)
    rows = []
    for p in providers:
        ms = statistics.median(p.samples)
        rows.append({"part": part, "shape": shape_text, "provider": p.name, "dtype": str(dtype).split(".")[-1],
                     "median_ms": round(ms, 4), "min_ms": round(min(p.samples), 4), "vs": floor_name,
                     "ratio": round(ms / floor, 4), "peak_mib": p.peak_mib, "batches": len(p.samples)})
        print(f"  {p.name:28s} {ms:10.3f} ms  {ms / floor:6.3f}× {floor_name}"
              + (f"  peak +{p.peak_mib} MiB" if p.peak_mib is not None else ""), flush=True)
    return rows


def _available_backends(torch, device, dry_run: bool) -> list[str]:
    if dry_run and device.type != "cuda":
        return ["torch"]
    from lowcost.ops.backend import cuda_kernels_usable, triton_usable
    return (["triton"] if triton_usable(device) else []) + (["cuda"] if cuda_kernels_usable(device) else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["layer", "qlora"], choices=["layer", "qlora"])
    parser.add_argument("--repeats", type=int, default=5, help="steps per timed batch")
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--out", help="directory for targets.csv (default: benchmarks/results/)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU when there is no GPU")
    args = parser.parse_args(argv)
    torch = _setup(args.dry_run)
    import harness
    device = harness.device_for_run(args.dry_run)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats, batches, warmup = (1, 2, 1) if args.dry_run else (args.repeats, args.batches, 3)
    backends = _available_backends(torch, device, args.dry_run)
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}  backends: {backends}", flush=True)
    if not backends:
        print("error: neither the Triton nor the CUDA kernels can run here", file=sys.stderr)
        return 2
    rows = []
    if "layer" in args.parts:
        shape = LAYER_DRY if args.dry_run else LAYER
        text = "llama8b-layer h{hidden} I{intermediate} heads{heads}/{kv_heads} T{tokens} r16".format(**shape)
        print(f"layer: {text}", flush=True)
        provs = layer_providers(torch, shape, dtype, device, backends)
        run_round_robin(torch, provs, device, repeats, batches, warmup)
        rows += _rows("layer", text, provs, "frozen", dtype)
        best = min(r["ratio"] for r in rows if r["part"] == "layer" and r["provider"].startswith("lowcost"))
        print(f"target #12: lowcost layer ≤ {TARGET_LAYER}× frozen: best {best:.3f}×", flush=True)
        del provs
    if "qlora" in args.parts:
        for M, K, N in (QLORA_SHAPES_DRY if args.dry_run else QLORA_SHAPES):
            text = f"{M}x{K}->{N} r{RANK}"
            print(f"qlora: {text}", flush=True)
            provs = qlora_providers(torch, (M, K, N), dtype, device, backends)
            run_round_robin(torch, provs, device, repeats, batches, warmup)
            part_rows = _rows("qlora", text, provs, f"{backends[0]} bf16 W", dtype)
            rows += part_rows
            for backend in backends:
                ms = {r["provider"]: r["median_ms"] for r in part_rows}
                print(f"target #13 ({text}, {backend}): nf4 / bf16 = "
                      f"{ms[f'{backend} nf4 W'] / ms[f'{backend} bf16 W']:.3f} (≤ {TARGET_NF4})", flush=True)
            del provs
    path = harness.append_rows_to(args.out, "targets.csv", rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
