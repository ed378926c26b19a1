"""What users call: ``LoRAConfig``, ``apply``, ``unapply``, ``save_adapter``, ``load_adapter``, ``merge``,
``accelerate_peft``, and the named-adapter calls ``add_adapter``, ``set_adapter``, ``active_adapters``,
``delete_adapter``, ``disable_adapter``. Thin: the work is in ``lowcost.patch``.
"""
from __future__ import annotations

import copy
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lowcost.checkpoint import CheckpointConfig, apply_checkpointing, checkpointing_of, remove_checkpointing
from lowcost.ops.backend import ENV_VAR, TRITON_MAX_RANK, cuda_kernels_usable, triton_importable
from lowcost.patch import adapter_io, ranks
from lowcost.patch.adapters import active_adapters, delete_adapter, disable_adapter, set_adapter
from lowcost.patch.adapters import add_adapter as _add_adapter
from lowcost.patch.fuse import FUSIONS, apply_fusions, normalize_fused, remove_fusions
from lowcost.patch.merge import DriftReport, merge_model
from lowcost.patch.peft_accel import accelerate_peft
from lowcost.patch.peft_config import lora_kwargs_from_peft, peft_config_for
from lowcost.patch.report import PatchReport
from lowcost.patch.select import plan_lora
from lowcost.patch.swap import (DEFAULT_ADAPTER, apply_lora, lora_layers, original_view, patch_state,
                                remove_lora, require_lowcost_state)
from lowcost.warmstart.schedule import register_lora_switch

__all__ = ["LoRAConfig", "apply", "unapply", "save_adapter", "load_adapter", "merge", "accelerate_peft",
           "add_adapter", "set_adapter", "active_adapters", "delete_adapter", "disable_adapter"]
_BACKENDS = (None, "torch", "triton", "cuda")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _names(what: str, value, allow_none: bool):
    """A str stays a str (regex or "all-linear"); a sequence becomes a tuple of non-empty names."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must not be empty")
        _check_regex(what, value)
        return value
    if not isinstance(value, Sequence) and not isinstance(value, (set, frozenset)):
        raise TypeError(f"{what} must be a str or a list of module names, got {type(value).__name__}")
    value = tuple(value)
    if (not allow_none and not value) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a non-empty list of non-empty module names, got {list(value)!r}")
    return value


def _positive(what: str, value, integer: bool) -> None:
    ok = not isinstance(value, bool) and (isinstance(value, int) if integer else
                                          isinstance(value, (int, float)) and math.isfinite(value))
    if not ok or value <= 0:
        kind = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{what} must be {kind}, got {value!r}")


def _layers(config) -> Optional[tuple]:
    """PEFT's rules for ``layers_to_transform`` (an int or a list of ints) and ``layers_pattern``."""
    layers, pattern = config.layers_to_transform, config.layers_pattern
    if pattern is not None and layers is None:
        raise ValueError("layers_pattern needs layers_to_transform")
    if layers is None:
        return None
    if isinstance(config.targets, str):
        raise ValueError("layers_to_transform needs targets as a list of names (PEFT's rule), not a pattern")
    listed = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(listed, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        and i >= 0 for i in listed):
        raise ValueError(f"layers_to_transform must be an int >= 0 or a list of them, got {layers!r}")
    return layers if isinstance(layers, int) else list(layers)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings. ``targets``: ``"all-linear"``, a regex (full-name match) or a list of names/suffixes
    (``nn.Linear``, transformers ``Conv1D`` and ``nn.Embedding`` modules); ``layers_to_transform`` /
    ``layers_pattern``: keep only those layer indices (PEFT's rule, list targets only);
    ``rank_pattern`` / ``alpha_pattern``: {regex: value} per module (PEFT's rule); ``use_rslora``: scale
    alpha/sqrt(r); ``modules_to_save``: modules trained in full (a trainable copy, like PEFT);
    ``adapter_dtype``: e.g. torch.float32 adapters on a bf16 base; ``backend``: op backend or None."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Union[str, Sequence[str]] = "all-linear"
    exclude: Optional[Union[str, Sequence[str]]] = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    modules_to_save: Sequence[str] = ()
    adapter_dtype: Optional[Union[torch.dtype, str]] = None
    backend: Optional[str] = None
    layers_to_transform: Optional[Union[int, Sequence[int]]] = None
    layers_pattern: Optional[Union[str, Sequence[str]]] = None

    def __post_init__(self):
        _positive("r", self.r, integer=True)
        _positive("alpha", self.alpha, integer=False)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("targets", _names("targets", self.targets, allow_none=False))
        set_("exclude", _names("exclude", self.exclude, allow_none=True))
        modules_to_save = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
        set_("modules_to_save", _names("modules_to_save", tuple(modules_to_save or ()), allow_none=True))
        for what, patterns, integer in (("rank_pattern", self.rank_pattern, True),
                                        ("alpha_pattern", self.alpha_pattern, False)):
            for key, value in dict(patterns or {}).items():
                _check_regex(f"{what} key", key)
                _positive(f"{what}[{key!r}]", value, integer=integer)
            set_(what, dict(patterns or {}))
        set_("layers_to_transform", _layers(self))
        set_("adapter_dtype", _dtype(self.adapter_dtype))
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return _dtype(getattr(torch, value))
    raise ValueError(f"adapter_dtype must be a floating torch.dtype (or its name) or None, got {value!r}")


def _check_backend_here(config: LoRAConfig) -> None:
    """A backend this machine cannot run fails in ``apply``, not at the first forward."""
    source, name = ("backend", config.backend) if config.backend else (ENV_VAR, os.environ.get(ENV_VAR) or None)
    if name == "cuda" and not (torch.cuda.is_available() and cuda_kernels_usable(torch.device("cuda"))):
        why = ("torch sees no CUDA GPU" if not torch.cuda.is_available() else
               "lowcost._C was built without CUDA kernels (rebuild with a CUDA toolkit and a CUDA torch)")
        raise ValueError(f"{source}='cuda' cannot run on this machine: {why}; use backend=None or 'torch'")
    if name == "triton":
        if not triton_importable():
            raise ValueError(f"{source}='triton' cannot run: triton is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{source}='triton' needs a CUDA GPU (torch sees none) or TRITON_INTERPRET=1")
        ranks = [config.r, *config.rank_pattern.values()]
        if max(ranks) > TRITON_MAX_RANK:
            raise ValueError(f"{source}='triton' supports r <= {TRITON_MAX_RANK}, the config asks for "
                             f"r={max(ranks)}")


# ------------------------------------------------------------------------------------------ apply / unapply
def _warn_unmatched(report: PatchReport) -> None:
    for entry in report.unmatched:
        warnings.warn(f"lowcost.apply: target {entry!r} matches no module in the model (the other targets "
                      "were adapted)", UserWarning, stacklevel=3)


def apply(model: nn.Module, lora: Optional[LoRAConfig] = None, checkpoint: Optional[CheckpointConfig] = None,
          *, profile_step=None, adapter_name: str = DEFAULT_ADAPTER,
          fused: Union[None, str, Sequence[str]] = FUSIONS):
    """Freeze ``model`` and swap fused LoRA layers into it per ``lora`` (an adapter named ``adapter_name``),
    and/or install activation checkpointing on its blocks per ``checkpoint``.

    ``fused`` (with ``lora``; default all of ``("mlp", "norm", "qkv", "loss")``, ``None`` for none): the
    fusion passes of ``lowcost.patch.fuse``, each taken where the structure matches and refused with the
    reason elsewhere; ``report.fusion`` lists both. A fused causal-LM forward with labels returns the loss
    and ``logits=None`` (pass ``return_logits=True`` to the forward for logits).

    Returns the LoRA ``PatchReport`` (its ``checkpoint`` field holds the ``CheckpointReport``), or the
    ``CheckpointReport`` alone when only ``checkpoint`` is given. ``profile_step`` (a zero-argument callable
    returning the loss) is needed for ``CheckpointConfig(budget=...)``. A target list entry that matches no
    module is a warning (PEFT accepts it silently). Nothing changes when it raises."""
    if lora is None and checkpoint is None:
        raise ValueError("lowcost.apply needs lora=lowcost.LoRAConfig(...) and/or "
                         "checkpoint=lowcost.CheckpointConfig(...)")
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise TypeError(f"lora must be a lowcost.LoRAConfig, got {type(lora).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, CheckpointConfig):
        raise TypeError(f"checkpoint must be a lowcost.CheckpointConfig, got {type(checkpoint).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ranks.refuse_wrapped(model, "lowcost.apply")
    fused = normalize_fused(fused)
    if lora is not None:
        _check_backend_here(lora)
    report = ranks.collectively("lowcost.apply", lambda: apply_lora(model, lora, adapter_name), _rank_summary(lora),
                                undo=lambda: remove_lora(model)) if lora is not None else None
    if report is not None:
        _warn_unmatched(report)
    if report is not None and fused:
        try:
            report.fusion = apply_fusions(model, fused, avoid=checkpoint.recompute if checkpoint else ())
        except BaseException:
            remove_lora(model)
            raise
    if checkpoint is None:
        return report
    try:
        checkpoint_report = apply_checkpointing(model, checkpoint, profile_step=profile_step)
    except Exception:
        if report is not None:
            remove_fusions(model)
            remove_lora(model)
        raise
    if report is None:
        return checkpoint_report
    report.checkpoint = checkpoint_report
    return report


def _rank_summary(config: LoRAConfig):
    """What ranks must agree on after apply: the LoRA config and every adapted module (torch.distributed)."""
    def describe(report: PatchReport) -> dict:
        adapted = {f"module {m.name}": f"{m.kind} {m.in_features}->{m.out_features} r={m.r} alpha={m.alpha:g}"
                   for m in report.adapted}
        return {**{f"LoRAConfig.{k}": v for k, v in ranks.describe_config(config).items()}, **adapted,
                "modules_to_save": repr(report.modules_to_save)}
    return describe


def add_adapter(model: nn.Module, adapter_name: str, lora: LoRAConfig) -> PatchReport:
    """A further named adapter on a patched model (inactive and frozen until ``set_adapter`` names it, as in
    PEFT). Returns its report; nothing changes when it raises. Like ``apply``: before DDP/FSDP wrap the
    model, and compared across ranks under torch.distributed."""
    if not isinstance(lora, LoRAConfig):
        raise TypeError(f"lora must be a lowcost.LoRAConfig, got {type(lora).__name__}")
    ranks.refuse_wrapped(model, "lowcost.add_adapter")
    _check_backend_here(lora)
    report = ranks.collectively("lowcost.add_adapter", lambda: _add_adapter(model, adapter_name, lora),
                                _rank_summary(lora), undo=lambda: delete_adapter(model, adapter_name))
    _warn_unmatched(report)
    return report


def unapply(model: nn.Module) -> nn.Module:
    """The original modules back (same objects and parameters; merged adapters are taken out first) and
    any checkpointing installed by ``apply`` removed."""
    ranks.refuse_wrapped(model, "lowcost.unapply")
    checkpointed = _has_checkpointing(model)
    remove_fusions(model)
    if not checkpointed or patch_state(model) is not None:
        remove_lora(model)          # raises a clear error when there is nothing to undo at all
    if checkpointed:
        remove_checkpointing(model)
    return model


def _has_checkpointing(model: nn.Module) -> bool:
    try:
        return any(decision.mode != "none" for decision in checkpointing_of(model))
    except (TypeError, ValueError):  # no block list in this model: nothing can be checkpointed
        return False


def merge(model: nn.Module, probe=None, inplace: bool = True, *, safe: bool = True,
          adapters: Optional[Union[str, Sequence[str]]] = None) -> tuple[nn.Module, DriftReport]:
    """Fold adapters into the weights (fp32 accumulate, one rounding) and return plain modules.

    adapters: which to fold (default: the active ones; naming others makes them active first); the others
    are dropped. probe: a tensor or kwargs dict for the logit-drift check (HF models get random input_ids
    (2, 16)). inplace=False merges a deep copy and leaves ``model`` patched. safe (default): every merged
    weight is formed and checked finite before any is written; a NaN/inf raises and nothing changes."""
    ranks.refuse_wrapped(model, "lowcost.merge")
    state = require_lowcost_state(model, "lowcost.merge")
    if state.disabled:
        raise RuntimeError("lowcost.merge: called inside lowcost.disable_adapter(model)")
    chosen = list(state.active) if adapters is None else [adapters] if isinstance(adapters, str) else list(adapters)
    target = model if inplace else copy.deepcopy(model)
    remove_fusions(target)              # merged weights run through the original modules
    previous = list(state.active)
    if chosen != previous:
        set_adapter(target, chosen)
    try:
        return target, merge_model(target, chosen, probe, safe=safe)
    except BaseException:
        if inplace and chosen != previous and patch_state(model) is not None:
            set_adapter(model, previous)
        raise


# ------------------------------------------------------------------------------------------ save / load
def _base_name(model: nn.Module) -> Optional[str]:
    """The model path the user gave ``lowcost.load_pretrained``, else transformers' ``_name_or_path``."""
    info = getattr(model, "lowcost_load_info", None)
    if info is not None and getattr(info, "source", None):
        return str(info.source)
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _adapter_dirs(state, directory, adapter_names) -> dict[str, Path]:
    """PEFT's layout: the adapter named "default" in ``directory``, any other in ``directory/<name>``."""
    names = list(state.adapters) if adapter_names is None else \
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in state.adapters]
    if unknown or not names:
        raise ValueError(f"lowcost.save_adapter: unknown adapter(s) {unknown or names!r}; the model has "
                         f"{list(state.adapters)}")
    return {n: Path(directory) if n == DEFAULT_ADAPTER else Path(directory) / n for n in names}


def save_adapter(model: nn.Module, directory, *, adapter_names=None, overwrite: bool = False) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's layout, atomically, for each
    adapter (default: all; "default" in ``directory``, others in ``directory/<name>``, as PEFT's
    ``save_pretrained``). An existing adapter there is refused unless ``overwrite``.

    Under torch.distributed only rank 0 writes. FSDP2-sharded adapters are gathered to full tensors first,
    which is collective: then every rank must call it (all return once the files exist)."""
    model = ranks.unwrap(model)
    state = require_lowcost_state(model, "lowcost.save_adapter")
    targets = _adapter_dirs(state, directory, adapter_names)
    payloads = {}
    for name in targets:
        entry, layers = state.adapters[name], lora_layers(model, name)
        payloads[name] = {**adapter_io.adapter_tensors(layers, name, entry.copies),
                          **adapter_io.embedding_tables(layers)}
    sharded = any(ranks.any_sharded(tensors.values()) for tensors in payloads.values())
    if sharded or ranks.is_main():  # sharded: every rank checks before the gather, so none waits in it alone
        for path in targets.values():
            adapter_io.check_destination(path, overwrite)
    view_names = list(original_view(model))
    for name, path in targets.items():
        tensors = ranks.full_tensors(payloads[name])
        if ranks.is_main():
            adapter_io.write_adapter(path, peft_config_for(state.adapters[name], view_names, _base_name(model)),
                                     tensors)
    if sharded:
        ranks.barrier()


def _config_from_peft(data: dict, model: nn.Module) -> LoRAConfig:
    view = original_view(model) if patch_state(model) is not None else dict(model.named_modules())
    kwargs = lora_kwargs_from_peft(data, model, list(view))
    return LoRAConfig(**kwargs)


def _check_agrees(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    """Raises ValueError naming each module where the file's config and the patched adapter disagree."""
    state = require_lowcost_state(model, "lowcost.load_adapter")
    entry = state.adapters[adapter_name]
    plan = plan_lora(model, config, modules=original_view(model))
    want = {m.name: m for m in plan.modules}
    have = {m.name: m for m in entry.report.adapted}
    names = lambda items: "[" + adapter_io.listing(repr(n) for n in sorted(items)) + "]"  # noqa: E731
    problems = [f"config targets {names(set(want) - set(have))} which the model does not adapt"] \
        if set(want) - set(have) else []
    if set(have) - set(want):
        problems.append(f"the model adapts {names(set(have) - set(want))} which the config does not target")
    rs = entry.config.use_rslora
    mismatched = [f"module {n!r}: model r={have[n].r} alpha={have[n].alpha:g} rslora={rs}, config "
                  f"r={want[n].r} alpha={want[n].alpha:g} rslora={config.use_rslora}"
                  for n in sorted(set(want) & set(have))
                  if want[n].r != have[n].r or want[n].alpha != have[n].alpha or config.use_rslora != rs]
    if mismatched:
        problems.append(adapter_io.listing(mismatched))
    if problems:
        raise ValueError(f"adapter_config.json disagrees with adapter {adapter_name!r} of the patched model: "
                         + "; ".join(problems))


def _tables(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Embedding tables a PEFT file may carry: of adapted embed_tokens/lm_head (``….base_layer.weight``), and of
    the input/output embeddings of an HF model whose vocabulary was resized (``….weight``)."""
    tables = adapter_io.embedding_tables(layers)
    view = original_view(model)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        path = next((n for n, m in view.items() if m is module and n), None) if module is not None else None
        if path is not None and path not in layers and isinstance(getattr(module, "weight", None), torch.Tensor):
            tables[f"{adapter_io.PREFIX}{path}.weight"] = module.weight
    return tables


def _fill(model: nn.Module, adapter_name: str, tensors: dict) -> None:
    """Checks every file tensor against the model, then copies them in (embedding tables too, as PEFT does)."""
    entry = require_lowcost_state(model, "lowcost.load_adapter").adapters[adapter_name]
    layers = lora_layers(model, adapter_name)
    tables = _tables(model, layers)
    expected = {**adapter_io.adapter_tensors(layers, adapter_name, entry.copies), **tables}
    adapter_io.check_tensors(expected, tensors, optional=tables)
    adapter_io.copy_tensors(expected, tensors)


def load_adapter(model: nn.Module, directory, *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Loads an adapter saved by ``save_adapter`` or by PEFT as adapter ``adapter_name``. An unpatched model is
    patched from the file's config first; on a patched model an existing adapter of that name gets the
    file's values, and a new name is added (inactive until ``set_adapter``, as PEFT's ``load_adapter``).
    Nothing in the model changes when it raises. Under torch.distributed it is not collective; a model that
    DDP or FSDP2 already wraps can only take values for an adapter it has (no new parameters)."""
    model = ranks.unwrap(model)
    data, tensors = adapter_io.read_adapter(directory)
    state = patch_state(model)
    if state is None or adapter_name not in state.adapters:
        ranks.refuse_wrapped(model, "lowcost.load_adapter")
    config = _config_from_peft(data, model)
    if state is None:
        apply_lora(model, config, adapter_name)
        undo = lambda: remove_lora(model)  # noqa: E731
    elif adapter_name in require_lowcost_state(model, "lowcost.load_adapter").adapters:
        _check_agrees(model, config, adapter_name)
        undo = None
    else:
        _add_adapter(model, adapter_name, config)
        undo = lambda: delete_adapter(model, adapter_name)  # noqa: E731
    try:
        _fill(model, adapter_name, tensors)
    except BaseException:
        if undo is not None:
            undo()
        raise
    return model


register_lora_switch(lambda model, config: apply(model, lora=config))  # FreezeThenUnfreeze(then="lora")
