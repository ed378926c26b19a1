"""GGUF-file scenario (2 ranks, FSDP2): a tiny Llama loaded from a GGUF file with its blocks kept
(``load_pretrained(path, quantize="gguf")``) trains LoRA (dropout on, ``full`` checkpointing) for 3 SGD steps
under ``shard_model(shard_quantized=True)``; the adapters are saved with ``lowcost.save_adapter``.

Two files, written by the test into the output folder before the launch (``FILES``): ``mixed.gguf`` (Q4_0,
Q4_1, Q8_0, Q4_K and Q6_K blocks, written by the ``gguf`` package's writer and quantizer) and ``q8_0.gguf``
(that model exported by ``lowcost.export_gguf(dtype="q8_0")``). Per file and rank the scenario records each
packed GGUF tensor's placement, local rows and bytes, the hash of its all-gathered bytes (per tensor), the
all-gathers of each step, the logits of the trained sharded model on ``EVAL_IDS``, what ``export_gguf``
says about the sharded model, and the export made by rank 0 inside ``lowcost.distributed.unsharded``."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import lowcost
from dist_cases import DROPOUT_SEED, INIT_SEED, VOCAB, counted_steps, error_message, lora_config, \
    save_counting_writes, sgd
from lowcost.distributed import seed_rank, shard_model, unsharded
from lowcost.reference.quant import QuantizedWeight
from scenario_quantized import gathered_packed, packed_sha256, stored_facts

FILES = {"mixed": "f16", "q8_0": "q8_0"}   # file stem -> dtype of the export of the trained model
EVAL_IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(77))


def gguf_patched(path, policy: str = "none", dropout: float = 0.1):
    """The model every run starts from: the file's blocks kept, LoRA (seeded init) and the policy installed."""
    model = lowcost.load_pretrained(path, quantize="gguf", verbose=False)
    torch.manual_seed(INIT_SEED)
    checkpoint = None if policy == "none" else lowcost.CheckpointConfig(policy=policy)
    lowcost.apply(model, lora=lora_config(dropout), checkpoint=checkpoint)
    return model


def weight_key(module_name: str) -> str:
    """The model's state-dict key of a QuantizedWeight module (its name, LoRA's ``base_layer`` left out)."""
    return module_name.replace(".base_layer", "")


def eval_logits(model) -> list:
    model.eval()
    with torch.no_grad():
        logits = model(EVAL_IDS).logits
    model.train()
    return logits.tolist()


def _blocks(model) -> dict:
    """Per packed GGUF tensor (by model key): its scheme, shard facts and the hash of its gathered bytes."""
    out = {}
    for name, weight in model.named_modules():
        if isinstance(weight, QuantizedWeight):
            (facts,) = stored_facts(weight)               # a GGUF weight stores one tensor: its raw blocks
            out[weight_key(name)] = {**facts, "scheme": weight.scheme, "resident_bytes": weight.resident_nbytes,
                                     "nbytes": weight.nbytes, "gathered_sha256": packed_sha256(gathered_packed(weight))}
    return out


def _export(model, out: Path, dtype: str) -> dict:
    """Refused while sharded; then, gathered on every rank, written by rank 0 alone; resharded after."""
    refused = error_message(lambda: lowcost.export_gguf(model, out / "refused.gguf", dtype=dtype))
    before = eval_logits(model)
    with unsharded(model):
        whole_inside = not any(type(p).__name__ == "DTensor" for p in model.parameters())
        if dist.get_rank() == 0:
            lowcost.export_gguf(model, out / "tuned.gguf", dtype=dtype)
    dist.barrier()
    return {"refused": refused, "refused_file_exists": (out / "refused.gguf").exists(),
            "whole_inside": whole_inside,
            "resharded_after": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "logits_unchanged_after": eval_logits(model) == before}


def train(path: Path, out: Path, dtype: str) -> dict:
    model = gguf_patched(path, "full")
    shard_model(model, shard_quantized=True)
    seed_rank(DROPOUT_SEED)
    losses, gathers = counted_steps(model, sgd(model))
    writes = save_counting_writes(model, out / "adapter")
    return {"losses": losses, "gathers": gathers, "writes": writes, "blocks": _blocks(model),
            "logits": eval_logits(model), "export": _export(model, out, dtype)}


def run(out_dir) -> dict:
    out_dir = Path(out_dir)
    result = {stem: train(out_dir / f"{stem}.gguf", out_dir / stem, dtype) for stem, dtype in FILES.items()}
    result["rank"], result["world"] = dist.get_rank(), dist.get_world_size()
    return result
