"""``accelerate_peft``: run a PEFT LoRA model's linear layers through the fused op.

Each PEFT ``lora.Linear`` keeps its identity, its submodules and its parameters (``base_layer``,
``lora_A[name]``, ``lora_B[name]``, so PEFT's state-dict keys, ``save_pretrained`` and ``merge_and_unload``
keep working); only its class is swapped for a subclass whose forward is one ``lowcost.ops.lora_linear``
call:

    y = x Wᵀ + s · (D ⊙ x) A_nameᵀ B_nameᵀ + b    x: (..., in); A: (r, in); B: (out, r)

Whenever PEFT's own forward does something the op does not (DoRA or another variant, several active
adapters, ``adapter_names`` mixed batches, disabled or merged adapters, LoRA bias, dtypes the op rejects)
the subclass calls PEFT's forward unchanged. ``lowcost.unapply`` puts the original classes back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowcost.nn.lora_linear import is_conv1d
from lowcost.ops.lora_linear import lora_linear
from lowcost.patch.report import AdaptedModule, PatchReport, SkippedModule
from lowcost.patch.swap import STATE_ATTR, PatchState, count_parameters, patch_state

_FUSED_CLASSES: dict[type, type] = {}
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _static_reason(layer: nn.Module) -> Optional[str]:
    """Why this PEFT layer can never take the fused path, or None."""
    base = layer.base_layer
    if type(base) is not nn.Linear and not is_conv1d(base):
        return f"base layer is {type(base).__name__}, not nn.Linear or Conv1D"
    if getattr(layer, "lora_variant", None):
        return f"LoRA variant {sorted(layer.lora_variant)} (e.g. DoRA) runs in PEFT's forward"
    if any(b.bias is not None for b in layer.lora_B.values()):
        return "lora_bias=True runs in PEFT's forward"
    return None


def _active(layer: nn.Module, args, kwargs) -> Optional[str]:
    """The single active adapter the fused path can run, or None (then PEFT's forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or _static_reason(layer):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    return active[0] if len(active) == 1 else None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _active(self, args, kwargs)
    base = self.base_layer
    a = self.lora_A[name].weight if name is not None else None
    if name is None or x.dtype != base.weight.dtype or x.dtype not in _OP_DTYPES \
            or a.dtype not in (x.dtype, torch.float32):
        return super(type(self), self).forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and self.training else 0.0
    weight = base.weight.t() if is_conv1d(base) else base.weight
    return lora_linear(x, weight, a, self.lora_B[name].weight, float(self.scaling[name]), bias=base.bias,
                       dropout=p)


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward,
                                                                     "__module__": __name__})
    return _FUSED_CLASSES[cls]


def _adapted_entry(name: str, layer: nn.Module, reason: Optional[str]) -> AdaptedModule:
    adapter = layer.active_adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    path = "fallback" if reason else ("fused-conv1d" if is_conv1d(layer.base_layer) else "fused")
    return AdaptedModule(name, type(layer.base_layer).__name__, path, a.shape[1], b.shape[0], a.shape[0],
                         float(layer.lora_alpha[adapter]), float(layer.scaling[adapter]), reason or "")


def accelerate_peft(peft_model: nn.Module) -> PatchReport:
    """Swap every PEFT LoRA ``Linear`` of ``peft_model`` for the fused subclass; returns a report."""
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("lowcost.accelerate_peft needs the peft package") from exc
    if patch_state(peft_model) is not None:
        raise RuntimeError("lowcost.accelerate_peft: the model is already patched by lowcost")
    report = PatchReport(family="peft")
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, PeftLinear)]
    if not layers:
        raise ValueError("lowcost.accelerate_peft: the model holds no PEFT LoRA Linear layer")
    state = PatchState(config=None, report=report)
    for name, layer in layers:
        if type(layer) is not PeftLinear:
            report.skipped.append(SkippedModule(name, f"{type(layer).__name__} is a PEFT subclass"))
            continue
        reason = _static_reason(layer)
        report.adapted.append(_adapted_entry(name, layer, reason))
        if reason is None:
            state.peft_classes[name] = type(layer)
            layer.__class__ = _fused_class(type(layer))
    peft_model.__dict__[STATE_ATTR] = state
    count_parameters(peft_model, report)
    return report
