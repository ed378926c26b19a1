"""The ``cuda`` backend: the C++/CUDA kernels of ``lowcost._C`` around two cuBLAS GEMMs.

forward:  u = lora_down(x, A)            one pass over x, mask generated inline          (M, r) fp32
          c = lora_up(u, B, bias)        s·u Bᵀ + bias in the output dtype                (M, N)
          y = c + x Wᵀ                   cuBLAS GEMM with beta = 1, in place on c
backward: du, dB, dbias = lora_grad_pass(g, u, B)   one read of g
          dx_lora, dA = lora_dx_da(x, du, A)         one pass over x, mask generated once, used twice
          dx = dx_lora + g W                         cuBLAS GEMM with beta = 1, in place
cuBLAS offers no hook inside its tile loop, so the low-rank terms ride in the GEMMs' C operand: one extra
read of an (M, N) and an (M, K) tensor compared with the Triton kernels, which add them in-tile.
The skinny kernels (csrc/cuda/) run on the tensor cores (mma.sync, bf16/fp16 inputs) and split their
reductions across blocks into fp32 partials that a fixed-order sum adds inside each op, so u, du, dA, dB
and dbias are bitwise reproducible from run to run (no atomics); workspaces stay inside the ops.
The same ops have C++ CPU kernels, so this composition is also tested on CPU tensors.
"""
from __future__ import annotations

import torch

ops = torch.ops.lowcost


def forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed):
    u = ops.lora_down(x, lora_a, seed, dropout)
    y = ops.lora_up(u, lora_b, bias, scale, x.dtype)
    return y.addmm_(x, weight.t()), u


def backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs):
    need_dx, need_da, need_db, need_dbias = needs
    du, db, dbias = ops.lora_grad_pass(grad_y, u, lora_b, scale, need_dbias)
    dx = da = None
    if need_dx or need_da:
        dx_lora, da = ops.lora_dx_da(x, du, lora_a, seed, dropout, need_dx)
        da = da.to(lora_a.dtype) if need_da else None
        if need_dx:
            dx = dx_lora.addmm_(grad_y, weight)
    return (dx, da, db.to(lora_b.dtype) if need_db else None,
            dbias.to(x.dtype) if need_dbias else None)
