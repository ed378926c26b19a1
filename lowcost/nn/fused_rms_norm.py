"""``FusedRMSNorm``: an RMSNorm whose output the lowcost LoRA ops rebuild instead of saving.

It stands in for a model's own RMSNorm module (``lowcost.apply(..., fused=("norm",))``) and holds the *same*
weight Parameter under the same name, so state_dict keys and values are unchanged. The forward is
``lowcost.ops.rms_norm``: bit-identical to the replaced module (checked on a probe before the swap), and its
output is tagged so that the q/k/v projections or the fused MLP that read it keep the norm's input and rstd,
which the norm keeps anyway, instead of the (tokens × hidden) normed tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from lowcost.ops.rms_norm import rms_norm


class FusedRMSNorm(nn.Module):
    """x: (..., H) → RMSNorm(x) of the given form ("llama": w ⊙ x̂, "gemma": x̂ ⊙ (1 + w)); see the op."""

    def __init__(self, weight: nn.Parameter, eps: float, form: str):
        super().__init__()
        self.weight = weight
        self.eps, self.form = float(eps), form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.form)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, form={self.form}"
