"""Quantized-base scenario (2 ranks, FSDP2 and DDP): a Llama whose linear layers are NF4 or int8 trains LoRA
(dropout on, ``full`` checkpointing) for 3 SGD steps; the adapters are saved with ``lowcost.save_adapter``.

The quantized codes and scales are buffers, so FSDP2 keeps them whole on every rank (replicated, as DDP
does) and shards only the float parameters; the scenario records what each rank holds so the test can
check that, and that the packed bytes are identical on both ranks."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lowcost
from dist_cases import DROPOUT_SEED, local_steps, patched, sgd
from lowcost.distributed import seed_rank, shard_model
from lowcost.reference.quant.weight import QuantizedWeight

SCHEMES = ("nf4", "int8")


def _storage_facts(model) -> dict:
    from torch.distributed.tensor import DTensor
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    digest = hashlib.sha256()
    for weight in quantized:
        for tensor in weight.packed:
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return {"quantized_layers": len(quantized),
            "packed_are_plain_tensors": all(not isinstance(t, DTensor) for w in quantized for t in w.packed),
            "packed_bytes": sum(w.nbytes for w in quantized),
            "packed_sha256": digest.hexdigest(),
            "float_params_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


def train(scheme: str, wrap: str, adapter_dir) -> dict:
    model = patched("full", quantize=scheme)
    if wrap == "fsdp":
        shard_model(model)
        trained = model
    else:
        trained = DDP(model)
    seed_rank(DROPOUT_SEED)
    losses = local_steps(trained, sgd(model))
    lowcost.save_adapter(model, adapter_dir)
    return {"losses": losses, "storage": _storage_facts(model)}


def run(out_dir) -> dict:
    return {f"{wrap}-{scheme}": train(scheme, wrap, out_dir / f"{wrap}-{scheme}")
            for scheme in SCHEMES for wrap in ("fsdp", "ddp")}
