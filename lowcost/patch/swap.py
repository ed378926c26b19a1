"""Swap LoRA layers into a model by name, reversibly.

``apply_lora`` plans first (``select.plan_lora``: nothing touched), then builds every new module, freezes
the base, swaps, and on any error puts everything back. The original modules, the ``requires_grad`` flags
and the ``nn.TransformerEncoderLayer`` fast-path switches are kept in a ``PatchState`` on the model
(``model._lowcost_patch``), so that ``remove_lora`` restores the exact original module objects.

A patched model holds one or more named adapters (``PatchState.adapters``, the first one made by
``apply_lora``; more by ``lowcost.patch.adapters.add_adapter``). Each LoRA layer holds the adapters that
target it; ``PatchState.active`` says which run, and a ``modules_to_save`` path holds the trainable copy of
the active adapter that has one (the original module otherwise, or while the adapters are disabled).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowcost.nn.lora_embedding import LoRAEmbedding
from lowcost.nn.lora_linear import LoRALinear
from lowcost.patch.fallback import LoRAFallback
from lowcost.patch.report import AdaptedModule, PatchReport, SkippedModule
from lowcost.patch.select import Plan, plan_lora

STATE_ATTR = "_lowcost_patch"
LORA_TYPES = (LoRALinear, LoRAFallback, LoRAEmbedding)
DEFAULT_ADAPTER = "default"


@dataclass
class AdapterEntry:
    """One named adapter: the config it was made from, its report and its ``modules_to_save`` copies."""
    config: object
    report: PatchReport
    copies: dict = field(default_factory=dict)             # modules_to_save name → this adapter's trained copy


@dataclass
class PatchState:
    """Everything needed to undo a patch. ``originals``: name → module that was there before."""
    config: object                                         # the first adapter's config (None: accelerate_peft)
    report: PatchReport                                    # the report ``apply`` returned
    originals: dict = field(default_factory=dict)
    saved_copies: dict = field(default_factory=dict)       # modules_to_save name → original module
    flags: list = field(default_factory=list)              # (parameter, requires_grad) before the patch
    fastpath: dict = field(default_factory=dict)           # TransformerEncoderLayer name → old switch
    peft_classes: dict = field(default_factory=dict)       # accelerate_peft: name → original class
    adapters: dict = field(default_factory=dict)           # adapter name → AdapterEntry, in creation order
    active: list = field(default_factory=list)
    disabled: bool = False


def patch_state(model: nn.Module) -> Optional[PatchState]:
    return model.__dict__.get(STATE_ATTR)


def require_state(model: nn.Module, caller: str) -> PatchState:
    state = patch_state(model)
    if state is None:
        raise RuntimeError(f"{caller}: the model is not patched by lowcost (call lowcost.apply first)")
    return state


def require_lowcost_state(model: nn.Module, caller: str) -> PatchState:
    """The state of a model patched by ``lowcost.apply`` (not by ``accelerate_peft``)."""
    state = require_state(model, caller)
    if state.config is None:
        raise RuntimeError(f"{caller}: this is an accelerate_peft model; use PEFT's own API for it")
    return state


def check_not_patched(model: nn.Module, caller: str) -> None:
    if patch_state(model) is not None:
        raise RuntimeError(f"{caller}: the model is already patched by lowcost; call lowcost.unapply(model) "
                           "before applying again, or lowcost.add_adapter(model, name, config) for another adapter")
    for name, module in model.named_modules():
        if isinstance(module, LORA_TYPES):
            raise RuntimeError(f"{caller}: module {name!r} is already a {type(module).__name__}")
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            raise RuntimeError(f"{caller}: module {name!r} is a PEFT LoRA layer; use lowcost.accelerate_peft "
                               "for PEFT models")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def build_layer(base: nn.Module, path: str, config, r: int, alpha: float, adapter_name: str) -> nn.Module:
    """The LoRA layer for one planned module."""
    kwargs = dict(r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                  adapter_dtype=config.adapter_dtype, adapter_name=adapter_name)
    if path == "fallback":
        return LoRAFallback(base, **kwargs)
    if path == "embedding":
        return LoRAEmbedding(base, **kwargs)
    return LoRALinear(base, backend=config.backend, **kwargs)


def _build(model: nn.Module, plan: Plan, config, adapter_name: str) -> dict[str, nn.Module]:
    return {item.name: build_layer(model.get_submodule(item.name), item.path, config, item.r, item.alpha,
                                   adapter_name) for item in plan.modules}


def disable_encoder_fastpath(model: nn.Module, state: PatchState, report: PatchReport) -> None:
    """``nn.TransformerEncoderLayer``'s eval fast path reads ``linear1.weight`` itself, bypassing the swapped
    modules; its ``activation_relu_or_gelu`` switch is only read by that check, so clearing it turns the
    fast path (and ``nn.TransformerEncoder``'s nested-tensor path) off for patched layers."""
    adapted = tuple(state.originals)
    for name, module in model.named_modules():
        if name in state.fastpath or not isinstance(module, nn.TransformerEncoderLayer):
            continue
        if any(a.startswith(name + ".") for a in adapted):
            state.fastpath[name] = module.activation_relu_or_gelu
            module.activation_relu_or_gelu = 0
            report.notes.append(f"{name}: nn.TransformerEncoderLayer eval fast path disabled (it reads "
                                "linear1/linear2 weights directly)")


def plan_report(plan: Plan, layers: dict[str, nn.Module], adapter_name: str) -> PatchReport:
    report = PatchReport(family=plan.family, modules_to_save=list(plan.modules_to_save), excluded_head=plan.head,
                         skipped=[SkippedModule(n, why) for n, why in plan.skipped], adapter=adapter_name,
                         notes=list(plan.notes), unmatched=list(plan.unmatched))
    report.notes += [f"target {entry!r} matches no module in the model" for entry in plan.unmatched]
    for item in plan.modules:
        layer = layers[item.name]
        report.adapted.append(AdaptedModule(item.name, item.kind, item.path, layer.in_features,
                                            layer.out_features, item.r, item.alpha,
                                            layer.spec(adapter_name).scaling, item.reason))
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
            set_module(model, name, _like(original, model.get_submodule(name)))
    for param, flag in state.flags:
        param.requires_grad_(flag)
    for name, switch in state.fastpath.items():
        model.get_submodule(name).activation_relu_or_gelu = switch


def _like(module: nn.Module, current: nn.Module) -> nn.Module:
    """``module`` on the device (and floating dtype) of ``current``, the module it replaces at one path: a
    model moved with ``.to()`` after the patch moved only what was in its tree."""
    ref = next(current.parameters(), None)
    mine = next(module.parameters(), None)
    if ref is None or mine is None or (mine.device == ref.device and mine.dtype == ref.dtype):
        return module
    return module.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)


def place_saved_modules(model: nn.Module, state: PatchState) -> None:
    """At each modules_to_save path: the copy of the active adapter that has one, else the original (and the
    original while the adapters are disabled)."""
    for name, original in state.saved_copies.items():
        owners = [] if state.disabled else [a for a in state.active if name in state.adapters[a].copies]
        wanted = state.adapters[owners[0]].copies[name] if owners else original
        current = model.get_submodule(name)
        if wanted is not current:
            set_module(model, name, _like(wanted, current))


def sync_layers(model: nn.Module, state: PatchState, trainable: bool = True) -> None:
    """Pushes the active set and the disabled switch to every LoRA layer and places the saved copies;
    ``trainable``: also make the active adapters (and their copies) trainable and the others frozen, as PEFT's
    set_adapter does (``disable_adapter`` leaves the flags alone)."""
    for layer in _live_layers(model, state).values():
        layer.active, layer.disabled = tuple(state.active), state.disabled
        if trainable:
            layer.set_trainable(state.active)
    for adapter, entry in state.adapters.items():
        for module in entry.copies.values() if trainable else ():
            module.requires_grad_(adapter in state.active)
    place_saved_modules(model, state)


def swap_in(model: nn.Module, state: PatchState, built: dict[str, nn.Module]) -> None:
    for name, layer in built.items():
        state.originals[name] = model.get_submodule(name)
        set_module(model, name, layer)


def apply_lora(model: nn.Module, config, adapter_name: str = DEFAULT_ADAPTER) -> PatchReport:
    """Swap LoRA layers into ``model`` per ``config``; freeze everything else but ``modules_to_save``."""
    check_not_patched(model, "lowcost.apply")
    plan = plan_lora(model, config)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    state = PatchState(config=config, report=PatchReport(family=plan.family), flags=flags, active=[adapter_name])
    try:
        built = _build(model, plan, config, adapter_name)
        state.report = plan_report(plan, built, adapter_name)
        entry = state.adapters[adapter_name] = AdapterEntry(config, state.report)
        for param, _ in flags:
            param.requires_grad_(False)
        swap_in(model, state, built)
        for name in plan.modules_to_save:
            state.saved_copies[name] = model.get_submodule(name)
            entry.copies[name] = copy.deepcopy(state.saved_copies[name])
        sync_layers(model, state)
        disable_encoder_fastpath(model, state, state.report)
    except BaseException:
        _restore(model, state, keep_merged=False)
        raise
    model.__dict__[STATE_ATTR] = state
    count_parameters(model, state.report)
    return state.report


def remove_lora(model: nn.Module, keep_merged: bool = False) -> None:
    """Undo ``apply_lora``: the original module objects back (``keep_merged``: merged weights and the trained
    ``modules_to_save`` copies in place stay, for ``merge``)."""
    state = require_state(model, "lowcost.unapply")
    if state.peft_classes:
        for name, cls in state.peft_classes.items():
            model.get_submodule(name).__class__ = cls
    _restore(model, state, keep_merged)
    del model.__dict__[STATE_ATTR]


def lora_layers(model: nn.Module, adapter: Optional[str] = None) -> dict[str, nn.Module]:
    """name → live LoRA layer: of every adapted module, or of those ``adapter`` adapts."""
    return _live_layers(model, require_state(model, "lowcost"), adapter)


def _live_layers(model: nn.Module, state: PatchState, adapter: Optional[str] = None) -> dict[str, nn.Module]:
    if adapter is not None:
        if adapter not in state.adapters:
            raise KeyError(f"the model has no adapter named {adapter!r} (it has {list(state.adapters)})")
        names = state.adapters[adapter].report.names
    elif state.adapters:
        names = list(dict.fromkeys(n for entry in state.adapters.values() for n in entry.report.names))
    else:
        names = state.report.names
    return {name: model.get_submodule(name) for name in names}


def original_view(model: nn.Module) -> dict[str, nn.Module]:
    """name → module of the model as it was before the patch (LoRA layers shown as their originals)."""
    state = require_state(model, "lowcost")
    view = {}
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in state.originals):
            continue
        view[name] = state.originals.get(name, module)
    return view


@torch.no_grad()
def set_merged(model: nn.Module, merged: bool) -> None:
    """Fold the active adapters into the base weights (fp32, one rounding) or take them back out; modules stay."""
    for layer in lora_layers(model).values():
        if layer.merged != merged and (not merged or any(n in layer.adapter_names for n in layer.active)):
            layer.merge() if merged else layer.unmerge()
