"""Quantized-base scenario (2 ranks, FSDP2 and DDP): a Llama whose linear layers are NF4 or int8 trains LoRA
(dropout on, ``full`` checkpointing) for 3 SGD steps; the adapters are saved with ``lowcost.save_adapter``.

Under FSDP2 (``shard_model``) the packed codes and scales are sharded by rows like the float parameters:
the scenario records, per rank, each stored tensor's placement and local rows, the bytes the rank holds,
the gathered tensors' hash, the all-gathers of each step, and the stored dtypes seen inside a block's
forward under ``MixedPrecisionPolicy(param_dtype=bf16)``. DDP keeps them whole on every rank. A lone
quantized linear of 5 rows in each format (so FSDP2 pads rank 1's shard) runs with garbage in the padding."""
from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lowcost
from dist_cases import DROPOUT_SEED, counted_steps, error_message, patched, save_counting_writes, sgd
from lowcost.distributed import seed_rank, shard_model
from lowcost.nn.quantized import QuantizedLinear
from lowcost.reference.quant.weight import QuantizedWeight

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))   # quant_cases: every stored format

SCHEMES = ("nf4", "int8")
PADDED_SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_k", "q6_k")
ODD_ROWS = 5


def quantized_weights(model) -> list[QuantizedWeight]:
    return [m for m in model.modules() if isinstance(m, QuantizedWeight)]


def packed_sha256(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:  # a copy: .numpy() would pin FSDP2's gathered storage (it must stay resizable)
        digest.update(tensor.detach().clone().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_facts(weight: QuantizedWeight) -> list[dict]:
    from torch.distributed.tensor import DTensor
    facts = []
    for t in weight._stored():
        sharded = isinstance(t, DTensor)
        local = t.to_local() if sharded else t
        facts.append({"shape": list(t.shape), "dtype": str(t.dtype), "sharded": sharded,
                      "placements": [str(p) for p in t.placements] if sharded else [],
                      "local_rows": local.shape[0] if local.dim() else -1, "row_bytes": _row_bytes(t),
                      "local_bytes": local.numel() * local.element_size(),
                      "parameter": isinstance(t, torch.nn.Parameter)})
    return facts


def _row_bytes(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] * t.element_size() if t.dim() and t.shape[0] else 0


def gathered_packed(weight: QuantizedWeight) -> list[torch.Tensor]:
    """The whole packed tensors, each shard all-gathered (collective: same order on every rank)."""
    from lowcost.reference.quant import quant_format
    from torch.distributed.tensor import DTensor
    out = []
    for name, t in zip(quant_format(weight.scheme).tensor_names, weight._stored()):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        out.append(full.view(weight.bitcast[name]) if name in weight.bitcast else full)
    return out


def _storage_facts(model) -> dict:
    from torch.distributed.tensor import DTensor
    weights = quantized_weights(model)
    return {"quantized_layers": len(weights),
            "stored": [stored_facts(w) for w in weights],
            "resident_bytes": sum(w.resident_nbytes for w in weights),
            "total_bytes": sum(w.nbytes for w in weights),
            "gathered_sha256": packed_sha256(t for w in weights for t in gathered_packed(w)),
            "packed_outside_forward": error_message(lambda: weights[0].packed),
            "state_dict": _quantized_state_dict_facts(model),
            "float_params_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


def _quantized_state_dict_facts(model) -> dict:
    """dtypes and the gathered bytes' hash of the model's state-dict entries of quantized tensors (collective)."""
    from lowcost.reference.quant import quant_format
    from torch.distributed.tensor import DTensor
    names = {f"{prefix}.{n}" for prefix, w in model.named_modules() if isinstance(w, QuantizedWeight)
             for n in quant_format(w.scheme).tensor_names}
    entries = {k: v for k, v in model.state_dict().items() if k in names}
    full = [entries[k].full_tensor() if isinstance(entries[k], DTensor) else entries[k] for k in sorted(entries)]
    return {"keys": len(entries), "dtypes": sorted({str(v.dtype) for v in entries.values()}),
            "sha256": packed_sha256(full)}


def _watch_dtypes(model) -> dict:
    """Records the stored and packed dtypes of block 0's first quantized weight inside its forward."""
    block = model.model.layers[0]
    weight = quantized_weights(block)[0]
    seen: dict = {}

    def record(module, args, kwargs):
        if not seen:
            seen["stored"] = [str(t.dtype) for t in weight._stored()]
            seen["stored_types"] = sorted({type(t).__name__ for t in weight._stored()})
            seen["packed"] = [str(t.dtype) for t in weight.packed]
            seen["packed_sha256"] = packed_sha256(weight.packed)
        return None
    block.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def train(scheme: str, wrap: str, adapter_dir, mixed_precision: bool = False) -> dict:
    model = patched("full", quantize=scheme)
    seen: dict = {}
    if wrap == "fsdp":
        mp_policy = None
        if mixed_precision:
            from torch.distributed.fsdp import MixedPrecisionPolicy
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(model, mp_policy=mp_policy)
        seen = _watch_dtypes(model)
        trained = model
    else:
        trained = DDP(model)
    seed_rank(DROPOUT_SEED)
    losses, gathers_per_step = counted_steps(trained, sgd(model))
    writes = save_counting_writes(model, adapter_dir)
    return {"writes": writes, "losses": losses, "storage": _storage_facts(model), "gathers": gathers_per_step, "inside_forward": seen}


def padded_shard(scheme: str) -> dict:
    """A lone (5, K) quantized linear under fully_shard on 2 ranks: rank 1's shard has 2 rows and 1 padding
    row, filled here with 0xFF bytes. Output and dx must equal the unsharded layer's exactly."""
    from quant_cases import k_for, make_quantized
    K = k_for(scheme, 64)
    layer = QuantizedLinear(make_quantized(scheme, ODD_ROWS, K, seed=7))
    unsharded = copy.deepcopy(layer)
    shard_model(layer, blocks=[])
    padding = _fill_padding(layer.weight)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(11), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), unsharded(x_ref)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(12))
    y.backward(g)
    y_ref.backward(g)
    return {"padding_bytes_filled": padding, "y_equal": torch.equal(y, y_ref),
            "dx_equal": torch.equal(x.grad, x_ref.grad), "y_shape": list(y.shape)}


def _fill_padding(weight: QuantizedWeight) -> int:
    """Writes 0xFF into the bytes of this rank's shard storage beyond its rows; returns how many."""
    from torch.distributed.tensor import DTensor
    filled = 0
    for t in weight._stored():
        if not isinstance(t, DTensor):
            continue          # nf4-dq's group constants: whole buffers
        local = t.to_local()
        storage = local.untyped_storage()
        used = local.storage_offset() * local.element_size() + local.numel() * local.element_size()
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        raw[used:].fill_(0xFF)
        filled += raw.numel() - used
    return filled


def run(out_dir) -> dict:
    result = {f"{wrap}-{scheme}": train(scheme, wrap, out_dir / f"{wrap}-{scheme}")
              for scheme in SCHEMES for wrap in ("fsdp", "ddp")}
    result["fsdp-nf4-bf16"] = train("nf4", "fsdp", out_dir / "fsdp-nf4-bf16", mixed_precision=True)
    result["padded"] = {scheme: padded_shard(scheme) for scheme in PADDED_SCHEMES}
    result["rank"], result["world"] = dist.get_rank(), dist.get_world_size()
    return result
