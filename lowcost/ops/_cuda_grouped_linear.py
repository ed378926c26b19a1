"""The ``cuda`` backend of ``lowcost.ops.lora_grouped_linear``: per projection the LoRA linear's CUDA composition
(``_cuda_backend``: the ``lowcost._C`` ops ``lora_down``, ``lora_up``, ``lora_grad_pass``, ``lora_dx_da`` around
cuBLAS GEMMs), with one dx accumulator shared by the P projections.

forward:  y_i, u_i = _cuda_backend.forward(x, W_i, A_i, B_i, b_i, s_i, p_i, seed_i)     for i = 0 … P-1
          (u_i = lora_down(x, A_i) (M, r_i) fp32; c_i = lora_up(u_i, B_i, b_i); y_i = c_i + x W_iᵀ, beta = 1)
backward: du_i, dB_i, db_i = lora_grad_pass(g_i, u_i, B_i)          one read of g_i
          t_i, dA_i = lora_dx_da(x, du_i, A_i, seed_i, p_i)       t_i = D_i ⊙ (du_i A_i), dA_i = du_iᵀ (D_i ⊙ x)
          dx = t_0 + g_0 W_0                                       cuBLAS beta = 1 in place on t_0: t_0 IS dx
          dx += g_i W_i ; dx += t_i                                i ≥ 1: addmm_ (beta = 1), then one add

Transient (M, K) buffers: besides dx, one t_i at a time (i ≥ 1), freed once added. ``lora_dx_da`` allocates the
low-rank term itself (it generates D_i inside, once for t_i and dA_i) and has no operand to add into, so a
term per projection after the first is what it forces; the dense terms g_i W_i never get a buffer of their own
(``addmm_`` into dx). No dx per projection is summed afterwards and no (M, K) buffer is zeroed.
dx is in x's dtype throughout (the GEMM's C operand): in 16 bits each of its 2P - 1 adds rounds once, as the sum
of P unfused ``lora_linear(backend='cuda')`` dx's does (the torch backend keeps an fp32 accumulator instead).

Each projection draws its mask from its own seed with the Philox ops of ``lora_linear(backend='cuda')``, so the
dropped elements are those of P separate ``lora_linear`` calls. The autograd op (``lowcost.ops.
lora_grouped_linear``) saves x once, the u_i and the seeds, as for the other backends; this module only
computes. The ops have C++ CPU kernels, so the composition also runs, and is tested, on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lowcost.ops import _cuda_backend
from lowcost.reference.lora_grouped_linear import GroupedProjection

Tensor = torch.Tensor
ops = torch.ops.lowcost


def grouped_fwd(x: Tensor, projections: Sequence[GroupedProjection]) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i (M, N_i) in x.dtype], [u_i (M, r_i) float32]) for x (M, K)."""
    ys, us = [], []
    for p in projections:
        y, u = _cuda_backend.forward(x, p.weight, p.lora_a, p.lora_b, p.bias, p.scale, p.dropout, p.seed)
        ys.append(y)
        us.append(u)
    return ys, us


def _low_rank_grads(g: Tensor, x: Tensor, p: GroupedProjection, u: Tensor, needs: Sequence[bool]):
    """(t = D ⊙ (du A) (M, K) or None, dA, dB, dbias) of one projection, None where ``needs`` does not ask."""
    need_dx, need_da, need_db, need_dbias = needs
    need_dbias = need_dbias and p.bias is not None
    du, db, dbias = ops.lora_grad_pass(g, u, p.lora_b, p.scale, need_dbias)
    low_rank = da = None
    if need_dx or need_da:
        low_rank, da = ops.lora_dx_da(x, du, p.lora_a, p.seed, p.dropout, need_dx)
        low_rank = low_rank if need_dx else None
        da = da.to(p.lora_a.dtype) if need_da else None
    return (low_rank, da, db.to(p.lora_b.dtype) if need_db else None,
            dbias.to(x.dtype) if need_dbias else None)


def grouped_bwd(grads: Sequence[Tensor], x: Tensor, projections: Sequence[GroupedProjection], us: Sequence[Tensor],
                needs: Sequence[bool]) -> tuple[Optional[Tensor], list, list, list]:
    """(dx (M, K), [dA_i], [dB_i], [dbias_i]) as ``lowcost.reference.lora_grouped_linear.grouped_backward``
    defines them; ``needs`` = (dx, dA, dB, dbias) for every projection (None where not needed)."""
    dx = None
    das, dbs, dbiases = [], [], []
    for g, p, u in zip(grads, projections, us):
        low_rank, da, db, dbias = _low_rank_grads(g, x, p, u, needs)
        das.append(da)
        dbs.append(db)
        dbiases.append(dbias)
        if low_rank is None:
            continue
        if dx is None:
            dx = low_rank.addmm_(g, p.weight)       # the first projection's term becomes the accumulator
        else:
            dx.addmm_(g, p.weight).add_(low_rank)
        del low_rank
    return dx, das, dbs, dbiases
