"""Triton kernels of lowcost (installed as ``lowcost.kernels``).

Modules: ``philox`` (Philox4x32-10 and the dropout mask as device functions), ``tiles`` (tile loads and
stores through TMA descriptors or pointers, dot operands, rounding, tile order), ``lora_linear_fwd`` /
``lora_linear_bwd`` (the fused LoRA linear kernels), ``reduce`` (fixed-order sums of partials),
``lora_linear_plan`` (configurations, grids, one Launch per kernel launch) and ``lora_linear`` (the
launchers). Nothing is imported here, so ``import lowcost.kernels`` never needs triton; import the
submodules explicitly. TRITON_INTERPRET must be set before they are imported to run them on a CPU.
"""
