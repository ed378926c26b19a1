"""DDP scenario (2 ranks): bad input first (mismatched LoRA configs across ranks, a rank whose apply fails,
apply after DDP, a world size that does not divide the batch), then every checkpoint policy trains under
``DistributedDataParallel`` (no static_graph, find_unused_parameters=False) and saves its adapter."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lowcost
import lowcost.distributed
from dist_cases import (DROPOUT_SEED, POLICIES, build_llama, error_message, global_batch, local_steps, lora_config,
                        patched, save_counting_writes, sgd)
from lowcost.distributed import seed_rank, shard_batch
from lowcost.patch import patch_state


def bad_input() -> dict:
    rank = dist.get_rank()
    mismatched = build_llama()
    config = lowcost.LoRAConfig(r=4 if rank == 0 else 2, alpha=8, dropout=0.1)
    out = {"mismatch": error_message(lambda: lowcost.apply(mismatched, lora=config)),
           "mismatch_left_unpatched": patch_state(mismatched) is None}
    failing = build_llama()
    targets = ["q_proj"] if rank == 0 else ["no_such_module"]
    out["one_rank_fails"] = error_message(lambda: lowcost.apply(failing, lora=lowcost.LoRAConfig(targets=targets)))
    out["one_rank_fails_left_unpatched"] = patch_state(failing) is None
    wrapped = DistributedDataParallel(build_llama())
    out["apply_after_ddp"] = error_message(lambda: lowcost.apply(wrapped, lora=lora_config()))
    alone = build_llama()
    if rank == 0:  # a model patched on one rank only (no other rank calls apply): must not wait for them
        with lowcost.distributed.this_rank_only():
            lowcost.apply(alone, lora=lora_config())
    out["this_rank_only_patched"] = patch_state(alone) is not None
    five_rows = {"input_ids": torch.zeros(5, 8, dtype=torch.long)}
    out["indivisible_batch"] = error_message(lambda: shard_batch(five_rows))
    return out


def train(policy: str, adapter_dir) -> dict:
    model = DistributedDataParallel(patched(policy, rank_batch=shard_batch(global_batch(0))))
    seed_rank(DROPOUT_SEED)
    losses = local_steps(model, sgd(model))
    return {"losses": losses, "writes": save_counting_writes(model, adapter_dir),
            "static_graph": bool(getattr(model, "static_graph", False))}


def run(out_dir) -> dict:
    return {"bad_input": bad_input(), "policies": {p: train(p, out_dir / f"ddp-{p}") for p in POLICIES}}
