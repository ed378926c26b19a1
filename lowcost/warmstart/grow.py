"""Function-preserving growth: a wider MLP and more blocks, with the grown model's outputs equal to the
original's at the moment of growth.

Width (``width=`` the new intermediate size): the MLP's input projections (gate/up, or BERT's
``intermediate.dense``) get new rows drawn at the scale of the existing ones; the output projection
(down / ``output.dense``) gets new zero columns, so the new units add exactly 0. Their gradients are not
zero (the down columns see non-zero activations), so they start learning at once.

Depth (``depth=`` the new number of blocks): new blocks are copies of the block before their slot, spread
evenly through the stack, with their output projections (attention output and MLP output, weights and
biases) zeroed.
- pre-norm blocks (Llama, …: ``x + f(norm(x))``): a zeroed block is the identity;
- post-norm blocks (BERT: ``LN(x + f(x))``): ``LN(x)`` is not ``x``, so the previous block's last LayerNorm
  hands its scale and shift to the new block's last LayerNorm and becomes (1, 0); the new block's first
  LayerNorm is (1, 0). The new block then maps the normalised vector ``n`` to ``γ·n + β``, which is what the
  previous block produced before (up to LayerNorm's eps, 1e-12 in BERT).

The returned model carries ``model.lowcost_grow_report`` whose ``new`` lists the new rows, columns and
blocks, for ``FreezeThenUnfreeze``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from lowcost._families import block_list_path, detect_family, find_blocks
from lowcost.warmstart.report import NewSlice, WarmstartReport

_POST_NORM = {"bert"}
_IN_ROLES, _OUT_ROLES = ("gate", "up", "fc1"), ("down", "fc2")


def _linear(block: nn.Module, path: str) -> nn.Linear:
    module = block.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise NotImplementedError(f"growth needs nn.Linear MLP projections; {path} is {type(module).__name__}")
    return module


def _mlp_roles(model: nn.Module) -> tuple[list, list]:
    roles = detect_family(model).roles
    ins = [roles[r] for r in _IN_ROLES if r in roles]
    outs = [roles[r] for r in _OUT_ROLES if r in roles]
    if not ins or len(outs) != 1:
        raise NotImplementedError(f"no separate MLP input/output projections known for "
                                  f"{detect_family(model).name!r} models (fused gate_up or unknown family)")
    return ins, outs


@torch.no_grad()
def _widen_linear(lin: nn.Linear, dim: int, new: int, generator: torch.Generator, zero: bool) -> None:
    """Grows ``lin`` along ``dim`` (0: output rows, 1: input columns) to ``new``; new part zero or random."""
    w = lin.weight
    shape = list(w.shape)
    extra = new - shape[dim]
    shape[dim] = extra
    if zero:
        part = torch.zeros(shape, dtype=w.dtype)
    else:
        part = (torch.randn(shape, generator=generator) * float(w.float().std())).to(w.dtype)
    lin.weight = nn.Parameter(torch.cat([w.data, part.to(w.device)], dim), requires_grad=w.requires_grad)
    if dim == 0 and lin.bias is not None:
        b = lin.bias
        lin.bias = nn.Parameter(torch.cat([b.data, torch.zeros(extra, dtype=b.dtype, device=b.device)]),
                                requires_grad=b.requires_grad)
    if dim == 0:
        lin.out_features = new
    else:
        lin.in_features = new


def widen_mlp(model: nn.Module, width: int, report: WarmstartReport, seed: int = 0) -> None:
    """Every block's MLP to intermediate size ``width`` (see the module docstring)."""
    ins, outs = _mlp_roles(model)
    path, generator = block_list_path(model), torch.Generator().manual_seed(seed)
    for index, block in enumerate(find_blocks(model)):
        old = _linear(block, ins[0]).out_features
        if width < old:
            raise ValueError(f"width {width} is smaller than the current intermediate size {old}")
        if width == old:
            continue
        for rel in ins:
            _widen_linear(_linear(block, rel), 0, width, generator, zero=False)
            report.new.append(NewSlice(f"{path}.{index}.{rel}.weight", 0, old))
        _widen_linear(_linear(block, outs[0]), 1, width, generator, zero=True)
        report.new.append(NewSlice(f"{path}.{index}.{outs[0]}.weight", 1, old))
        report.count("mlp", "widened")
    if hasattr(getattr(model, "config", None), "intermediate_size"):
        model.config.intermediate_size = width


@torch.no_grad()
def _zero_outputs(block: nn.Module, model: nn.Module) -> None:
    roles = detect_family(model).roles
    for role in ("o", "down", "fc2"):
        if role in roles:
            lin = block.get_submodule(roles[role])
            lin.weight.zero_()
            if getattr(lin, "bias", None) is not None:
                lin.bias.zero_()


@torch.no_grad()
def _hand_over_norm(prev: nn.Module, new: nn.Module) -> None:
    """Post-norm: the previous block's last LayerNorm becomes (1, 0) and the new block takes its affine."""
    last_prev, last_new = prev.output.LayerNorm, new.output.LayerNorm
    last_new.weight.copy_(last_prev.weight)
    last_new.bias.copy_(last_prev.bias)
    for norm in (last_prev, new.attention.output.LayerNorm):
        norm.weight.fill_(1.0)
        norm.bias.zero_()


def _slots(old: int, extra: int) -> list:
    """Indices (into the old stack) after which the new blocks go, spread evenly."""
    return sorted(min(old - 1, max(0, round((i + 1) * old / (extra + 1)) - 1)) for i in range(extra))


def deepen(model: nn.Module, depth: int, report: WarmstartReport) -> None:
    """Inserts zero-output copies of blocks so that there are ``depth`` blocks (see the module docstring)."""
    path = block_list_path(model)
    if path is None:
        raise NotImplementedError(f"no block list found in {type(model).__name__}")
    stack: nn.ModuleList = model.get_submodule(path)
    old = len(stack)
    if depth < old:
        raise ValueError(f"depth {depth} is smaller than the current {old} blocks")
    post_norm = detect_family(model).name in _POST_NORM
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) and len(types) == old else None
    blocks, new_ids = list(stack), []
    for slot in reversed(_slots(old, depth - old)):
        prev = blocks[slot]
        block = copy.deepcopy(prev)
        _zero_outputs(block, model)
        if post_norm:
            _hand_over_norm(prev, block)
        blocks.insert(slot + 1, block)
        if types is not None:
            types.insert(slot + 1, types[slot])
        new_ids.append(id(block))
    parent, _, attr = path.rpartition(".")
    stack = nn.ModuleList(blocks)
    setattr(model.get_submodule(parent) if parent else model, attr, stack)
    for index, block in enumerate(stack):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        if id(block) in new_ids:
            report.count("blocks", "added")
            report.new.extend(NewSlice(f"{path}.{index}.{name}") for name, _ in block.named_parameters())
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = depth
    if types is not None:
        config.layer_types = types


def grow(model: nn.Module, width: Optional[int] = None, depth: Optional[int] = None, *, seed: int = 0) -> nn.Module:
    """Widens every MLP to ``width`` units and/or deepens to ``depth`` blocks, preserving the function.

    Returns the same model, grown in place, with ``model.lowcost_grow_report``.
    """
    if width is None and depth is None:
        raise ValueError("grow needs width= (MLP intermediate size) and/or depth= (number of blocks)")
    report = WarmstartReport("grow")
    if depth is not None:
        deepen(model, int(depth), report)
    if width is not None:
        widen_mlp(model, int(width), report, seed)
    report.extra.update(width=width, depth=depth)
    model.lowcost_grow_report = report
    return model
