"""Swap LoRA layers into a model by name filter; reversible; every call returns a report.

``apply_lora`` / ``remove_lora`` (``swap``), target planning (``select``), named adapters and
``disable_adapter`` (``adapters``), PEFT-layout files (``adapter_io``) and their config both ways
(``peft_config``), merging with a drift report (``merge``) and ``accelerate_peft`` (``peft_accel``).
"""
from lowcost.patch.adapters import active_adapters, add_adapter, delete_adapter, disable_adapter, set_adapter
from lowcost.patch.merge import DriftReport, LayerDrift, merge_model
from lowcost.patch.peft_accel import accelerate_peft
from lowcost.patch.report import AdaptedModule, PatchReport, SkippedModule
from lowcost.patch.select import ALL_LINEAR, plan_lora
from lowcost.patch.swap import apply_lora, lora_layers, patch_state, remove_lora, set_merged

__all__ = ["apply_lora", "remove_lora", "lora_layers", "patch_state", "set_merged", "plan_lora", "merge_model",
           "accelerate_peft", "PatchReport", "AdaptedModule", "SkippedModule", "DriftReport", "LayerDrift",
           "ALL_LINEAR", "add_adapter", "set_adapter", "active_adapters", "delete_adapter", "disable_adapter"]
