"""The ``triton`` backend: the fused Triton kernels of ``lowcost.kernels.lora_linear``."""
from __future__ import annotations


def _kernels():
    from lowcost.kernels import lora_linear  # imported on first use: triton is heavy to import
    return lora_linear


def forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed):
    return _kernels().lora_linear_fwd(x, weight, lora_a, lora_b, bias, scale, dropout, seed)


def backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs, norm=None):
    """``norm`` = (rstd (M,), w (K,), form): x is an RMSNorm's input, the op's input rebuilt in the kernel."""
    return _kernels().lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs, norm)
