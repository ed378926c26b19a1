"""``lowcost.ops.lora_embedding``: an embedding lookup plus a low-rank update, PEFT's embedding LoRA.

    y = W[ids] + s · Aᵀ[ids] Bᵀ

ids: (...) integer, weight W: (V, N), lora_a A: (r, V), lora_b B: (N, r) → y: (..., N). Row ids[m] of W
plus s times column ids[m] of A mapped through B. No dropout (PEFT applies none to embedding adapters).

Built from two gathers and one ``addmm``, so autograd keeps only ids and u = Aᵀ[ids] (M, r): what a
custom kernel would keep; the low-rank term is added in the same pass that forms s·u Bᵀ (no extra (M, N)
temporary for it). Gradients (g = dL/dy as (M, N)), derived in ``lowcost.reference.lora_embedding``:
    dB = s·gᵀu;  dA[:, v] = Σ_{m: ids[m]=v} s·(g B)[m];  dW[v] = Σ_{m: ids[m]=v} g[m] (when W is trainable),
with ``padding_idx`` rows getting no gradient and ``scale_grad_by_freq`` dividing by a token's count, as in
``F.embedding``. The sum is formed in the wider of W's and the adapter's dtypes (float32 adapters on a bf16 table
accumulate in float32) and rounded once to W's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale) -> None:
    for name, t in (("ids", ids), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 or int32 tensor of token indices, got {ids.dtype}")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"weight, lora_a and lora_b must be 2-D, got {tuple(weight.shape)}, "
                         f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    (vocab, width), r = weight.shape, lora_a.shape[0]
    if lora_a.shape[1] != vocab:
        raise ValueError(f"lora_a must have shape (r, V={vocab}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (width, r):
        raise ValueError(f"lora_b must have shape (N={width}, r={r}), got {tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype or not lora_a.is_floating_point():
        raise TypeError(f"lora_a and lora_b must share one floating dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")


def lora_embedding(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                   padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False) -> Tensor:
    """y = W[ids] + s · Aᵀ[ids] Bᵀ; see the module docstring for shapes and gradients."""
    _check(ids, weight, lora_a, lora_b, scale)
    base = F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq)
    u = F.embedding(ids, lora_a.t(), padding_idx, None, 2.0, scale_grad_by_freq)
    width, acc = weight.shape[1], torch.promote_types(weight.dtype, lora_a.dtype)
    flat = torch.addmm(base.reshape(-1, width).to(acc), u.reshape(-1, u.shape[-1]).to(acc), lora_b.to(acc).t(),
                       alpha=scale)
    return flat.to(weight.dtype).reshape(*ids.shape, width)
