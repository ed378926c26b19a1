"""``LoRALinear``: a frozen ``nn.Linear`` plus a low-rank adapter, whose forward is one fused op call.

    y = x Wᵀ + s · (D ⊙ x) Aᵀ Bᵀ + b,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

x: (..., in_features) → y: (..., out_features); A = ``lora_A``: (r, in_features), B = ``lora_B``:
(out_features, r). The base ``weight`` and ``bias`` are the *same Parameter objects* as the wrapped
``nn.Linear``'s, frozen. A transformers ``Conv1D`` (GPT-2) is accepted too: its weight is stored
(in_features, out_features), so the op receives the ``weight.t()`` view (strides, no copy). Init follows PEFT: A Kaiming-uniform (a = √5, i.e. U(±1/√in_features)), B zero,
so a fresh adapter leaves the layer's output unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from lowcost.ops.lora_linear import lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight (nx, nf) = (in, out)), recognised without importing it."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


class LoRALinear(nn.Module):
    """A LoRA-adapted linear layer. Build it with ``LoRALinear.from_linear(linear, r=…, alpha=…)``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        super().__init__()
        conv1d = is_conv1d(base)
        if not isinstance(base, nn.Linear) and not conv1d:
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.fan_in_fan_out = conv1d          # weight stored (in, out): the op gets weight.t()
        self._base_cls = type(base)
        self.in_features, self.out_features = (base.nx, base.nf) if conv1d else (base.in_features,
                                                                                  base.out_features)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.backend = backend
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, **kwargs) -> "LoRALinear":
        return cls(linear, r=r, alpha=alpha, **kwargs)

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A ~ Kaiming-uniform with a = √5, B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def to_linear(self) -> nn.Module:
        """The wrapped layer back (``nn.Linear``, or a ``Conv1D`` for one), holding the same weight and bias
        Parameter objects."""
        if self.fan_in_fan_out:
            conv = self._base_cls.__new__(self._base_cls)
            nn.Module.__init__(conv)
            conv.nf, conv.nx = self.out_features, self.in_features
            conv.weight, conv.bias = self.weight, self.bias
            return conv
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def base_weight(self) -> torch.Tensor:
        """W as (out_features, in_features): the weight itself, or the ``.t()`` view of a Conv1D's."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) → (..., out_features); one ``lowcost.ops.lora_linear`` call."""
        if self.merged:
            return F.linear(x, self.base_weight(), self.bias)
        return lora_linear(x, self.base_weight(), self.lora_A, self.lora_B, self.scaling, bias=self.bias,
                           dropout=self.dropout if self.training else 0.0, backend=self.backend)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B A in float32, in the stored weight's layout: (out, in), or (in, out) for a Conv1D."""
        delta = (self.lora_B.float() @ self.lora_A.float()).mul_(self.scaling)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← round(W + s·B A), accumulated in float32 and rounded once; forward becomes a plain linear."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← round(W − s·B A) in float32; exact in fp32 up to one rounding, lossy by ≤ 1 ulp in bf16."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, "
                f"bias={self.bias is not None}")
