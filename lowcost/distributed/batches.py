"""Splitting a global batch across ranks: every rank gets the same number of rows, or a clear error.

Equal local batches are what makes data-parallel training equal single-process training on the global
batch: DDP and FSDP2 average the ranks' gradients, which is the gradient of the global mean loss only when
every rank's mean is over the same number of samples.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowcost.patch.ranks import world


def _world_size(world_size: Optional[int]) -> int:
    world_size = world()[1] if world_size is None else world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return world_size


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    world_size = _world_size(world_size)
    rank = world()[0] if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def local_batch_size(global_batch_size: int, world_size: Optional[int] = None) -> int:
    """global_batch_size / world_size; ValueError when the world size does not divide it."""
    world_size = _world_size(world_size)
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be an int >= 1, got {global_batch_size!r}")
    if global_batch_size % world_size:
        below = global_batch_size // world_size * world_size
        options = f"{below} or {below + world_size}" if below else f"{world_size}"
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the world size {world_size}: "
                         f"every rank must get the same number of samples (use {options}, or change the number "
                         f"of processes)")
    return global_batch_size // world_size


def shard_batch(batch, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's contiguous rows of every tensor in ``batch`` (a tensor, dict, list or tuple of them).

    Rows [rank·b, (rank+1)·b) with b = rows / world_size; all tensors must have the same number of rows and
    the world size must divide it. Non-tensor values are passed through."""
    rank, world_size = _rank_world(rank, world_size)
    rows = {t.shape[0] for t in _tensors(batch)}
    if not rows:
        raise ValueError("batch holds no tensor to split")
    if len(rows) > 1:
        raise ValueError(f"every tensor in the batch must have the same number of rows (dim 0), got {sorted(rows)}")
    local = local_batch_size(rows.pop(), world_size)
    return _map(batch, lambda t: t[rank * local:(rank + 1) * local])


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch] if batch.dim() > 0 else []
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _map(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return type(batch)({k: _map(v, fn) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch
