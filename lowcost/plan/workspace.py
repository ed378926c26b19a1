"""Memory a kernel allocates and frees inside itself, which no dispatch mode sees (an estimate per op).

Only ``lowcost::lora_linear`` and its backward are modelled: their ``torch`` backend (the CPU path,
``lowcost/reference/lora_linear.py``) makes full-size temporaries. With x: (M, K), W: (N, K), rank r, p the
dropout probability, s the bytes of x's dtype and ``[p>0]`` 1 when dropout is on:

forward, x float32:   x̃ = D⊙x (M×K·s, only when p>0); y and u are outputs the meter already counts.
forward, x 16-bit:    x̃ (M·K·s·[p>0]) and its fp32 copy (M·K·4) while u is formed, then x·Wᵀ in fp32 and
                      the fp32 sum (2·M·N·4) before the rounding to s: max of the two phases.
backward, x float32:  x̃ (kept to the end when p>0) and du·A (then D⊙(du·A)) next to the output dx:
                      (1 + [p>0])·M·K·4.
backward, x 16-bit:   g in fp32 (M·N·4) plus x̃, its fp32 copy, du·A and the fp32 g·W sum (≈ 3·M·K·4 + M·K·s·[p>0]).

Aten kernels are assumed to need no workspace beyond their outputs (on CPU the flash-attention and
GEMM kernels use per-thread tiles; cuBLAS workspaces are a few MiB). The Triton and CUDA backends fuse
the mask and keep less than this; the estimate is for the torch backend and is an upper bound for them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _lora_forward(args) -> int:
    x, weight, lora_a, _, _, _, dropout = args[:7]
    M, K, N, s = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0], x.element_size()
    tilde = M * K * s if dropout > 0 else 0
    if x.dtype in (torch.float32, torch.float64):
        return tilde
    return max(tilde + M * K * 4, 2 * M * N * 4)


def _lora_backward(args) -> int:
    grad_y, x, weight, lora_a, _, _, _, dropout = args[:8]
    M, K, N, s = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0], x.element_size()
    on = 1 if dropout > 0 else 0
    if x.dtype in (torch.float32, torch.float64):
        return (1 + on) * M * K * s
    return M * N * 4 + 3 * M * K * 4 + on * M * K * s


_MODELS = {"lowcost::lora_linear": _lora_forward, "lowcost::lora_linear_backward": _lora_backward}


def kernel_workspace(func, args, kwargs, out) -> int:
    """Bytes ``func`` allocates and frees internally on top of its outputs (0 for ops not modelled)."""
    model = _MODELS.get(func._schema.name) if hasattr(func, "_schema") else None
    return model(args) if model is not None else 0


WorkspaceFn = Callable[..., int]
