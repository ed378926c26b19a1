"""Swap LoRA layers into a model by name, reversibly.

``apply_lora`` plans first (``select.plan_lora``: nothing touched), then builds every new module, freezes
the base, swaps, and on any error puts everything back. The original modules, the ``requires_grad`` flags
and the ``nn.TransformerEncoderLayer`` fast-path switches are kept in a ``PatchState`` on the model
(``model._lowcost_patch``), so that ``remove_lora`` restores the exact original module objects.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowcost.nn.lora_linear import LoRALinear
from lowcost.patch.fallback import LoRAFallback
from lowcost.patch.report import AdaptedModule, PatchReport, SkippedModule
from lowcost.patch.select import Plan, plan_lora

STATE_ATTR = "_lowcost_patch"
LORA_TYPES = (LoRALinear, LoRAFallback)


@dataclass
class PatchState:
    """Everything needed to undo a patch. ``originals``: name → module that was there before."""
    config: object
    report: PatchReport
    originals: dict = field(default_factory=dict)
    saved_copies: dict = field(default_factory=dict)       # modules_to_save name → original module
    flags: list = field(default_factory=list)              # (parameter, requires_grad) before the patch
    fastpath: dict = field(default_factory=dict)           # TransformerEncoderLayer name → old switch
    peft_classes: dict = field(default_factory=dict)       # accelerate_peft: name → original class


def patch_state(model: nn.Module) -> Optional[PatchState]:
    return model.__dict__.get(STATE_ATTR)


def require_state(model: nn.Module, caller: str) -> PatchState:
    state = patch_state(model)
    if state is None:
        raise RuntimeError(f"{caller}: the model is not patched by lowcost (call lowcost.apply first)")
    return state


def check_not_patched(model: nn.Module, caller: str) -> None:
    if patch_state(model) is not None:
        raise RuntimeError(f"{caller}: the model is already patched by lowcost; call lowcost.unapply(model) "
                           "before applying again")
    for name, module in model.named_modules():
        if isinstance(module, LORA_TYPES):
            raise RuntimeError(f"{caller}: module {name!r} is already a {type(module).__name__}")
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            raise RuntimeError(f"{caller}: module {name!r} is a PEFT LoRA layer; use lowcost.accelerate_peft "
                               "for PEFT models")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _build(model: nn.Module, plan: Plan, config) -> dict[str, nn.Module]:
    built = {}
    for item in plan.modules:
        base = model.get_submodule(item.name)
        kwargs = dict(r=item.r, alpha=item.alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                      adapter_dtype=config.adapter_dtype)
        if item.path == "fallback":
            built[item.name] = LoRAFallback(base, **kwargs)
        else:
            built[item.name] = LoRALinear(base, backend=config.backend, **kwargs)
    return built


def _disable_encoder_fastpath(model: nn.Module, state: PatchState) -> None:
    """``nn.TransformerEncoderLayer``'s eval fast path reads ``linear1.weight`` itself, bypassing the swapped
    modules; its ``activation_relu_or_gelu`` switch is only read by that check, so clearing it turns the
    fast path (and ``nn.TransformerEncoder``'s nested-tensor path) off for patched layers."""
    adapted = tuple(state.originals)
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(a.startswith(name + ".") for a in adapted):
            state.fastpath[name] = module.activation_relu_or_gelu
            module.activation_relu_or_gelu = 0
            state.report.notes.append(f"{name}: nn.TransformerEncoderLayer eval fast path disabled (it reads "
                                      "linear1/linear2 weights directly)")


def _report(plan: Plan, built: dict[str, nn.Module]) -> PatchReport:
    report = PatchReport(family=plan.family, modules_to_save=list(plan.modules_to_save), excluded_head=plan.head,
                         skipped=[SkippedModule(n, why) for n, why in plan.skipped])
    for item in plan.modules:
        layer = built[item.name]
        report.adapted.append(AdaptedModule(item.name, item.kind, item.path, layer.in_features,
                                            layer.out_features, item.r, item.alpha, layer.scaling, item.reason))
    return report


def count_parameters(model: nn.Module, report: PatchReport) -> None:
    params = list(model.parameters())
    report.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    report.total_params = sum(p.numel() for p in params)


def _restore(model: nn.Module, state: PatchState, keep_merged: bool) -> None:
    """Put originals back (merged weights kept when ``keep_merged``), flags and fast-path switches too."""
    for name, original in state.originals.items():
        current = model.get_submodule(name)
        if isinstance(current, LORA_TYPES) and current.merged and not keep_merged:
            current.unmerge()
        set_module(model, name, original)
    if not keep_merged:
        for name, original in state.saved_copies.items():
            set_module(model, name, original)
    for param, flag in state.flags:
        param.requires_grad_(flag)
    for name, switch in state.fastpath.items():
        model.get_submodule(name).activation_relu_or_gelu = switch


def apply_lora(model: nn.Module, config) -> PatchReport:
    """Swap LoRA layers into ``model`` per ``config``; freeze everything else but ``modules_to_save``."""
    check_not_patched(model, "lowcost.apply")
    plan = plan_lora(model, config)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    state = PatchState(config=config, report=PatchReport(family=plan.family), flags=flags)
    try:
        built = _build(model, plan, config)
        state.report = _report(plan, built)
        for param, _ in flags:
            param.requires_grad_(False)
        for name, layer in built.items():
            state.originals[name] = model.get_submodule(name)
            set_module(model, name, layer)
        for name in plan.modules_to_save:
            original = model.get_submodule(name)
            trainable = copy.deepcopy(original).requires_grad_(True)
            state.saved_copies[name] = original
            set_module(model, name, trainable)
        _disable_encoder_fastpath(model, state)
    except BaseException:
        _restore(model, state, keep_merged=False)
        raise
    model.__dict__[STATE_ATTR] = state
    count_parameters(model, state.report)
    return state.report


def remove_lora(model: nn.Module, keep_merged: bool = False) -> None:
    """Undo ``apply_lora``: the original module objects back (``keep_merged``: merged weights and the trained
    ``modules_to_save`` copies stay, for ``merge``)."""
    state = require_state(model, "lowcost.unapply")
    if state.peft_classes:
        for name, cls in state.peft_classes.items():
            model.get_submodule(name).__class__ = cls
    _restore(model, state, keep_merged)
    del model.__dict__[STATE_ATTR]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name → live LoRA layer for every module the patch adapted."""
    state = require_state(model, "lowcost")
    return {m.name: model.get_submodule(m.name) for m in state.report.adapted}


@torch.no_grad()
def set_merged(model: nn.Module, merged: bool) -> None:
    """Fold every adapter into its base weight (fp32, one rounding) or take it back out; modules stay."""
    for layer in lora_layers(model).values():
        if layer.merged != merged:
            layer.merge() if merged else layer.unmerge()
