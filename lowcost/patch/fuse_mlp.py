"""Fusion pass "mlp": gated MLPs whose projections are all fused LoRA linears become one ``LoRAGatedMLP``.

Eligibility, per MLP (roles from the family table, ``lowcost._families``): gate/up/down (Llama, Mistral,
Qwen2, Gemma) or gate_up/down (Phi-3) all adapted on the fused path (no bias, not Conv1D, one backend for
all of them: None, "torch", or "triton" / "cuda" where those kernels can run there), an MLP module with no
parameters or buffers of its own and no children but those projections and its activation, an activation
the op knows (checked numerically), and — the structure check — the wrapper computes what the original
forward computes on a probe input (eval mode, no gradient). Anything else is refused with the reason.
"""
from __future__ import annotations

import copy
import os
from typing import Callable, Optional

import torch
from torch import nn

from lowcost._families import module_roles
from lowcost.nn.lora_gated_mlp import LoRAGatedMLP
from lowcost.nn.lora_linear import LoRALinear
from lowcost.ops._quant_backends import QUANT_SUPPORT
from lowcost.ops.backend import ENV_VAR, triton_usable, unavailable_reason
from lowcost.reference.lora_gated_mlp import ACTIVATIONS, activation as reference_activation

_ACT_ATTRS = ("act_fn", "activation_fn", "act")


def _mlp_groups(model: nn.Module) -> dict[str, dict[str, str]]:
    """MLP path → {role: child attribute name} for every block's gate/up/down or gate_up/down roles."""
    groups: dict[str, dict[str, str]] = {}
    for path, role in module_roles(model).items():
        if role in ("gate", "up", "down", "gate_up"):
            parent, _, child = path.rpartition(".")
            groups.setdefault(parent, {})[role] = child
    return {p: roles for p, roles in groups.items() if "down" in roles and ("gate_up" in roles or "gate" in roles)}


def _activation_name(act: nn.Module) -> Optional[str]:
    """Which of the op's activations ``act`` computes (probe in float64 and float32), or None."""
    probe = torch.linspace(-8.0, 8.0, 257, dtype=torch.float64)
    for name in ACTIVATIONS:
        try:
            ok = all(torch.allclose(act(probe.to(dt)).double(), reference_activation(probe.to(dt), name).double(),
                                    rtol=1e-6, atol=1e-6) for dt in (torch.float64, torch.float32))
        except Exception:  # an activation that rejects the probe is not one of ours
            ok = False
        if ok:
            return name
    return None


def _layer_problem(name: str, layer: nn.Module) -> str:
    if not isinstance(layer, LoRALinear):
        return f"{name} is a {type(layer).__name__}, not a fused LoRALinear"
    if layer.bias is not None:
        return f"{name} has a bias (the fused MLP takes bias-free projections)"
    if layer.fan_in_fan_out:
        return f"{name} is a Conv1D"
    return ""


def _backend_problem(layers: dict[str, LoRALinear]) -> str:
    """Why the projections cannot share one fused-MLP backend ("" when they can). The op takes one backend;
    on "triton" and "cuda" it runs the unfused layers' own LoRA-linear kernels and Philox masks, so it is exact
    wherever those can run (Triton: CUDA, or TRITON_INTERPRET=1, r <= TRITON_MAX_RANK; cuda: CUDA tensors on
    sm_80+ with lowcost._C built for CUDA), with no float64."""
    backends = {attr: layer.backend for attr, layer in layers.items()}
    if len(set(backends.values())) > 1:
        return f"the projections ask for different backends {backends}; the fused MLP runs one backend"
    name = next(iter(backends.values()))
    if name not in ("triton", "cuda"):
        return ""
    weight = next(iter(layers.values())).weight
    if weight.dtype == torch.float64:
        return f"backend={name!r} with float64 weights (the {name} kernels take fp32/fp16/bf16)"
    rank = max(layer.lora_A.shape[0] for layer in layers.values())
    # a meta-device model (lowcost plan) runs later on a device we cannot see: only what does not need it is checked
    device = weight.device   # a dense tensor's or a QuantizedWeight's (its stored tensors')
    if device.type == "meta" and name == "cuda":
        return ""
    why = unavailable_reason(name, torch.device("cuda") if device.type == "meta" else device, rank)
    return f"backend={name!r} cannot run here: {why}" if why else ""


def _structure_problem(mlp: nn.Module, roles: dict[str, str]) -> str:
    own = list(mlp.named_parameters(recurse=False)) + list(mlp.named_buffers(recurse=False))
    if own:
        return f"the MLP module has tensors of its own ({own[0][0]})"
    children = {name for name, _ in mlp.named_children()}
    extra = children - set(roles.values()) - set(_ACT_ATTRS)
    if extra:
        return f"the MLP module has other children ({sorted(extra)})"
    for role, attr in roles.items():
        problem = _layer_problem(attr, getattr(mlp, attr))
        if problem:
            return problem
    layers = {attr: getattr(mlp, attr) for attr in roles.values()}
    return _quantized_problem(layers, "gate_up" in roles) or _backend_problem(layers)


def _quantized_problem(layers: dict[str, LoRALinear], packed: bool) -> str:
    """Why quantized base weights cannot be fused ("" when none is quantized, or all three can be): the fused
    MLP takes three dense or three quantized weights, unpacked, on the torch backend, or on Triton / cuda in
    the formats their dequantizing GEMMs decode (``QUANT_SUPPORT``). Whether Triton / cuda can run here at
    all is ``_backend_problem``'s check, as for dense weights."""
    quantized = [attr for attr, layer in layers.items() if not isinstance(layer.weight, torch.Tensor)]
    if not quantized:
        return ""
    if len(quantized) != len(layers):
        return f"{', '.join(quantized)} quantized but not the other projections (the fused MLP takes all or none)"
    if packed:
        return "a packed gate_up projection with a quantized base weight (its halves cannot be sliced)"
    asked = {layer.backend or os.environ.get(ENV_VAR) for layer in layers.values()} - {None, "", "torch"}
    schemes = {layer.weight.scheme for layer in layers.values()}
    for name in sorted(asked & set(QUANT_SUPPORT)):
        lacking = sorted(schemes - set(QUANT_SUPPORT[name]))
        if lacking:
            return (f"quantized base weights in {lacking} with backend={name!r}: its dequantizing GEMMs do not "
                    "decode them")
    return ""


def _cpu_twin(mlp: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device MLP (``lowcost plan`` patches models built on the meta device) with small
    random weights and zero buffers: the structure check compares forwards, which needs values but not the
    model's own values (B of a fresh adapter is zero, so random B checks the LoRA terms too)."""
    twin = copy.deepcopy(mlp).to_empty(device="cpu")
    for layer in twin.modules():  # the probe checks structure; Triton may not run on this CPU
        if isinstance(layer, LoRALinear) and layer.backend == "triton" and not triton_usable(torch.device("cpu")):
            layer.backend = None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for buffer in twin.buffers():
            buffer.zero_()
        for parameter in twin.parameters():
            if parameter.is_floating_point():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return twin


def _same_output(mlp: nn.Module, make_fused: Callable[[nn.Module], LoRAGatedMLP]) -> bool:
    """The original forward and the wrapper (``make_fused(mlp)``) agree on a probe (eval mode: no dropout, no
    RNG use). A meta-device MLP is checked on a CPU twin with random weights."""
    if any(p.is_meta for p in mlp.parameters()):
        mlp = _cpu_twin(mlp)
    fused = make_fused(mlp)
    layer = fused.layer("down")
    weight = layer.weight                                   # a tensor, or a QuantizedWeight (dtype, device)
    probe = torch.randn(3, layer.out_features, generator=torch.Generator().manual_seed(0)).to(weight.device,
                                                                                                 weight.dtype)
    modes = [(m, m.training) for m in mlp.modules()]
    try:
        for m, _ in modes:
            m.training = False
        fused.training = False
        with torch.no_grad():
            expected, got = mlp(probe), fused(probe)
    finally:
        for m, mode in modes:
            m.training = mode
        fused.training = mlp.training
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    scale = expected.abs().max().clamp_min(1e-6)
    return expected.shape == got.shape and bool(((expected - got).abs().max() / scale) <= tol)


def build_mlp_fusion(model: nn.Module, path: str, roles: dict[str, str]) -> tuple[Optional[LoRAGatedMLP], str]:
    """(the wrapper, "") when the MLP at ``path`` can be fused, else (None, why not)."""
    mlp = model.get_submodule(path)
    problem = _structure_problem(mlp, roles)
    if problem:
        return None, problem
    act_module = next((getattr(mlp, a) for a in _ACT_ATTRS if isinstance(getattr(mlp, a, None), nn.Module)), None)
    if act_module is None:
        return None, "no activation module (act_fn / activation_fn) on the MLP"
    act = _activation_name(act_module)
    if act is None:
        return None, f"activation {type(act_module).__name__} is none of {ACTIVATIONS}"
    if "gate_up" in roles and getattr(mlp, roles["gate_up"]).out_features % 2:
        return None, "the packed gate_up projection has an odd number of outputs"

    def make_fused(module: nn.Module) -> LoRAGatedMLP:
        pairs = {role: (attr, getattr(module, attr)) for role, attr in roles.items()}
        return LoRAGatedMLP(module, act, down=pairs["down"], gate=pairs.get("gate"), up=pairs.get("up"),
                            gate_up=pairs.get("gate_up"))

    fused = make_fused(mlp)
    if not _same_output(mlp, make_fused):
        return None, "the MLP's forward is not down(act(gate(x)) * up(x)) (probe outputs differ)"
    return fused, f"{'packed gate_up' if fused.packed else 'gate/up/down'}, activation {act}"


def plan_mlp_fusions(model: nn.Module, avoid: tuple[str, ...] = ()) -> tuple[dict, list[tuple[str, str]]]:
    """({MLP path: (wrapper, detail)}, [(path, reason refused)]). ``avoid``: block-relative module paths that
    must keep their own forward (checkpoint ``recompute=`` regions)."""
    taken, refused = {}, []
    groups = _mlp_groups(model)
    if not groups:
        return taken, [("*", "the family table names no gated MLP (gate/up/down roles) in this model")]
    for path, roles in groups.items():
        names = [f"{path}.{attr}" for attr in roles.values()] + [path]
        hit = [a for a in avoid for n in names if n == a or n.endswith("." + a)]
        if hit:
            refused.append((path, f"checkpoint recompute={hit[0]!r} needs that module's own forward"))
            continue
        fused, detail = build_mlp_fusion(model, path, roles)
        if fused is None:
            refused.append((path, detail))
        else:
            taken[path] = (fused, detail)
    return taken, refused
