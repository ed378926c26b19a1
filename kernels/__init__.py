"""Triton kernels of lowcost (installed as ``lowcost.kernels``).

Modules: ``philox`` (Philox4x32-10 and the dropout mask as device functions), ``tiles`` (shared tile
helpers), ``lora_linear_fwd`` / ``lora_linear_bwd`` (the fused LoRA linear kernels) and ``lora_linear``
(their launchers). Nothing is imported here, so ``import lowcost.kernels`` never needs triton; import the
submodules explicitly. TRITON_INTERPRET must be set before they are imported to run them on a CPU.
"""
