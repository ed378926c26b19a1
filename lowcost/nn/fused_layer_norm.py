"""``FusedLayerNorm``: an ``nn.LayerNorm`` over the last dimension whose output the lowcost LoRA ops rebuild
instead of saving.

It stands in for a block's ``nn.LayerNorm`` (``lowcost.apply(..., fused=("norm",))``: GPT-2's ln_1/ln_2, Phi's
input_layernorm) and holds the *same* weight and bias Parameters under the same names, so state_dict keys and
values are unchanged. The forward is ``lowcost.ops.layer_norm``, the kernel ``nn.LayerNorm`` runs, so the output
is bit-identical; the q/k/v (or fused qkv) projections and the MLP input that read it keep the norm's input
instead of the (tokens × hidden) normed tensor and run the norm again in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowcost.ops.layer_norm import layer_norm


class FusedLayerNorm(nn.Module):
    """x: (..., H) → LayerNorm(x) over H with ``weight``/``bias`` (each (H,) or None) and ``eps``."""

    def __init__(self, weight: Optional[nn.Parameter], bias: Optional[nn.Parameter], eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else None
        return f"{shape}, eps={self.eps}, bias={self.bias is not None}"
