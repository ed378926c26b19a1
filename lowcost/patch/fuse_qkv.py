"""Fusion pass "qkv": projections that read one input run as one ``lowcost.ops.lora_grouped_linear``.

Groups, per block (roles from the family table, ``lowcost._families``): q/k/v of the attention, and gate/up of
the MLP when the "mlp" fusion did not take that MLP (the fused MLP already groups them). Each group is a
``lowcost.nn.grouped_projections.ProjectionGroup`` installed on the layers: the first member computes every
member's output on its input, the others take theirs only when called with that very tensor (same object,
same version, nothing changed), else run their own op. So the model's forward is untouched and the result
is exact whatever the forward does between the calls.

A group whose members all have quantized base weights runs ``lowcost.ops.qlora_grouped_linear`` (torch, triton
or cuda for the formats each decodes, ``QUANT_SUPPORT``; the default on a CUDA device is Triton's dequantizing
GEMMs, as for the unfused layers). Refused, with the reason: a member that is not a fused ``LoRALinear`` (a
projection without LoRA), a Conv1D (the grouped op takes (N, K) weights), a group mixing dense and quantized
base weights, a quantized group on a backend without a kernel for one member's format, members of different
input widths or backends, Triton or CUDA where their kernels cannot run (the grouped op's cuda backend: CUDA
tensors on sm_80+ with lowcost._C built for CUDA, as the unfused layers' own cuda backend), float64 weights on
either, and members inside a checkpoint ``recompute=`` region.
"""
from __future__ import annotations

import torch
from torch import nn

from lowcost._families import module_roles
from lowcost.nn.grouped_projections import ProjectionGroup
from lowcost.nn.lora_linear import LoRALinear
from lowcost.ops._quant_backends import QUANT_SUPPORT
from lowcost.ops.backend import requested_backend, unavailable_reason
from lowcost.ops.lora_grouped_linear import TRITON_MAX_PROJECTIONS

GROUPS = (("q", "k", "v"), ("gate", "up"))


def _groups(model: nn.Module, skip_parents: set[str]) -> dict[str, list[tuple[str, str]]]:
    """Parent path → [(role, full path)] in role order, for each block's complete q/k/v and gate/up sets."""
    found: dict[tuple[str, int], dict[str, str]] = {}
    for path, role in module_roles(model).items():
        for index, roles in enumerate(GROUPS):
            if role in roles:
                found.setdefault((path.rpartition(".")[0], index), {})[role] = path
    out = {}
    for (parent, index), members in found.items():
        if set(members) == set(GROUPS[index]) and parent not in skip_parents:
            out[parent] = [(role, members[role]) for role in GROUPS[index]]
    return out


def _member_problem(path: str, layer: nn.Module) -> str:
    name = path.rpartition(".")[2]
    if not isinstance(layer, LoRALinear):
        return f"{name} is a {type(layer).__name__}, not a fused LoRALinear (no LoRA adapter on it)"
    if layer.fan_in_fan_out:
        return f"{name} is a Conv1D (the grouped op takes (N, K) weights)"
    return ""


def _quantized_problem(layers: dict[str, LoRALinear], backend) -> str:
    """Why a group with quantized base weights cannot run grouped ("" when it can): a dense/quantized mix, or a
    backend without a kernel for one member's format."""
    quantized = {path.rpartition(".")[2]: layer.quantized for path, layer in layers.items()}
    if len(set(quantized.values())) > 1:
        return (f"the projections mix dense and quantized base weights {quantized}; the grouped op takes all "
                "dense or all quantized")
    source, name = requested_backend(backend)
    for path, layer in layers.items():
        if name is not None and layer.weight.scheme not in QUANT_SUPPORT[name]:
            return (f"{source}={name!r} has no kernel for {path.rpartition('.')[2]}'s {layer.weight.scheme!r} "
                    f"weight (it takes: {', '.join(QUANT_SUPPORT[name])})")
    return ""


def _group_problem(layers: dict[str, LoRALinear]) -> str:
    widths = {path.rpartition(".")[2]: layer.in_features for path, layer in layers.items()}
    if len(set(widths.values())) > 1:
        return f"the projections read inputs of different widths {widths}"
    backends = {layer.backend for layer in layers.values()}
    if len(backends) > 1:
        return f"the projections ask for different backends {sorted(map(str, backends))}; the grouped op runs one"
    backend = backends.pop()
    if any(layer.quantized for layer in layers.values()):
        problem = _quantized_problem(layers, backend)
        if problem:
            return problem
    if backend not in ("triton", "cuda"):
        return ""
    weight = next(iter(layers.values())).weight
    rank = max(layer.lora_A.shape[0] for layer in layers.values())
    # a meta-device model (lowcost plan) runs later on a device we cannot see: cuda is not checked against it
    meta_cuda = backend == "cuda" and weight.device.type == "meta"
    why = None if meta_cuda else unavailable_reason(backend, weight.device, rank)
    if why is None and backend == "triton" and len(layers) > TRITON_MAX_PROJECTIONS:
        why = f"it groups at most {TRITON_MAX_PROJECTIONS} projections"
    if why is None and isinstance(weight, torch.Tensor) and weight.dtype == torch.float64:
        why = f"float64 weights (the {backend} kernels take fp32/fp16/bf16)"
    return f"backend={backend!r} cannot run here: {why}" if why else ""


def plan_grouped_fusions(model: nn.Module, avoid: tuple[str, ...] = (), skip_parents: set[str] = frozenset()
                         ) -> tuple[dict, list[tuple[str, str]]]:
    """({parent path: (ProjectionGroup, detail)}, [(path, reason refused)]). ``skip_parents``: MLPs the "mlp"
    fusion took (their gate/up are grouped inside the fused MLP); ``avoid``: checkpoint recompute paths."""
    taken, refused = {}, []
    groups = _groups(model, set(skip_parents))
    if not groups:
        return taken, [("*", "the family table names no q/k/v or gate/up projections in this model")]
    for parent, members in groups.items():
        paths = [path for _, path in members]
        hit = [a for a in avoid for p in paths + [parent] if p == a or p.endswith("." + a)]
        if hit:
            refused.append((parent, f"checkpoint recompute={hit[0]!r} needs that module's own forward"))
            continue
        layers = {path: model.get_submodule(path) for path in paths}
        problem = next((p for p in (_member_problem(path, layer) for path, layer in layers.items()) if p), "")
        problem = problem or _group_problem(layers)
        if problem:
            refused.append((parent, problem))
            continue
        roles = "/".join(role for role, _ in members)
        group = ProjectionGroup([(path, layers[path]) for path in paths])
        taken[parent] = (group, f"{roles} as one grouped op on their shared input (each falls back to its own op "
                                f"when called with another tensor)")
    return taken, refused
