"""Fusion pass "norm": each block's RMSNorm or LayerNorm becomes a fused norm whose output the LoRA ops rebuild.

A block's input norm feeds q/k/v and its post-attention (Gemma-2/3: pre-feedforward) norm feeds the MLP. The
unfused model saves that normed (tokens × hidden) tensor for the adapters' dA; after this pass the lowcost
LoRA ops and the fused MLP keep the norm's input (and RMSNorm's per-row rstd) instead, which the norm keeps
anyway (``lowcost.ops.normed_input``). Results do not change: the replacement (``FusedRMSNorm``,
``FusedLayerNorm``) is taken only where its forward is bit-identical to the module's on a probe, in the
module's dtype.

Candidates are the direct children of each block whose class name ends in "RMSNorm", and the block's
``nn.LayerNorm`` children over one dimension. Each is taken, or refused with the reason (tensors or children
of its own, no eps attribute, a forward that matches neither RMSNorm form, a checkpoint ``recompute=``
region, another LayerNorm class).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from lowcost._families import block_list_path
from lowcost.nn.fused_layer_norm import FusedLayerNorm
from lowcost.nn.fused_rms_norm import FusedRMSNorm
from lowcost.reference.rms_norm import FORMS

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def _norm_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full path, module) for each RMSNorm- or LayerNorm-like direct child of every block."""
    blocks = block_list_path(model)
    if blocks is None:
        return []
    found = []
    for index, block in enumerate(model.get_submodule(blocks)):
        for name, child in block.named_children():
            kind = type(child).__name__.lower()
            if kind.endswith("rmsnorm") or isinstance(child, nn.LayerNorm) or kind.endswith("layernorm"):
                found.append((f"{blocks}.{index}.{name}", child))
    return found


def _eps(norm: nn.Module) -> Optional[float]:
    for attr in _EPS_ATTRS:
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _structure_problem(norm: nn.Module) -> str:
    if isinstance(norm, nn.LayerNorm):
        return "" if len(norm.normalized_shape) == 1 else f"LayerNorm over {norm.normalized_shape} (not one dimension)"
    if not type(norm).__name__.lower().endswith("rmsnorm"):
        return f"{type(norm).__name__} is neither an RMSNorm nor an nn.LayerNorm"
    params = dict(norm.named_parameters(recurse=False))
    if set(params) != {"weight"} or params["weight"].dim() != 1:
        return f"tensors other than one 1-D weight ({sorted(params)})"
    if list(norm.named_buffers()) or list(norm.named_children()):
        return "buffers or children of its own"
    if _eps(norm) is None:
        return f"no eps attribute ({' / '.join(_EPS_ATTRS)})"
    return ""


def _cpu_twin(norm: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device norm (``lowcost plan``) with random parameters: the probe needs values."""
    twin = copy.deepcopy(norm).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return twin


def _same_output(norm: nn.Module, fused: nn.Module) -> bool:
    """``fused`` (holding ``norm``'s parameters) gives ``norm``'s output bit for bit on a probe (no grad)."""
    like = next(norm.parameters(), None)
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    width = like.shape[0] if like is not None else norm.normalized_shape[0]
    probe = (3.0 * torch.randn(5, width, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    with torch.no_grad():
        expected, got = norm(probe), fused(probe)
    return got.dtype == expected.dtype and torch.equal(got, expected)


def build_norm_fusion(norm: nn.Module) -> tuple[Optional[nn.Module], str]:
    """(the replacement, detail) when ``norm`` can be fused, else (None, why not)."""
    problem = _structure_problem(norm)
    if problem:
        return None, problem
    probe_norm = _cpu_twin(norm) if any(p.is_meta for p in norm.parameters()) else norm
    if isinstance(norm, nn.LayerNorm):
        make = lambda m: FusedLayerNorm(m.weight, m.bias, m.eps)  # noqa: E731
        if not _same_output(probe_norm, make(probe_norm)):
            return None, "the LayerNorm's forward differs from lowcost.ops.layer_norm on a probe"
        return make(norm), "LayerNorm: LoRA ops keep its input and run it again in backward"
    for form in FORMS:
        if _same_output(probe_norm, FusedRMSNorm(probe_norm.weight, _eps(probe_norm), form)):
            return FusedRMSNorm(norm.weight, _eps(norm), form), f"RMSNorm, {form} form: LoRA ops keep its input and rstd"
    return None, f"{type(norm).__name__}'s forward is neither RMSNorm form {FORMS} (probe outputs differ)"


def plan_norm_fusions(model: nn.Module, avoid: tuple[str, ...] = ()) -> tuple[dict, list[tuple[str, str]]]:
    """({norm path: (replacement, detail)}, [(path, reason refused)]). ``avoid``: block-relative module paths
    that must keep their own forward (checkpoint ``recompute=`` regions)."""
    taken, refused = {}, []
    candidates = _norm_children(model)
    if not candidates:
        return taken, [("*", "no RMSNorm or LayerNorm among the blocks' children")]
    for path, norm in candidates:
        hit = [a for a in avoid if path == a or path.endswith("." + a)]
        if hit:
            refused.append((path, f"checkpoint recompute={hit[0]!r} needs that module's own forward"))
            continue
        fused, detail = build_norm_fusion(norm)
        if fused is None:
            refused.append((path, detail))
        else:
            taken[path] = (fused, detail)
    return taken, refused
