"""``lowcost.plan``: a fine-tuning step's memory and time, predicted by running the real code on fake tensors.

    from lowcost.plan import load_config, plan
    result = plan(load_config("config.json"), "my model", batch=1, seq=2048, dtype=torch.bfloat16,
                  lora=lowcost.LoRAConfig(r=16, alpha=32, adapter_dtype=torch.float32))
    print(result)                       # one row per setup: full fine-tuning, LoRA, LoRA + each policy

The layer sits between ``lowcost.api`` (whose ``apply`` it runs) and ``lowcost.cli``. Modules: ``fake``
(the fake-tensor context and the live-bytes meter), ``trace`` (one traced step), ``workspace`` (kernel
workspace the meter cannot see), ``flops``, ``build`` (config → patched model with fake tensors),
``estimate`` (per-setup figures, depth extension), ``gpus`` (the price table), ``report``.
"""
from lowcost.plan.build import config_dtype, load_config
from lowcost.plan.estimate import PLANNED_POLICIES, Estimate, Setup, estimate, standard_setups
from lowcost.plan.gpus import GPU, load_table
from lowcost.plan.report import Plan, plan
from lowcost.plan.trace import StepTrace, trace_step

__all__ = ["plan", "Plan", "load_config", "config_dtype", "estimate", "Estimate", "Setup", "standard_setups",
           "PLANNED_POLICIES", "GPU", "load_table", "trace_step", "StepTrace"]
