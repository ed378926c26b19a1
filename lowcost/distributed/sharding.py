"""``shard_model``: FSDP2's ``fully_shard`` on every decoder block, then on the root, in the usual order.

Call it after ``lowcost.apply`` (LoRA and checkpointing), never before: ``fully_shard`` groups the
parameters that exist when it runs, so LoRA parameters added afterwards would be left out (``apply``
refuses a sharded model for that reason). Each block becomes one FSDP unit: its frozen base weights and its
LoRA parameters are sharded together and all-gathered once per forward and once per backward; the frozen
ones never get gradients, so only the LoRA gradients are reduce-scattered. lowcost's recomputation runs
inside the block's backward, while the block is unsharded, and adds no all-gather (see
``lowcost.checkpoint.sharded`` for Chen et al. segments that span blocks).

A quantized base (``QuantizedWeight``: NF4, int8, GGUF blocks) is sharded too: its row-indexed codes and
scales become frozen parameters first (``QuantizedWeight.make_row_shardable``), so each rank holds
ceil(N / W) rows of every packed tensor (about 1/W of the base's bytes; FSDP2 pads the last shard with
rows that the all-gathered (N, ...) tensor never includes), gathered with the block's other parameters in
the same one all-gather per forward and per backward. They are integer tensors (float scales bit-cast), so
a ``MixedPrecisionPolicy`` never casts them. ``shard_quantized=False`` keeps them whole on every rank.

``unsharded(model)`` gathers every unit's parameters for the duration of a ``with`` block (collective: every
rank enters it), e.g. for ``lowcost.export_gguf`` from one rank, and frees them again on exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from lowcost.checkpoint.install import resolve_blocks
from lowcost.patch.ranks import wrapper_of
from lowcost.reference.quant import QuantizedWeight


def shard_model(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                blocks: Optional[list] = None, shard_quantized: bool = True, **fully_shard_kwargs) -> nn.Module:
    """Applies ``fully_shard`` to each block of ``model`` and then to ``model``; returns ``model``.

    Args:
        model: a (lowcost-patched) model; its blocks come from the model-family table unless ``blocks``.
        mesh: a 1-D DeviceMesh; default: every rank of the default process group, on CUDA when the
            backend is NCCL, else on the device of the model's parameters.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce) or None.
        reshard_after_forward: FSDP2's setting for the blocks (the root keeps its parameters gathered).
        blocks: the modules to shard one by one (default: the model's decoder blocks).
        shard_quantized: shard the packed codes and scales of quantized weights by rows (default); False
            keeps them as buffers, whole on every rank.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (e.g. ``offload_policy``).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs torch.distributed.init_process_group(...) first (e.g. under torchrun)")
    wrapper = wrapper_of(model)
    if wrapper is not None:
        raise RuntimeError(f"shard_model: the model is already wrapped by {wrapper}")
    mesh = mesh if mesh is not None else _default_mesh(model)
    kwargs = {"mesh": mesh, **fully_shard_kwargs}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if shard_quantized:
        for module in model.modules():
            if isinstance(module, QuantizedWeight):
                module.make_row_shardable()
    units = list(blocks) if blocks is not None else [block for _, block in resolve_blocks(model)]
    for block in units:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _default_mesh(model: nn.Module):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if torch.cuda.is_available() and "nccl" in str(dist.get_backend()):
        device_type = "cuda"
    else:
        device = next((p.device for p in model.parameters()), None)
        device_type = device.type if device is not None else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every FSDP2 unit of ``model`` (each block and the root) holds its parameters whole
    (quantized codes and scales included: ``QuantizedWeight.packed`` works); on exit each is resharded.

    Collective: every rank must enter it (one all-gather per unit); what is done inside may be one rank's
    alone (writing a file). Memory: the whole model, gathered, on every rank while inside."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("lowcost.distributed.unsharded: the model has no FSDP2 unit (shard_model(model) first)")
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
