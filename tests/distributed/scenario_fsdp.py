"""FSDP2 scenario (2 ranks): every checkpoint policy and bf16 mixed precision train under ``fully_shard`` per
block plus the root; all-gathers counted per phase; sharding, frozen-gradient and dtype facts recorded;
adapters saved with ``lowcost.save_adapter`` (rank 0 writes) and loaded back into sharded models."""
from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import lowcost
from dist_cases import (DROPOUT_SEED, POLICIES, STEPS, adapter_params, error_message, global_batch, patched,
                        peft_key, save_counting_writes, sgd)
from lowcost.distributed import AllGatherCounter, seed_rank, shard_batch, shard_model
from lowcost.patch.ranks import full_tensors


def _local(step: int) -> dict:
    return shard_batch(global_batch(step))


def _param_checks(model, trainable: dict) -> dict:
    from torch.distributed.tensor import DTensor, Shard
    frozen = [p for p in model.parameters() if not p.requires_grad]
    params = list(model.parameters())
    return {
        "frozen": len(frozen),
        "frozen_without_grad": all(p.grad is None for p in frozen),
        "trainable_with_grad": all(p.grad is not None for p in trainable.values()),
        "all_sharded_dim0": all(isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),) for p in params),
        "frozen_local_numel": sum(p.to_local().numel() for p in frozen),
        "frozen_numel": sum(p.numel() for p in frozen),
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in trainable.values()}),
    }


def train(policy: str, adapter_dir, mixed_precision: bool = False) -> dict:
    model = patched(policy, rank_batch=_local(0))
    mp_policy = None
    if mixed_precision:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_model(model, mp_policy=mp_policy)
    seed_rank(DROPOUT_SEED)
    optimizer, trainable = sgd(model), adapter_params(model)
    gathers_per_step, losses, checks = [], [], {}
    with AllGatherCounter() as gathers:
        for step in range(STEPS):
            gathers.reset()
            gathers.phase("forward")
            loss = model(**_local(step)).loss
            gathers.phase("backward")
            loss.backward()
            checks = checks or _param_checks(model, trainable)
            optimizer.step()
            optimizer.zero_grad()
            gathers_per_step.append(dict(gathers.counts))
            losses.append(loss.item())
    return {"gathers": gathers_per_step, "losses": losses, "checks": checks,
            "writes": save_counting_writes(model, adapter_dir)}


def _max_diff_to_file(model, directory) -> float:
    """Largest |gathered parameter - file tensor| over the adapters (collective; rank 0 compares)."""
    full = full_tensors(adapter_params(model))
    if dist.get_rank() != 0:
        return 0.0
    saved = load_file(str(directory / "adapter_model.safetensors"))
    assert set(saved) == {peft_key(n) for n in full}, sorted(saved)
    return max((full[n] - saved[peft_key(n)]).abs().max().item() for n in full)


def load_back(directory) -> dict:
    """load_adapter into a sharded patched model and into a patched model sharded afterwards."""
    sharded_first = patched("none")
    shard_model(sharded_first)
    lowcost.load_adapter(sharded_first, directory)
    loaded_first = patched("none")
    lowcost.load_adapter(loaded_first, directory)
    shard_model(loaded_first)
    unpatched = patched("none")
    lowcost.unapply(unpatched)
    shard_model(unpatched)
    return {"sharded_then_loaded": _max_diff_to_file(sharded_first, directory),
            "loaded_then_sharded": _max_diff_to_file(loaded_first, directory),
            "load_into_unpatched_sharded": error_message(lambda: lowcost.load_adapter(unpatched, directory)),
            "apply_after_fully_shard": error_message(lambda: lowcost.apply(unpatched, lora=lowcost.LoRAConfig(r=2)))}


def run(out_dir) -> dict:
    result = {"policies": {p: train(p, out_dir / f"fsdp-{p}") for p in POLICIES}}
    result["bf16"] = train("full", out_dir / "fsdp-bf16", mixed_precision=True)
    result["load"] = load_back(out_dir / "fsdp-full")
    return result
