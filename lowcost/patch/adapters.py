"""Several named adapters on one patched model, with PEFT's semantics.

- ``add_adapter(model, name, config)``: a further adapter (it is not active and not trainable until
  ``set_adapter`` names it, as in PEFT). Modules it targets that no adapter holds yet are swapped in; layers
  that hold other adapters get it as one more.
- ``set_adapter(model, name | [names])``: which adapters run; their outputs add up. The active adapters are
  trainable, the others frozen; at a ``modules_to_save`` path the active adapter's copy is in place.
- ``delete_adapter(model, name)``: removes it; a layer left without adapters gets its original module back.
- ``disable_adapter(model)``: a context manager under which the model computes the base model (LoRA terms
  off, original ``modules_to_save`` modules in place, merged adapters taken out and put back on exit).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence, Union

from torch import nn

from lowcost.nn.adapters import AdapterSpec
from lowcost.patch.report import PatchReport
from lowcost.patch.select import plan_lora
from lowcost.patch.swap import (AdapterEntry, build_layer, count_parameters, disable_encoder_fastpath, lora_layers,
                                original_view, plan_report, require_lowcost_state, require_state, set_module,
                                swap_in, sync_layers)


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {name!r}")
    return name


def _check_conflicts(state, plan, name: str) -> None:
    """A module can be LoRA-adapted by some adapters or trained in full by others, not both."""
    saved = set(state.saved_copies)
    adapted = {m for entry in state.adapters.values() for m in entry.report.names}
    clash = [m.name for m in plan.modules if any(m.name == s or m.name.startswith(s + ".") for s in saved)]
    clash += [s for s in plan.modules_to_save if any(a == s or a.startswith(s + ".") for a in adapted)]
    if clash:
        raise ValueError(f"adapter {name!r}: {sorted(set(clash))} would be LoRA-adapted by one adapter and "
                         "trained in full (modules_to_save) by another; lowcost keeps one role per module")


def add_adapter(model: nn.Module, name: str, config) -> PatchReport:
    """Adds adapter ``name`` made from ``config`` (a LoRAConfig) to a patched model; nothing changes when it
    raises. Returns its report."""
    state = require_lowcost_state(model, "lowcost.add_adapter")
    if _check_name(name) in state.adapters:
        raise ValueError(f"lowcost.add_adapter: the model already has an adapter named {name!r}")
    plan = plan_lora(model, config, modules=original_view(model))
    _check_conflicts(state, plan, name)
    extended, built = [], {}
    try:
        for item in plan.modules:
            if item.name in state.originals:
                layer = model.get_submodule(item.name)
                layer.add_adapter(name, AdapterSpec(item.r, item.alpha, config.dropout, config.use_rslora),
                                  dtype=config.adapter_dtype)
                extended.append(layer)
            else:
                built[item.name] = build_layer(model.get_submodule(item.name), item.path, config, item.r,
                                               item.alpha, name)
        layers = {i.name: built[i.name] if i.name in built else model.get_submodule(i.name) for i in plan.modules}
        report = plan_report(plan, layers, name)
        entry = AdapterEntry(config, report)
        for path in plan.modules_to_save:
            state.saved_copies.setdefault(path, model.get_submodule(path))
            entry.copies[path] = copy.deepcopy(state.saved_copies[path])
        swap_in(model, state, built)
        disable_encoder_fastpath(model, state, report)
    except BaseException:
        for layer in extended:
            layer.delete_adapter(name)
        for path in built:
            if path in state.originals and model.get_submodule(path) is built[path]:
                set_module(model, path, state.originals.pop(path))
        raise
    state.adapters[name] = entry
    sync_layers(model, state)
    count_parameters(model, report)
    return report


def set_adapter(model: nn.Module, names: Union[str, Sequence[str]]) -> None:
    """Makes ``names`` the active adapters (one name or a list; outputs of several add up)."""
    state = require_lowcost_state(model, "lowcost.set_adapter")
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.adapters]
    if not names or unknown:
        raise ValueError(f"lowcost.set_adapter: unknown adapter(s) {unknown or names!r}; the model has "
                         f"{list(state.adapters)}")
    for path in state.saved_copies:
        owners = [n for n in names if path in state.adapters[n].copies]
        if len(owners) > 1:
            raise ValueError(f"lowcost.set_adapter: adapters {owners} each train their own copy of {path!r} "
                             "(modules_to_save); only one of them can be active")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("lowcost.set_adapter: adapters are merged into the weights; unmerge them first")
    state.active = list(dict.fromkeys(names))
    sync_layers(model, state)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that run."""
    return list(require_state(model, "lowcost.active_adapters").active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter ``name``; the model's only adapter cannot be deleted (``lowcost.unapply`` does that)."""
    state = require_lowcost_state(model, "lowcost.delete_adapter")
    if name not in state.adapters:
        raise ValueError(f"lowcost.delete_adapter: no adapter named {name!r}; the model has {list(state.adapters)}")
    if len(state.adapters) == 1:
        raise ValueError(f"lowcost.delete_adapter: {name!r} is the model's only adapter; use lowcost.unapply")
    layers = lora_layers(model, name)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("lowcost.delete_adapter: adapters are merged into the weights; unmerge them first")
    for path, layer in layers.items():
        if len(layer.adapter_names) == 1:
            set_module(model, path, state.originals.pop(path))
        else:
            layer.delete_adapter(name)
    entry = state.adapters.pop(name)
    for path in entry.copies:
        if not any(path in other.copies for other in state.adapters.values()):
            set_module(model, path, state.saved_copies.pop(path))
    state.active = [n for n in state.active if n != name] or [next(iter(state.adapters))]
    sync_layers(model, state)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model): ...`` runs the base model: every LoRA term off, original
    ``modules_to_save`` modules in place. Merged adapters are taken out for the duration and merged back."""
    state = require_state(model, "lowcost.disable_adapter")
    if state.config is None:                        # accelerate_peft: PEFT's own switch (the fused forward
        with model.disable_adapter():               # defers to PEFT's while it is on)
            yield model
        return
    if state.disabled:
        raise RuntimeError("lowcost.disable_adapter: the adapters are already disabled (nested use)")
    merged = {path: layer.merged_adapters for path, layer in lora_layers(model).items() if layer.merged}
    for path in merged:
        model.get_submodule(path).unmerge()
    state.disabled = True
    sync_layers(model, state, trainable=False)
    try:
        yield model
    finally:
        state.disabled = False
        sync_layers(model, state, trainable=False)
        for path, names in merged.items():
            model.get_submodule(path).merge(names)

