"""What users call: ``LoRAConfig``, ``apply``, ``unapply``, ``save_adapter``, ``load_adapter``, ``merge``,
``accelerate_peft``. Thin: the work is in ``lowcost.patch``.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lowcost.checkpoint import CheckpointConfig, apply_checkpointing, checkpointing_of, remove_checkpointing
from lowcost.patch import adapter_io, ranks
from lowcost.patch.merge import DriftReport, merge_model
from lowcost.patch.peft_accel import accelerate_peft
from lowcost.patch.report import PatchReport
from lowcost.patch.select import name_matches, plan_lora
from lowcost.patch.swap import apply_lora, lora_layers, patch_state, remove_lora, require_state
from lowcost.warmstart.schedule import register_lora_switch

__all__ = ["LoRAConfig", "apply", "unapply", "save_adapter", "load_adapter", "merge", "accelerate_peft"]
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


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings. ``targets``: ``"all-linear"``, a regex (full-name match) or a list of names/suffixes;
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
        set_("adapter_dtype", _dtype(self.adapter_dtype))
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return _dtype(getattr(torch, value))
    raise ValueError(f"adapter_dtype must be a floating torch.dtype (or its name) or None, got {value!r}")


# ------------------------------------------------------------------------------------------ apply / unapply
def apply(model: nn.Module, lora: Optional[LoRAConfig] = None, checkpoint: Optional[CheckpointConfig] = None,
          *, profile_step=None):
    """Freeze ``model`` and swap fused LoRA layers into it per ``lora``, and/or install activation
    checkpointing on its blocks per ``checkpoint``.

    Returns the LoRA ``PatchReport`` (its ``checkpoint`` field holds the ``CheckpointReport``), or the
    ``CheckpointReport`` alone when only ``checkpoint`` is given. ``profile_step`` (a zero-argument callable
    returning the loss) is needed for ``CheckpointConfig(budget=...)``. Nothing changes when it raises."""
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
    report = ranks.collectively("lowcost.apply", lambda: apply_lora(model, lora), _rank_summary(lora),
                                undo=lambda: remove_lora(model)) if lora is not None else None
    if checkpoint is None:
        return report
    try:
        checkpoint_report = apply_checkpointing(model, checkpoint, profile_step=profile_step)
    except Exception:
        if report is not None:
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


def unapply(model: nn.Module) -> nn.Module:
    """The original modules back (same objects and parameters; merged adapters are taken out first) and
    any checkpointing installed by ``apply`` removed."""
    ranks.refuse_wrapped(model, "lowcost.unapply")
    checkpointed = _has_checkpointing(model)
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


def merge(model: nn.Module, probe=None, inplace: bool = True) -> tuple[nn.Module, DriftReport]:
    """Fold every adapter into its weight (fp32 accumulate, one rounding) and return plain modules.

    probe: a tensor or kwargs dict for the logit-drift check (HF models get random input_ids (2, 16)).
    inplace=False merges a deep copy and leaves ``model`` patched."""
    ranks.refuse_wrapped(model, "lowcost.merge")
    state = require_state(model, "lowcost.merge")
    if state.config is None:
        raise RuntimeError("lowcost.merge: this is an accelerate_peft model; use PEFT's merge_and_unload")
    target = model if inplace else copy.deepcopy(model)
    return target, merge_model(target, probe)


# ------------------------------------------------------------------------------------------ save / load
def _saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in require_state(model, "lowcost").report.modules_to_save}


def _peft_config(model: nn.Module) -> dict:
    state = require_state(model, "lowcost.save_adapter")
    config, report = state.config, state.report
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(report.names), "exclude_modules": None,
        "rank_pattern": {m.name: m.r for m in report.adapted if m.r != config.r},
        "alpha_pattern": {m.name: m.alpha for m in report.adapted if m.alpha != config.alpha},
        "use_rslora": config.use_rslora, "modules_to_save": list(report.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": any(m.path == "fused-conv1d" for m in report.adapted),
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None,
    }


def save_adapter(model: nn.Module, directory) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's layout, atomically.

    Under torch.distributed only rank 0 writes. FSDP2-sharded adapters are gathered to full tensors first,
    which is collective: then every rank must call it (all return once the files exist)."""
    model = ranks.unwrap(model)
    state = require_state(model, "lowcost.save_adapter")
    if state.config is None:
        raise RuntimeError("lowcost.save_adapter: this is an accelerate_peft model; use save_pretrained")
    tensors = adapter_io.adapter_tensors(lora_layers(model), _saved_modules(model))
    sharded = ranks.any_sharded(tensors.values())
    tensors = ranks.full_tensors(tensors)
    if ranks.is_main():
        adapter_io.write_adapter(directory, _peft_config(model), tensors)
    if sharded:
        ranks.barrier()


_UNSUPPORTED = {"use_dora": True, "lora_bias": True}


def _config_from_peft(data: dict, model: nn.Module) -> LoRAConfig:
    """A LoRAConfig from PEFT's adapter_config.json fields; refuses what lowcost does not implement."""
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type {data.get('peft_type')!r} is not LORA")
    for key, bad in _UNSUPPORTED.items():
        if data.get(key) == bad:
            raise ValueError(f"adapter_config.json: {key}={bad} is not supported by lowcost")
    for key in ("layers_to_transform", "target_parameters", "trainable_token_indices"):
        if data.get(key):
            raise ValueError(f"adapter_config.json: {key}={data[key]!r} is not supported by lowcost")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json: bias={data['bias']!r} is not supported (only 'none')")
    if not data.get("target_modules"):
        raise ValueError("adapter_config.json: target_modules is missing")
    names = [n for n, _ in model.named_modules() if n]
    keep = [m for m in data.get("modules_to_save") or () if any(name_matches(n, m) for n in names)]
    return LoRAConfig(r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                      targets=data["target_modules"], exclude=data.get("exclude_modules"),
                      rank_pattern=data.get("rank_pattern") or {}, alpha_pattern=data.get("alpha_pattern") or {},
                      use_rslora=bool(data.get("use_rslora", False)), modules_to_save=keep)


def _original_view(model: nn.Module) -> dict[str, nn.Module]:
    """name → module of the model as it was before the patch (LoRA layers shown as their originals)."""
    state = require_state(model, "lowcost")
    view = {}
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in state.originals):
            continue
        view[name] = state.originals.get(name, module)
    return view


def _check_agrees(model: nn.Module, config: LoRAConfig) -> None:
    """Raises ValueError naming each module where the file's config and the patched model disagree."""
    state = require_state(model, "lowcost.load_adapter")
    plan = plan_lora(model, config, modules=_original_view(model))
    want = {m.name: m for m in plan.modules}
    have = {m.name: m for m in state.report.adapted}
    problems = [f"config targets {sorted(set(want) - set(have))} which the model does not adapt"] \
        if set(want) - set(have) else []
    if set(have) - set(want):
        problems.append(f"the model adapts {sorted(set(have) - set(want))} which the config does not target")
    rs = state.config.use_rslora
    for name in sorted(set(want) & set(have)):
        w, h = want[name], have[name]
        if w.r != h.r or w.alpha != h.alpha or config.use_rslora != rs:
            problems.append(f"module {name!r}: model r={h.r} alpha={h.alpha:g} rslora={rs}, config r={w.r} "
                            f"alpha={w.alpha:g} rslora={config.use_rslora}")
    if problems:
        raise ValueError("adapter_config.json disagrees with the patched model: " + "; ".join(problems))


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Loads an adapter saved by ``save_adapter`` or by PEFT. An unpatched model is patched from the file's
    config first. Nothing in the model changes when it raises."""
    model = ranks.unwrap(model)
    data, tensors = adapter_io.read_adapter(directory)
    config = _config_from_peft(data, model)
    fresh = patch_state(model) is None
    if fresh:
        apply(model, lora=config)
    try:
        if not fresh:
            if patch_state(model).config is None:
                raise RuntimeError("lowcost.load_adapter: this is an accelerate_peft model; use PEFT's loader")
            _check_agrees(model, config)
        expected = adapter_io.adapter_tensors(lora_layers(model), _saved_modules(model))
        adapter_io.check_tensors(expected, tensors)
        adapter_io.copy_tensors(expected, tensors)
    except BaseException:
        if fresh:
            remove_lora(model)
        raise
    return model


register_lora_switch(lambda model, config: apply(model, lora=config))  # FreezeThenUnfreeze(then="lora")
