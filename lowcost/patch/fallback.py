"""``LoRAFallback``: LoRA around a linear-like module that the fused op cannot replace.

Used for ``nn.Linear`` subclasses that override ``forward`` (quantised or instrumented layers) and for
weights in a dtype the op does not take. The base module keeps running its own forward:

    y = base(x) + Σ_a s_a · B_a A_a (D_a ⊙ x)      x: (..., in) → y: (..., out); A: (r, in), B: (out, r)

Not fused: autograd keeps x, D ⊙ x (dropout > 0) and A x̃ like PEFT does. Named adapters as in
``lowcost.nn.adapters``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowcost.nn.adapters import AdapterSlots, AdapterSpec, extra_lora_term, kaiming_a_zero_b


class LoRAFallback(AdapterSlots, nn.Module):
    """Plain-torch LoRA around ``base_layer`` (an ``nn.Linear`` subclass, weight (out, in))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None, adapter_name: str = "default"):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = adapter_dtype or (base.weight.dtype if base.weight.is_floating_point() else torch.float32)
        self._init_slots(adapter_name, AdapterSpec(r, alpha, dropout, use_rslora),
                         {"device": base.weight.device, "dtype": dtype})

    def _init_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        kaiming_a_zero_b(lora_a, lora_b)

    def base_param(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.running_adapters():
            y = y + extra_lora_term(x, self.factors(name), self.training).to(y.dtype)
        return y

    def merge_blocker(self) -> str:
        """Why the adapter cannot be folded into the base weight ("" when it can)."""
        base = self.base_layer
        if type(base).forward is not nn.Linear.forward:
            return f"{type(base).__name__} overrides forward, so its output is not x Wᵀ + b"
        if not base.weight.is_floating_point():
            return f"its weight is {base.weight.dtype}"
        return ""

    @torch.no_grad()
    def merge(self, names=None, safe: bool = False) -> None:
        blocker = self.merge_blocker()
        if blocker:
            raise TypeError(f"cannot merge this fallback LoRA layer: {blocker}")
        super().merge(names, safe=safe)
