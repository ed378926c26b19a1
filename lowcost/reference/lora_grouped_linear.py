"""Pure-torch grouped LoRA projections (q/k/v, gate/up) sharing one input: the ground truth and the CPU path.

P projections read one x (M, K). Projection i: weight W_i (N_i, K), lora_a A_i (r_i, K), lora_b B_i (N_i, r_i),
bias b_i (N_i,) or None, scale s_i, dropout p_i and seed_i (its own Philox mask D_i):

    u_i = (D_i ⊙ x) A_iᵀ                     (M, r_i), float32 (float64 for float64 x)
    y_i = x W_iᵀ + s_i · u_i B_iᵀ + b_i      (M, N_i), x's dtype

Each y_i is exactly ``lowcost.reference.lora_linear.lora_linear_forward`` with that projection's seed, so the
same seeds drop the same elements as P separate LoRA linears.

Backward (g_i = dL/dy_i, (M, N_i)):
    dB_i    = s_i · g_iᵀ u_i                  (N_i, r_i)
    du_i    = s_i · g_i B_i                   (M, r_i)
    dA_i    = du_iᵀ (D_i ⊙ x)                 (r_i, K)
    dbias_i = Σ_m g_i                         (N_i,)
    dx      = Σ_i g_i W_i + Σ_i D_i ⊙ (du_i A_i)      (M, K): ONE accumulator

dx is one buffer (x's dtype when that is the accumulation dtype, else float32 rounded once at the end),
started by the first projection's g_1 W_1 (never a zeroed buffer), that every other term is added into in place: ``addmm_`` for g_i W_i, and for du_i A_i when p_i = 0; with dropout the
masked term D_i ⊙ (du_i A_i) is formed in one scratch buffer, reused by every projection, together with
D_i ⊙ x for dA_i (``dropout_pair``: one mask generation for both). So backward never holds an (M, K)
temporary per projection, and never a dx per projection to sum afterwards.

A projection's W may be quantized (``GroupedProjection.dequant``, a row source as in ``lowcost.reference.
qlora_linear``, ``weight`` None): its x W_iᵀ and g_i W_i are then summed over dequantized blocks of rows
(``qlora_linear_forward``, ``quantized_base_dgrad``), so no dense W exists; such a first term starts dx as a
zeroed accumulator that the row blocks add into.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lowcost.reference.lora_linear import accumulation_dtype, lora_linear_forward
from lowcost.reference.philox import DropoutFn, apply_dropout, dropout_pair
from lowcost.reference.qlora_linear import RowSource, qlora_linear_forward, quantized_base_dgrad

Tensor = torch.Tensor


@dataclass(frozen=True)
class GroupedProjection:
    """One projection of the group: W (N, K), A (r, K), B (N, r), bias (N,) or None, s, p, seed. A quantized W:
    ``weight`` None and ``dequant`` the row source (rows -> those rows of W in x's dtype)."""
    weight: Optional[Tensor]
    lora_a: Tensor
    lora_b: Tensor
    bias: Optional[Tensor]
    scale: float
    dropout: float
    seed: int
    dequant: Optional[RowSource] = None


def grouped_forward(x: Tensor, projections: Sequence[GroupedProjection],
                    dropout_fn: DropoutFn = apply_dropout) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i (M, N_i) in x.dtype], [u_i (M, r_i) in the accumulation dtype]) for x (M, K)."""
    ys, us = [], []
    for p in projections:
        if p.dequant is not None:
            y, u = qlora_linear_forward(x, p.dequant, p.lora_b.shape[0], p.lora_a, p.lora_b, p.bias, p.scale,
                                        p.dropout, p.seed, dropout_fn)
        else:
            y, u = lora_linear_forward(x, p.weight, p.lora_a, p.lora_b, p.bias, p.scale, p.dropout, p.seed,
                                       dropout_fn)
        ys.append(y)
        us.append(u)
    return ys, us


def _add_dense(dx: Optional[Tensor], g: Tensor, p: GroupedProjection, K: int, acc: torch.dtype) -> Tensor:
    """dx + g W, in place (dx in x's dtype when that is the accumulation dtype, else the float32
    accumulator); the first projection's term starts the accumulator (``dx`` None), so it is never zeroed
    (a quantized W: a zeroed accumulator, its row blocks' products added in)."""
    if p.dequant is not None:
        return quantized_base_dgrad(g, p.dequant, K, out=dx)
    weight = p.weight
    if dx is None:
        first = g @ weight        # the GEMM in x's dtype (as the unfused op); 0 + v == v, so no zeros needed
        return first if first.dtype == acc else first.to(acc)
    if dx.dtype == g.dtype:
        return dx.addmm_(g, weight)
    return dx.add_(g @ weight)    # the GEMM in x's dtype, accumulated in float32


def _add_low_rank(dx: Tensor, x: Tensor, du: Tensor, p: GroupedProjection, need_da: bool, scratch: list,
                  dropout_fn: DropoutFn) -> Optional[Tensor]:
    """dx += D ⊙ (du A); returns dA = duᵀ (D ⊙ x) when asked. ``scratch``: [the reused (M, K) buffer or None]."""
    acc = du.dtype
    a = p.lora_a.to(acc)
    if p.dropout == 0.0:
        dx.addmm_(du, a)          # dx is in the accumulation dtype: the low-rank term joins it exactly
        return (du.t() @ x.to(acc)).to(p.lora_a.dtype) if need_da else None
    if scratch[0] is None:
        scratch[0] = torch.empty(du.shape[0], a.shape[1], dtype=acc, device=du.device)
    low_rank = torch.mm(du, a, out=scratch[0])
    x_tilde, low_rank = dropout_pair(dropout_fn, x if need_da else None, low_rank, p.seed, p.dropout)
    dx += low_rank
    return (du.t() @ x_tilde.to(acc)).to(p.lora_a.dtype) if need_da else None


def grouped_backward(grads: Sequence[Tensor], x: Tensor, projections: Sequence[GroupedProjection],
                     us: Sequence[Tensor], needs: Sequence[bool],
                     dropout_fn: DropoutFn = apply_dropout) -> tuple[Optional[Tensor], list, list, list]:
    """(dx, [dA_i], [dB_i], [dbias_i]); ``needs`` = (dx, dA, dB, dbias), each for every projection (None when
    not needed; dbias None for a projection without bias)."""
    need_dx, need_da, need_db, need_dbias = needs
    acc = accumulation_dtype(x)
    dx = None
    das, dbs, dbiases, scratch = [], [], [], [None]
    for g, p, u in zip(grads, projections, us):
        g_acc = g.to(acc)
        dbs.append((g_acc.t() @ u).mul_(p.scale).to(p.lora_b.dtype) if need_db else None)
        dbiases.append(g_acc.sum(0).to(x.dtype) if need_dbias and p.bias is not None else None)
        if need_dx:
            dx = _add_dense(dx, g, p, x.shape[1], acc)
        if need_dx or need_da:
            du = (g_acc @ p.lora_b.to(acc)).mul_(p.scale)
            if need_dx:
                das.append(_add_low_rank(dx, x, du, p, need_da, scratch, dropout_fn))
            else:
                x_tilde = dropout_fn(x, p.seed, p.dropout) if p.dropout > 0 else x
                das.append((du.t() @ x_tilde.to(acc)).to(p.lora_a.dtype))
        else:
            das.append(None)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, das, dbs, dbiases
