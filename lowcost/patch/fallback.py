"""``LoRAFallback``: LoRA around a linear-like module that the fused op cannot replace.

Used for ``nn.Linear`` subclasses that override ``forward`` (quantised or instrumented layers) and for
weights in a dtype the op does not take. The base module keeps running its own forward:

    y = base(x) + s · B A (D ⊙ x)      x: (..., in) → y: (..., out); A: (r, in), B: (out, r)

Not fused: autograd keeps x, D ⊙ x (dropout > 0) and A x̃ like PEFT does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F


class LoRAFallback(nn.Module):
    """Plain-torch LoRA around ``base_layer`` (an ``nn.Linear`` subclass, weight (out, in))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        dtype = adapter_dtype or (base.weight.dtype if base.weight.is_floating_point() else torch.float32)
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B A in float32: (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()).mul_(self.scaling)

    def merge_blocker(self) -> str:
        """Why the adapter cannot be folded into the base weight ("" when it can)."""
        base = self.base_layer
        if type(base).forward is not nn.Linear.forward:
            return f"{type(base).__name__} overrides forward, so its output is not x Wᵀ + b"
        if not base.weight.is_floating_point():
            return f"its weight is {base.weight.dtype}"
        return ""

    @torch.no_grad()
    def merge(self) -> None:
        blocker = self.merge_blocker()
        if blocker:
            raise TypeError(f"cannot merge this fallback LoRA layer: {blocker}")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False
