"""Pure-torch LoRA linear: the ground truth every kernel is tested against, and the CPU path.

Shapes: x (M, K), weight W (N, K), lora_a A (r, K), lora_b B (N, r), bias (N,) or None, y (M, N).
D is the dropout mask regenerated from (seed, element index) (``lowcost.reference.philox``); x̃ = D ⊙ x.

Forward:   u = x̃ Aᵀ (M, r, float32 or float64);   y = x Wᵀ + s·u Bᵀ + bias.

Backward (g = dL/dy, (M, N)). With y = x Wᵀ + s·(D⊙x) Aᵀ Bᵀ + bias:
    dB    = ∂L/∂B = s · gᵀ u                   (N, r)   since y depends on B through s·u Bᵀ
    du    = ∂L/∂u = s · g B                    (M, r)
    dA    = ∂L/∂A = duᵀ x̃                      (r, K)   since u = x̃ Aᵀ
    dx    = ∂L/∂x = g W + D ⊙ (du A)           (M, K)   the chain through x̃ = D ⊙ x multiplies by D again
    dbias = Σ_m g                              (N,)
D is applied to x (for dA) and to du A (for dx) together, so a backend can generate the mask once for both
(``lowcost.reference.philox.dropout_pair``).
No dW: the weight is frozen (the op layer adds gᵀx when it is not).

Precision: every product accumulates in float32 (float64 when the inputs are float64, which gives the
ground truth); u is kept in that accumulation dtype; outputs are rounded to their parameter's dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from lowcost.reference.philox import DropoutFn, apply_dropout, dropout_pair

Tensor = torch.Tensor


def accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lora_linear_forward(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                        scale: float, dropout: float, seed: int,
                        dropout_fn: DropoutFn = apply_dropout) -> tuple[Tensor, Tensor]:
    """Returns (y (M, N) in x.dtype, u (M, r) in the accumulation dtype). ``dropout_fn(x, seed, p)`` → x̃."""
    acc = accumulation_dtype(x)
    x_tilde = dropout_fn(x, seed, dropout) if dropout > 0 else x
    u = x_tilde.to(acc) @ lora_a.to(acc).t()
    if x.dtype == acc:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        return y.addmm_(u, lora_b.to(acc).t(), alpha=scale), u
    low_rank = torch.addmm((x @ weight.t()).to(acc), u, lora_b.to(acc).t(), alpha=scale)
    if bias is not None:
        low_rank += bias.to(acc)
    return low_rank.to(x.dtype), u


BaseDgrad = Callable[[Tensor, Tensor], Tensor]


def lora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
                         scale: float, dropout: float, seed: int,
                         needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
                         dropout_fn: DropoutFn = apply_dropout) -> tuple[Optional[Tensor], ...]:
    """Returns (dx, dA, dB, dbias), each None where ``needs`` (dx, dA, dB, dbias) says it is not wanted."""
    def dense_dgrad(g: Tensor, dx_low_rank: Tensor) -> Tensor:
        if x.dtype == dx_low_rank.dtype:
            return torch.addmm(dx_low_rank, g, weight)
        return ((g @ weight).to(dx_low_rank.dtype) + dx_low_rank).to(x.dtype)

    return adapter_backward(grad_y, x, dense_dgrad, lora_a, lora_b, u, scale, dropout, seed, needs, dropout_fn)


def adapter_backward(grad_y: Tensor, x: Tensor, base_dgrad: BaseDgrad, lora_a: Tensor, lora_b: Tensor, u: Tensor,
                     scale: float, dropout: float, seed: int, needs: tuple[bool, bool, bool, bool],
                     dropout_fn: DropoutFn) -> tuple[Optional[Tensor], ...]:
    """The backward above for any frozen base: ``base_dgrad(g, D ⊙ (du A))`` → dx = g W + D ⊙ (du A) in x.dtype.

    The adapter terms (dA, dB, dbias and the low-rank part of dx) are the same whatever stores W; only the
    base's g W differs (a dense GEMM here, a row-chunked dequantizing one in ``qlora_linear``)."""
    need_dx, need_da, need_db, need_dbias = needs
    acc = accumulation_dtype(x)
    g = grad_y.to(acc)
    dx = da = db = dbias = None
    if need_db:
        db = (g.t() @ u).mul_(scale).to(lora_b.dtype)
    if need_dx or need_da:
        du = (g @ lora_b.to(acc)).mul_(scale)
        low_rank = du @ lora_a.to(acc) if need_dx else None
        x_tilde, low_rank = dropout_pair(dropout_fn, x if need_da else None, low_rank, seed, dropout)
        if need_da:
            da = (du.t() @ x_tilde.to(acc)).to(lora_a.dtype)
            del x_tilde
        if need_dx:
            dx = base_dgrad(grad_y, low_rank)
    if need_dbias:
        dbias = g.sum(0).to(x.dtype)
    return dx, da, db, dbias
