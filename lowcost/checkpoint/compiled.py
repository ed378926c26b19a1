"""Checkpointing under ``torch.compile``: lowered to torch's checkpoint operator, with the policy's decisions.

Our frames work through ``saved_tensors_hooks`` and dispatch modes, which Dynamo cannot trace (each call would
be a graph break). While compiling, a checkpointed call is therefore handed to
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which Dynamo traces as one higher-order
operator; AOTAutograd's partitioner then keeps what the operator's recompute tags say:

- ``lowcost.checkpoint(fn, ...)`` and ``full``/``every_k`` blocks: every op inside is recomputed, only the
  inputs are kept (the eager decision);
- ``selective`` blocks: a ``context_fn`` from torch's ``create_selective_checkpoint_contexts`` marks the ops
  the eager selective policy keeps (matmuls, attention, ``lowcost::lora_linear``) ``MUST_SAVE`` and every
  other op ``MUST_RECOMPUTE`` — ``MUST`` so the partitioner does not override the decision either way.

Decisions with no equivalent in torch's operator — a √n segment of several blocks, ``offload``, and
``selective`` with a ``recompute=`` dial — are not lowered: such a block runs eagerly with lowcost's own
frames (one graph break per block), so its memory decision stays exactly the eager one.
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint as tuc

from lowcost.checkpoint.selective import save_matmuls


def torch_checkpoint(fn, args: tuple, kwargs: dict, *, use_reentrant, **options):
    """``lowcost.checkpoint`` while compiling: torch's non-reentrant checkpoint with the same options."""
    if use_reentrant:
        raise ValueError("lowcost.checkpoint is non-reentrant only: pass use_reentrant=False (or leave it out)")
    if options.get("context_fn") is tuc.noop_context_fn:
        del options["context_fn"]  # Dynamo only accepts a context_fn that is a function or a functools.partial
    return tuc.checkpoint(fn, *args, use_reentrant=False, **options, **kwargs)


def _selective_policy(ctx, func, *args, **kwargs):
    """torch's selective-checkpoint policy equal to the eager ``selective`` decision."""
    return tuc.CheckpointPolicy.MUST_SAVE if save_matmuls(func) else tuc.CheckpointPolicy.MUST_RECOMPUTE


selective_context_fn = functools.partial(tuc.create_selective_checkpoint_contexts, _selective_policy)


def lowerable(decision, segment) -> bool:
    """Whether a block's decision has an exact equivalent as torch's checkpoint operator."""
    if decision.mode == "full":
        return segment is None
    return decision.mode == "selective" and not decision.recompute


def block_forward(original, args: tuple, kwargs: dict, decision):
    """One checkpointed block while compiling, for a ``lowerable`` decision: torch's checkpoint operator."""
    if decision.mode == "selective":
        return tuc.checkpoint(original, *args, use_reentrant=False, context_fn=selective_context_fn, **kwargs)
    return tuc.checkpoint(original, *args, use_reentrant=False, **kwargs)


@torch._dynamo.disable
def run_eagerly(forward, args: tuple, kwargs: dict):
    """A block whose decision (√n segment, offload, recompute= dial) is not lowered runs with lowcost's frames."""
    return forward(*args, **kwargs)
