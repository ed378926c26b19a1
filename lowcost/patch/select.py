"""Which modules a LoRA config adapts, and how: a pure planning step that never touches the model.

Name matching follows PEFT so that configs mean the same thing in both libraries:
- ``targets`` as a list: a module matches entry ``t`` when its name is ``t`` or ends with ``"." + t``;
- ``targets`` as a string: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head), else a
  regex that must match the whole name;
- ``exclude``: the same two forms; ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", name)``;
- ``modules_to_save``: name or suffix; LoRA targets inside those modules are dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from lowcost._families import detect_family, output_head
from lowcost.nn.lora_linear import is_conv1d

ALL_LINEAR = "all-linear"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Targets = Union[str, Sequence[str]]


@dataclass(frozen=True)
class PlannedModule:
    name: str
    kind: str
    path: str              # "fused" | "fused-conv1d" | "fallback"
    reason: str
    r: int
    alpha: float


@dataclass
class Plan:
    family: str
    modules: list[PlannedModule] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    head: Optional[str] = None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern rule: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _excluded(name: str, exclude: Optional[Targets]) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name_matches(name, entry) for entry in exclude)


def _matched_names(modules: dict[str, nn.Module], targets: Targets, head: Optional[str]) -> list[str]:
    """Names the targets select (before exclusion); raises when a pattern matches nothing usable."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        names = [n for n, m in modules.items() if is_linear_like(m) and n != head]
        if not names:
            raise ValueError("targets='all-linear' matched no nn.Linear or Conv1D in the model")
        return names
    if isinstance(targets, str):
        names = [n for n, m in modules.items() if is_linear_like(m) and re.fullmatch(targets, n)]
        if not names:
            raise ValueError(f"target pattern {targets!r} matches no nn.Linear or Conv1D module in the model")
        return names
    selected: list[str] = []
    for entry in targets:
        hits = [n for n in modules if n and name_matches(n, entry)]
        linear = [n for n in hits if is_linear_like(modules[n])]
        if not hits:
            raise ValueError(f"target {entry!r} matches no module in the model")
        if not linear:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(f"target {entry!r} matches {hits[:3]} ({', '.join(kinds)}), which is not an "
                             f"nn.Linear or Conv1D; LoRA adapts linear layers only")
        selected += [n for n in linear if n not in selected]
    chosen = set(selected)
    return [n for n in modules if n in chosen]          # model order


def _resolve_modules_to_save(modules: dict[str, nn.Module], entries: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for entry in entries or ():
        hits = [n for n in modules if n and name_matches(n, entry)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module in the model")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def module_path(name: str, module: nn.Module, parent: nn.Module) -> tuple[str, str]:
    """("fused" | "fused-conv1d" | "fallback" | "skip", reason)."""
    if isinstance(parent, nn.MultiheadAttention):
        return "skip", ("nn.MultiheadAttention reads out_proj.weight directly, so a swapped module "
                        "would be bypassed")
    if is_conv1d(module):
        return "fused-conv1d", ""
    weight = module.weight
    if type(module).forward is not nn.Linear.forward:
        return "fallback", f"{type(module).__name__} overrides forward; the adapter is added to its output"
    if type(weight.data) is not torch.Tensor or weight.dtype not in FUSED_DTYPES:
        return "fallback", f"weight {type(weight.data).__name__} {weight.dtype} is not taken by the fused op"
    return "fused", ""


def plan_lora(model: nn.Module, config, modules: Optional[dict] = None) -> Plan:
    """Resolve ``config`` (a LoRAConfig-like object) against ``model``; raises ValueError naming the pattern.

    ``modules`` (name → module) replaces ``model.named_modules()``, e.g. a patched model's original view.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    head = output_head(model) if isinstance(config.targets, str) and config.targets.lower() == ALL_LINEAR \
        else None
    plan = Plan(family=detect_family(model).name, head=head)
    plan.modules_to_save = _resolve_modules_to_save(modules, config.modules_to_save)
    saved = tuple(plan.modules_to_save)
    names = [n for n in _matched_names(modules, config.targets, head)
             if not _excluded(n, config.exclude) and not any(n == s or n.startswith(s + ".") for s in saved)]
    if not names:
        raise ValueError(f"every module matched by targets={config.targets!r} is excluded "
                         f"(exclude={config.exclude!r}, modules_to_save={list(saved)})")
    for name in names:
        path, reason = module_path(name, modules[name], modules[name.rpartition(".")[0]])
        if path == "skip":
            plan.skipped.append((name, reason))
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha)
        plan.modules.append(PlannedModule(name, type(modules[name]).__name__, path, reason, int(r),
                                          float(alpha)))
    if not plan.modules:
        raise ValueError(f"targets={config.targets!r} matched only modules that cannot be adapted: "
                         + "; ".join(f"{n}: {why}" for n, why in plan.skipped))
    return plan
