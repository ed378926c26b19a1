"""Pure-torch LoRA embedding written with one-hot matrices: the ground truth ``lowcost.ops.lora_embedding`` is
tested against (a different formulation from the op's gathers, so the two cannot share a mistake).

Shapes: ids (M,) integer, weight W (V, N), lora_a A (r, V), lora_b B (N, r); O = one_hot(ids) (M, V).
PEFT stores an embedding adapter this way round: A maps a one-hot token to r numbers, B maps those to N.

Forward:   u = O Aᵀ (M, r) (row m is column ids[m] of A);   y = O W + s · u Bᵀ   (M, N).

Backward (g = dL/dy, (M, N)); c_m = 0 when ids[m] == padding_idx (that row gets no gradient), else
1 / count(ids[m]) with scale_grad_by_freq, else 1; G = diag(c) g:
    dB = s · gᵀ u                (N, r)     no padding / frequency rule: B is not looked up
    du = s · G B                 (M, r)
    dA = (Oᵀ du)ᵀ                (r, V)     scatter-add of du's rows into the columns of their ids
    dW = Oᵀ G                    (V, N)     only when the weight is trainable (new tokens)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _one_hot(ids: Tensor, vocab: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(ids.reshape(-1), vocab).to(dtype)


def row_weights(ids: Tensor, padding_idx: Optional[int], scale_grad_by_freq: bool, dtype: torch.dtype) -> Tensor:
    """c (M,): the factor each looked-up row's gradient gets (see the module docstring)."""
    flat = ids.reshape(-1)
    c = torch.ones(flat.shape[0], dtype=dtype)
    if scale_grad_by_freq and flat.numel():
        counts = torch.bincount(flat)
        c = c / counts[flat].to(dtype)
    if padding_idx is not None:
        c = c.masked_fill(flat == padding_idx, 0)
    return c


def lora_embedding_forward(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                           scale: float) -> tuple[Tensor, Tensor]:
    """(y (M, N), u (M, r)), in weight's dtype (float64 for the ground truth)."""
    onehot = _one_hot(ids, weight.shape[0], weight.dtype)
    u = onehot @ lora_a.to(weight.dtype).t()
    return onehot @ weight + scale * (u @ lora_b.to(weight.dtype).t()), u


def lora_embedding_backward(grad_y: Tensor, ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                            u: Tensor, scale: float, padding_idx: Optional[int] = None,
                            scale_grad_by_freq: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dW, dA, dB) for g = ``grad_y`` (M, N)."""
    dtype = weight.dtype
    onehot = _one_hot(ids, weight.shape[0], dtype)
    g = grad_y.reshape(-1, weight.shape[1]).to(dtype)
    g_rows = g * row_weights(ids, padding_idx, scale_grad_by_freq, dtype)[:, None]
    d_b = scale * g.t() @ u
    d_u = scale * g_rows @ lora_b.to(dtype)
    return onehot.t() @ g_rows, (onehot.t() @ d_u).t(), d_b
