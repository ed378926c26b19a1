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

On a quantized weight (``QUANT_SUPPORT["cuda"]`` in ``_quant_backends``: nf4, nf4-dq, int8 and the GGUF
blocks q8_0, q4_0, q4_1 and super-blocks q4_k, q6_k) the two cuBLAS GEMMs become lowcost's own dequantizing GEMMs, ``dequant_gemm``
(c + x deq(W)ᵀ) and ``dequant_gemm_dgrad`` (c + g deq(W)), which decode each 64 x 64 tile of W from its
packed codes into shared memory in x's dtype before the tensor-core MMA (csrc/cuda/dequant_gemm_kernels.cuh):
no dense W is ever materialised. The LoRA term rides in their c operand as it does in cuBLAS's (added to the
fp32 accumulator, one rounding); the frozen layer without adapter passes the bias as c (broadcast, stride 0).
Their reduction is not split, so they are deterministic too. They have no CPU kernel: the emulated C++ test
(csrc/tests/test_dequant_gemm_emulated.cpp) runs the CUDA kernels on the host against a float64 reference.
"""
from __future__ import annotations

import torch

ops = torch.ops.lowcost


def lora_up_base(u, lora_b, bias, scale, x, add_base):
    """y = add_base(c) with c = lora_up(u) = s·u Bᵀ + bias (M, N) in x's dtype: the base GEMM adds onto c."""
    return add_base(ops.lora_up(u, lora_b, bias, scale, x.dtype))


def _lora_forward(x, lora_a, lora_b, bias, scale, dropout, seed, add_base):
    """(y, u): u = lora_down(x), c = lora_up(u) + bias, then y = add_base(c) adds x Wᵀ onto c (beta = 1)."""
    u = ops.lora_down(x, lora_a, seed, dropout)
    return lora_up_base(u, lora_b, bias, scale, x, add_base), u


def grad_pass(grad_y, u, lora_b, scale, need_db, need_dbias, x_dtype):
    """(du (M, r) float32, dB or None, dbias or None): one read of g (``lora_grad_pass``)."""
    du, db, dbias = ops.lora_grad_pass(grad_y, u, lora_b, scale, need_dbias)
    return du, db.to(lora_b.dtype) if need_db else None, dbias.to(x_dtype) if need_dbias else None


def low_rank_dx_da(x, du, lora_a, seed, dropout, need_dx, need_da):
    """(D⊙(du A) (M, K) in x's dtype or None, dA = duᵀ(D⊙x) or None): one pass over x (``lora_dx_da``)."""
    if not (need_dx or need_da):
        return None, None
    dx_lora, da = ops.lora_dx_da(x, du, lora_a, seed, dropout, need_dx)
    return dx_lora if need_dx else None, da.to(lora_a.dtype) if need_da else None


def _lora_backward(grad_y, x, lora_a, lora_b, u, scale, dropout, seed, needs, add_base_dgrad):
    """(dx, dA, dB, dbias), None where not needed: dx = add_base_dgrad(D⊙(du A)) adds g W onto the LoRA term."""
    need_dx, need_da, need_db, need_dbias = needs
    du, db, dbias = grad_pass(grad_y, u, lora_b, scale, need_db, need_dbias, x.dtype)
    dx_lora, da = low_rank_dx_da(x, du, lora_a, seed, dropout, need_dx, need_da)
    return (add_base_dgrad(dx_lora) if need_dx else None), da, db, dbias


def dense_base(weight):
    """(add_base, add_base_dgrad) of a dense W (N, K): c ↦ c + x Wᵀ and t ↦ t + g W, cuBLAS beta = 1 in place."""
    return (lambda c, x: c.addmm_(x, weight.t())), (lambda t, g: t.addmm_(g, weight))


def quant_base(packed, scheme, n_rows, n_cols, block_size):
    """(add_base, add_base_dgrad) of a quantized W (n_rows, n_cols): c ↦ c + x deq(W)ᵀ (``dequant_gemm``) and
    t ↦ t + g deq(W) (``dequant_gemm_dgrad``), the addend as the GEMM's c operand; ``packed``: the stored tensors
    then the code books."""
    return (lambda c, x: ops.dequant_gemm(x, packed, scheme, n_rows, block_size, c),
            lambda t, g: ops.dequant_gemm_dgrad(g, packed, scheme, n_cols, block_size, t))


def forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed):
    add_base, _ = dense_base(weight)
    return _lora_forward(x, lora_a, lora_b, bias, scale, dropout, seed, lambda c: add_base(c, x))


def backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs):
    _, add_dgrad = dense_base(weight)
    return _lora_backward(grad_y, x, lora_a, lora_b, u, scale, dropout, seed, needs,
                          lambda dx_lora: add_dgrad(dx_lora, grad_y))


# ----------------------------------------------------------------------------------------------- quantized base
def quant_forward(x, packed, scheme, n_rows, block_size, lora_a, lora_b, bias, scale, dropout, seed):
    """(y (M, N), u (M, r)) with W quantized; ``packed``: the stored tensors then the code books."""
    add_base, _ = quant_base(packed, scheme, n_rows, x.shape[1], block_size)
    return _lora_forward(x, lora_a, lora_b, bias, scale, dropout, seed, lambda c: add_base(c, x))


def quant_backward(grad_y, x, packed, scheme, block_size, lora_a, lora_b, u, scale, dropout, seed, needs):
    """(dx, dA, dB, dbias), None where not needed: dx = D⊙(du A) + g deq(W) (the LoRA term as c)."""
    _, add_dgrad = quant_base(packed, scheme, grad_y.shape[1], x.shape[1], block_size)
    return _lora_backward(grad_y, x, lora_a, lora_b, u, scale, dropout, seed, needs,
                          lambda dx_lora: add_dgrad(dx_lora, grad_y))


def quant_base_forward(x, packed, scheme, n_rows, block_size, bias):
    """x deq(W)ᵀ + bias (M, N): the bias enters as c, broadcast over the rows."""
    c = bias.expand(x.shape[0], n_rows) if bias is not None else None
    return ops.dequant_gemm(x, packed, scheme, n_rows, block_size, c)


def quant_base_dgrad(grad_y, packed, scheme, n_cols, block_size):
    """g deq(W) (M, K)."""
    return ops.dequant_gemm_dgrad(grad_y, packed, scheme, n_cols, block_size, None)
