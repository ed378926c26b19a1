"""PEFT's ``adapter_config.json``, both ways, so that a file means the same model in PEFT and in lowcost.

Reading (``lora_kwargs_from_peft``): every field of PEFT 0.21's ``LoraConfig`` is either implemented, plain
metadata, or refused with a ValueError naming the field (``FIELDS`` below says which and why); an unknown
field is refused unless it is empty. Modules_to_save entries are resolved with PEFT's own rule (a module whose
name ends with the entry), target list entries that match nothing are allowed (PEFT allows them).

Writing (``peft_config_for``): the adapted set must come back exactly when PEFT reads the file. The user's
``targets`` / ``exclude`` / layer filter are written when PEFT's matcher resolves them to exactly the modules
lowcost adapted (readable and faithful); otherwise ``target_modules`` is a regex that full-matches exactly those
names (PEFT's string form) and ``exclude_modules`` is left out. Rank and alpha patterns are written as given
when PEFT's first-match rule reproduces every module's value, else as one anchored, escaped key per module.
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from lowcost.patch.select import ALL_LINEAR, excluded, pattern_value, target_matches

_CONVERT = ("PEFT rewrites the base weights when it loads this adapter (W - s*B0*A0 from the initial factors) "
            "and lowcost does not; write a plain LoRA file from PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<initial adapter dir>) and load that")
INIT_OK = (True, False, "gaussian", "orthogonal", "eva")     # only set A/B, which the file overwrites
METADATA = ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "megatron_core", "qalora_group_size", "runtime_config",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config")   # the last four: used only by inits
IMPLEMENTED = ("peft_type", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
               "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
               "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "ensure_weight_tying")
REFUSED = {
    "megatron_config": "Megatron tensor-parallel LoRA layers",
    "trainable_token_indices": "trainable token rows (PEFT's TrainableTokens); use embedding LoRA or "
                               "lowcost.warmstart.add_tokens",
    "use_dora": "DoRA (a learned magnitude per output row)",
    "velora_config": "VeLoRA (compressed activations in backward change the gradients)",
    "alora_invocation_tokens": "aLoRA (the adapter acts only after the invocation tokens)",
    "use_qalora": "QA-LoRA (pooled inputs for GPTQ layers)",
    "monteclora_config": "MonteCLoRA (sampled adapters)",
    "layer_replication": "layer replication (the model's block list is rebuilt)",
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on bare nn.Parameters",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (an SVD-truncated base weight and a learned diagonal)",
}


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"adapter_config.json: {field}={value!r}: {why}")


def _check_init(value) -> None:
    if value in INIT_OK and (isinstance(value, bool) or isinstance(value, str)):
        return
    if isinstance(value, str) and (value.startswith("pissa") or value in ("olora", "corda", "loftq", "lora_ga")):
        raise _refuse("init_lora_weights", value, _CONVERT)
    if value == "mica":
        raise _refuse("init_lora_weights", value, "MiCA keeps lora_B frozen while training; lowcost trains both "
                                                  "factors, so it is not implemented")
    raise _refuse("init_lora_weights", value, "an initialisation lowcost does not know; it may change the "
                                              "base weights, so the file is not loaded")


def _tied(model: nn.Module) -> bool:
    seen = set()
    for _, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            if id(weight) in seen:
                return True
            seen.add(id(weight))
    return False


def check_fields(data: dict, model: nn.Module) -> None:
    """Raises ValueError for every field whose meaning lowcost does not implement (see the module docstring)."""
    if data.get("peft_type", "LORA") != "LORA":
        raise _refuse("peft_type", data.get("peft_type"), "only LoRA adapters are read")
    for field, why in REFUSED.items():
        if data.get(field):
            raise _refuse(field, data[field], f"{why} is not implemented by lowcost")
    if data.get("bias", "none") != "none":
        raise _refuse("bias", data["bias"], "trained biases of the base model are not implemented (only 'none')")
    _check_init(data.get("init_lora_weights", True))
    if data.get("ensure_weight_tying") and _tied(model):
        raise _refuse("ensure_weight_tying", True, "this model has tied weights and PEFT would tie the adapters "
                                                   "of tied modules; lowcost does not")
    known = set(METADATA) | set(IMPLEMENTED) | set(REFUSED)
    unknown = sorted(k for k, v in data.items() if k not in known and v not in (None, False, [], {}, ""))
    if unknown:
        raise ValueError(f"adapter_config.json: unknown field(s) {unknown} (newer PEFT?); lowcost cannot tell "
                         "whether they change the adapter's math, so the file is not loaded")


def peft_modules_to_save(entries, names: list[str]) -> list[str]:
    """PEFT's rule: every module whose name ends with an entry (no dot needed), as full names."""
    return [n for n in names if n and any(n.endswith(entry) for entry in entries or ())]


def lora_kwargs_from_peft(data: dict, model: nn.Module, names: list[str]) -> dict:
    """LoRAConfig keyword arguments from PEFT's adapter_config.json fields (after ``check_fields``); ``names``:
    the model's module names as PEFT sees them (a patched model's original view)."""
    check_fields(data, model)
    if not data.get("target_modules"):
        raise ValueError("adapter_config.json: target_modules is missing")
    targets = data["target_modules"]
    return dict(r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                targets=targets if isinstance(targets, str) else sorted(targets),
                exclude=data.get("exclude_modules"), rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {}, use_rslora=bool(data.get("use_rslora", False)),
                modules_to_save=peft_modules_to_save(data.get("modules_to_save"), names),
                layers_to_transform=data.get("layers_to_transform"), layers_pattern=data.get("layers_pattern"))


# ------------------------------------------------------------------------------------------------ writing
def peft_selects(names: list[str], targets, exclude, saved: list[str], layers=(None, None)) -> set[str]:
    """The module names PEFT's ``check_target_module_exists`` accepts (before it checks their types)."""
    chosen = set()
    for name in names:
        if not name or excluded(name, exclude):
            continue
        if any(re.match(rf"(^|.*\.){s}($|\..*)", name) for s in saved):
            continue
        if target_matches(name, targets, *layers):
            chosen.add(name)
    return chosen


def _targets_for(config, adapted: list[str], view_names: list[str], saved: list[str]) -> dict:
    targets = config.targets
    layers = (getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None))
    user_form = not (isinstance(targets, str) and targets.lower() == ALL_LINEAR)
    if user_form and peft_selects(view_names, targets, config.exclude, saved, layers) == set(adapted):
        return {"target_modules": targets if isinstance(targets, str) else sorted(targets),
                "exclude_modules": config.exclude if isinstance(config.exclude, (str, type(None)))
                else sorted(config.exclude),
                "layers_to_transform": layers[0], "layers_pattern": layers[1]}
    regex = "(" + "|".join(re.escape(n) for n in adapted) + ")"
    return {"target_modules": regex, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}


def _patterns_for(patterns: dict, values: dict[str, float], default) -> dict:
    if all(pattern_value(patterns, name, default) == value for name, value in values.items()):
        return dict(patterns)
    return {"^" + re.escape(name): value for name, value in values.items() if value != default}


def peft_config_for(entry, view_names: list[str], base_name: Optional[str]) -> dict:
    """adapter_config.json for one adapter (``entry``: config + report) of a model whose original module
    names are ``view_names``."""
    config, report = entry.config, entry.report
    adapted = report.names
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        **_targets_for(config, adapted, view_names, list(report.modules_to_save)),
        "rank_pattern": _patterns_for(config.rank_pattern, {m.name: m.r for m in report.adapted}, config.r),
        "alpha_pattern": _patterns_for(config.alpha_pattern, {m.name: m.alpha for m in report.adapted},
                                       config.alpha),
        "use_rslora": config.use_rslora, "modules_to_save": list(report.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": any(m.path == "fused-conv1d" for m in report.adapted),
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "lora_bias": False,
    }
