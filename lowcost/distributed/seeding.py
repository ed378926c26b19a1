"""Per-rank RNG streams, so that dropout masks differ across ranks.

lowcost's fused LoRA op draws its dropout seed from torch's CPU generator, and lowcost's checkpointing
replays that generator on recompute, so a mask is regenerated exactly in backward. Under data parallelism
every rank must start from the *same* weights (seed before building the model and ``lowcost.apply``) but
draw *different* masks for its different rows: ``seed_rank(seed)`` is called once after the model is built,
adapted and wrapped, and re-seeds the generators with ``rank_seed(seed, rank)``.

One process can reproduce a W-rank run exactly by keeping W generator states and running rank r's rows
with ``torch.manual_seed(rank_seed(seed, r))``'s stream (the distributed tests do this).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from lowcost.patch.ranks import world

SEED_LIMIT = 2**63


def rank_seed(seed: int, rank: Optional[int] = None) -> int:
    """A seed in [0, 2**63) mixed from (seed, rank) with BLAKE2b: distinct ranks give unrelated streams."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    rank = world()[0] if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    digest = hashlib.blake2b(f"lowcost-rank-seed:{seed}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_LIMIT


def seed_rank(seed: int) -> int:
    """Seeds torch's CPU and CUDA generators with ``rank_seed(seed, this rank)``; returns that seed."""
    derived = rank_seed(seed)
    torch.manual_seed(derived)
    return derived
