"""Recompute under FSDP2: the parameters of the block being re-run must be unsharded.

FSDP2 (``fully_shard``) all-gathers a block's parameters in its pre-forward and pre-backward hooks and
reshards them afterwards. A frame that holds one block is recomputed inside that block's backward, when
its parameters are already unsharded: nothing to do. A frame that holds a Chen et al. segment of several
blocks (policy ``sqrt``) is recomputed inside the backward of its *last* block, so the earlier blocks of
the segment run while FSDP still holds them sharded (their weights would be DTensor shards).

``unshard_owner(fn)`` is called before each call of a frame is re-run: when ``fn`` is an ``FSDPModule`` or
a bound method of one, it calls ``module.unshard()``. That is never an extra all-gather: FSDP's backward
prefetch has usually issued this block's all-gather already (``unshard`` then only waits for it), and the
block's own pre-backward later finds it unsharded and gathers nothing; its post-backward reshards it as
usual. So each block is still gathered once per backward.
"""
from __future__ import annotations

import sys

from torch import nn


def _fsdp_module_class():
    """``torch.distributed.fsdp.FSDPModule`` when FSDP2 has been imported (no import otherwise)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    return getattr(sys.modules["torch.distributed.fsdp"], "FSDPModule", None)


def owner_module(fn) -> nn.Module | None:
    """The module ``fn`` runs: ``fn`` itself, or ``fn.__self__`` for a bound ``forward``."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def unshard_owner(fn) -> None:
    """Unshards the FSDP2 module that ``fn`` belongs to, if any (a no-op when already unsharded)."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return
    owner = owner_module(fn)
    if isinstance(owner, fsdp_module):
        owner.unshard()
