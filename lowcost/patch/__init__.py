"""Swap LoRA layers into a model by name filter; reversible; every call returns a report.

``apply_lora`` / ``remove_lora`` (``swap``), target planning (``select``), PEFT-layout files
(``adapter_io``), merging with a drift report (``merge``) and ``accelerate_peft`` (``peft_accel``).
"""
from lowcost.patch.merge import DriftReport, LayerDrift, merge_model
from lowcost.patch.peft_accel import accelerate_peft
from lowcost.patch.report import AdaptedModule, PatchReport, SkippedModule
from lowcost.patch.select import ALL_LINEAR, plan_lora
from lowcost.patch.swap import apply_lora, lora_layers, patch_state, remove_lora, set_merged

__all__ = ["apply_lora", "remove_lora", "lora_layers", "patch_state", "set_merged", "plan_lora", "merge_model",
           "accelerate_peft", "PatchReport", "AdaptedModule", "SkippedModule", "DriftReport", "LayerDrift",
           "ALL_LINEAR"]
