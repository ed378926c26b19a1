"""The ``torch`` backend: the math of ``lowcost.reference``, with the pieces that touch the dropout mask
run by the C++ kernels of ``lowcost._C`` when it is built (both produce the identical mask,
docs/lora_linear_spec.md):

- forward, p > 0: ``lora_down`` computes u = (D⊙x)Aᵀ in one pass over x (no x̃ in memory);
- backward, p > 0: ``lora_dx_da`` regenerates the mask once for both D⊙(duA) and duᵀ(D⊙x);
- otherwise (p = 0, float64, or no extension) the pure-torch reference runs, with the pure-torch Philox.
The big GEMMs are torch's (MKL / cuBLAS) in every case.
"""
from __future__ import annotations

import torch

from lowcost._extension import device_dispatch_key, has_kernel
from lowcost.reference import lora_linear as reference


def _fused_mask_kernels(x: torch.Tensor, dropout: float) -> bool:
    return (dropout > 0 and x.dtype != torch.float64
            and has_kernel("lora_dx_da", device_dispatch_key(x.device)))


def _down(x, lora_a, dropout, seed):
    return torch.ops.lowcost.lora_down(x, lora_a, seed, dropout)


def _dropout_terms(x, du, lora_a, seed, dropout, need_dx, need_da):
    dx_low_rank, da = torch.ops.lowcost.lora_dx_da(x, du, lora_a, seed, dropout, need_dx)
    return (dx_low_rank if need_dx else None), (da if need_da else None)


def forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed):
    down = _down if _fused_mask_kernels(x, dropout) else None
    return reference.lora_linear_forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed, down_fn=down)


def backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs):
    terms = _dropout_terms if _fused_mask_kernels(x, dropout) else None
    return reference.lora_linear_backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs,
                                          dropout_terms_fn=terms)
