"""Which modules a LoRA config adapts, and how: a pure planning step that never touches the model.

Name matching is PEFT's (``peft.tuners.tuners_utils.check_target_module_exists``), so that a config means the
same thing in both libraries:
- ``targets`` as a list: a module matches entry ``t`` when its name is ``t`` or ends with ``"." + t``; with
  ``layers_to_transform`` a suffix match must also sit in one of those layer indices (the first number after
  ``layers_pattern``, or after any name part when no pattern is given), while an exact full name never is
  filtered (PEFT's rule);
- ``targets`` as a string: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head), else a
  regex that must match the whole name;
- ``exclude``: the same two forms; ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", name)``;
- ``modules_to_save``: name or suffix; LoRA targets inside those modules are dropped.

Adaptable: ``nn.Linear`` and transformers ``Conv1D`` (fused op), ``nn.Embedding`` (embedding LoRA). A regex
that also meets another module kind says so in the plan (``skipped``); a list entry that names only such
modules is an error; a list entry matching no module at all is allowed, as in PEFT (the plan records it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from lowcost._families import detect_family, output_head
from lowcost.nn.lora_embedding import embedding_blocker
from lowcost.nn.lora_linear import is_conv1d
from lowcost.nn.quantized import QuantizedLinear
from lowcost.ops._quant_backends import resolve_quant_backend

ALL_LINEAR = "all-linear"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Targets = Union[str, Sequence[str]]


@dataclass(frozen=True)
class PlannedModule:
    name: str
    kind: str
    path: str              # "fused" | "fused-conv1d" | "fallback" | "embedding"
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
    unmatched: list[str] = field(default_factory=list)     # list entries that name no module
    notes: list[str] = field(default_factory=list)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def is_adaptable(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, nn.Embedding)


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern rule: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, layers_pattern) -> Optional[int]:
    """PEFT's layer index of ``name``: the first number after ``layers_pattern`` (or after any part)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(found.group("idx")) if found else None


def target_matches(name: str, targets: Targets, layers_to_transform=None, layers_pattern=None) -> bool:
    """PEFT's target rule for one module name (exclusion apart); ``targets`` is not "all-linear"."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if layers_to_transform is None or (isinstance(layers_to_transform, list) and not layers_to_transform):
        return True
    index = layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
    return index is not None and index in wanted


def excluded(name: str, exclude: Optional[Targets]) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name_matches(name, entry) for entry in exclude)


def _kind_reason(module: nn.Module) -> str:
    return f"{type(module).__name__} is not an nn.Linear, Conv1D or nn.Embedding"


def _holds_weights(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _regex_names(modules: dict[str, nn.Module], pattern: str, plan: Plan) -> list[str]:
    hits = [n for n in modules if n and re.fullmatch(pattern, n)]
    other = [n for n in hits if not is_adaptable(modules[n])]
    plan.skipped += [(n, _kind_reason(modules[n])) for n in other if _holds_weights(modules[n])]
    containers = sum(1 for n in other if not _holds_weights(modules[n]))
    if containers:
        plan.notes.append(f"target pattern {pattern!r} also matched {containers} container module(s); only "
                          "the Linear/Conv1D/Embedding modules it matched are adapted")
    names = [n for n in hits if is_adaptable(modules[n])]
    if not names:
        raise ValueError(f"target pattern {pattern!r} matches no nn.Linear, Conv1D or nn.Embedding module in "
                         "the model")
    return names


def _list_names(modules: dict[str, nn.Module], config, plan: Plan) -> list[str]:
    for entry in config.targets:
        hits = [n for n in modules if n and name_matches(n, entry)]
        if not hits:
            plan.unmatched.append(entry)
        elif not any(is_adaptable(modules[n]) for n in hits):
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise ValueError(f"target {entry!r} matches {hits[:3]} ({', '.join(kinds)}), which is not an "
                             "nn.Linear, Conv1D or nn.Embedding; LoRA adapts those only")
    layers = getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None)
    names = [n for n in modules if n and is_adaptable(modules[n]) and target_matches(n, config.targets, *layers)]
    if not names:
        raise ValueError(f"targets {list(config.targets)!r} match no module in the model"
                         + (f" in layers {layers[0]!r}" if layers[0] is not None else ""))
    return names


def _matched_names(modules: dict[str, nn.Module], config, plan: Plan) -> list[str]:
    """Names the targets select (before exclusion), in model order; raises when nothing usable matches."""
    targets = config.targets
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        names = [n for n, m in modules.items() if is_linear_like(m) and n != plan.head]
        if not names:
            raise ValueError("targets='all-linear' matched no nn.Linear or Conv1D in the model")
        return names
    if isinstance(targets, str):
        return _regex_names(modules, targets, plan)
    return _list_names(modules, config, plan)


def _resolve_modules_to_save(modules: dict[str, nn.Module], entries: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for entry in entries or ():
        hits = [n for n in modules if n and name_matches(n, entry)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module in the model")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def module_path(name: str, module: nn.Module, parent: nn.Module) -> tuple[str, str]:
    """("fused" | "fused-conv1d" | "fallback" | "embedding" | "skip", reason)."""
    if isinstance(parent, nn.MultiheadAttention):
        return "skip", ("nn.MultiheadAttention reads out_proj.weight directly, so a swapped module "
                        "would be bypassed")
    if isinstance(module, nn.Embedding):
        blocker = embedding_blocker(module)
        return ("skip", f"embedding LoRA needs a plain nn.Embedding: {blocker}") if blocker else ("embedding", "")
    if is_conv1d(module):
        return "fused-conv1d", ""
    if isinstance(module, QuantizedLinear):
        return "fused", f"quantized base ({module.weight.scheme})"
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
    names = [n for n in _matched_names(modules, config, plan)
             if not excluded(n, config.exclude) and not any(n == s or n.startswith(s + ".") for s in saved)]
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
        if isinstance(modules[name], QuantizedLinear):   # a backend without this format fails here, not later
            weight = modules[name].weight
            resolve_quant_backend(getattr(config, "backend", None), weight.device, int(r), weight.scheme, repr(name))
        plan.modules.append(PlannedModule(name, type(modules[name]).__name__, path, reason, int(r),
                                          float(alpha)))
    if not plan.modules:
        raise ValueError(f"targets={config.targets!r} matched only modules that cannot be adapted: "
                         + "; ".join(f"{n}: {why}" for n, why in plan.skipped))
    return plan
