"""``LoRALinear``: a frozen ``nn.Linear`` plus low-rank adapters, whose forward is one fused op call.

    y = x Wᵀ + s · (D ⊙ x) Aᵀ Bᵀ + b,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

x: (..., in_features) → y: (..., out_features); A = ``lora_A``: (r, in_features), B = ``lora_B``:
(out_features, r). The base ``weight`` and ``bias`` are the *same Parameter objects* as the wrapped
``nn.Linear``'s, frozen. A transformers ``Conv1D`` (GPT-2) is accepted too: its weight is stored
(in_features, out_features), so the op receives the ``weight.t()`` view (strides, no copy). Init follows PEFT:
A Kaiming-uniform (a = √5, i.e. U(±1/√in_features)), B zero, so a fresh adapter leaves the output unchanged.

A ``QuantizedLinear`` base (weight held as NF4, int8 or GGUF blocks) is wrapped the same way: ``weight`` is then
its ``QuantizedWeight`` and the op dequantizes it inside (``lowcost.ops.qlora_linear``); such a layer cannot
fold an adapter into its weight in place, ``merged_weight`` gives the dense sum instead.

Several named adapters (``lowcost.nn.adapters``): the first running adapter goes through the fused op with the
base GEMM; each further running adapter adds s·B A (D ⊙ x) in plain torch (as PEFT computes it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from lowcost.nn.adapters import AdapterSlots, AdapterSpec, extra_lora_term, kaiming_a_zero_b
from lowcost.nn.quantized import QuantizedLinear, is_quantized
from lowcost.ops.lora_linear import lora_linear
from lowcost.ops.qlora_linear import quantized_linear


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight (nx, nf) = (in, out)), recognised without importing it."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


class LoRALinear(AdapterSlots, nn.Module):
    """A LoRA-adapted linear layer. Build it with ``LoRALinear.from_linear(linear, r=…, alpha=…)``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                 adapter_name: str = "default"):
        super().__init__()
        conv1d, quantized = is_conv1d(base), is_quantized(base)
        if not isinstance(base, nn.Linear) and not conv1d and not quantized:
            raise TypeError(f"base must be an nn.Linear, a transformers Conv1D or a lowcost QuantizedLinear, got "
                            f"{type(base).__name__}")
        spec = AdapterSpec(r, alpha, dropout, use_rslora)
        self.fan_in_fan_out = conv1d          # weight stored (in, out): the op gets weight.t()
        self._base_cls = type(base)
        self.in_features, self.out_features = (base.nx, base.nf) if conv1d else (base.in_features,
                                                                                  base.out_features)
        self.backend = backend
        self.weight = base.weight if quantized else base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self._init_slots(adapter_name, spec, {"device": base.weight.device,
                                              "dtype": adapter_dtype or base.weight.dtype})

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, **kwargs) -> "LoRALinear":
        return cls(linear, r=r, alpha=alpha, **kwargs)

    def _init_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        kaiming_a_zero_b(lora_a, lora_b)

    def reset_lora_parameters(self) -> None:
        """PEFT's init for the first adapter: A ~ Kaiming-uniform with a = √5, B = 0."""
        kaiming_a_zero_b(self.lora_A, self.lora_B)

    def base_param(self) -> torch.Tensor:
        return self.weight

    def _delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    @property
    def quantized(self) -> bool:
        return is_quantized(self)

    def to_linear(self) -> nn.Module:
        """The wrapped layer back (``nn.Linear``, a ``Conv1D`` or a ``QuantizedLinear``), holding the same weight
        and bias objects."""
        if self.quantized:
            return QuantizedLinear(self.weight, self.bias, backend=self.backend)
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
        """x: (..., in_features) → (..., out_features); one ``lowcost.ops.lora_linear`` call per layer (plus a
        plain-torch term for each further running adapter)."""
        return self.forward_with_seed(x, seed=None)

    def forward_with_seed(self, x: torch.Tensor, seed: Optional[torch.Tensor]) -> torch.Tensor:
        """``forward`` with the first running adapter's dropout seed given (None: drawn from torch's CPU
        generator, as ``forward`` does). A ``ProjectionGroup`` member that runs its own op hands it the seed its
        leader already drew for it, so that the RNG stream advances as in the unfused model."""
        names = self.running_adapters()
        if not names and self.quantized:
            return quantized_linear(x, self.weight, self.bias, backend=self.backend)
        if not names:
            return F.linear(x, self.base_weight(), self.bias)
        first = self.factors(names[0])
        y = lora_linear(x, self.base_weight(), first.lora_A, first.lora_B, first.scaling, bias=self.bias,
                        dropout=first.dropout if self.training else 0.0, seed=seed, backend=self.backend)
        for name in names[1:]:
            y = y + extra_lora_term(x, self.factors(name), self.training).to(y.dtype)
        return y

    @torch.no_grad()
    def merged_weight(self, names) -> torch.Tensor:
        """round(W + Σ_a s_a B_a A_a) in float32, rounded once (to the compute dtype for a quantized W)."""
        if not self.quantized:
            return super().merged_weight(names)
        total = self.weight.dequantize(torch.float32)
        for name in names:
            total = total + self.delta_weight(name)
        return total.to(self.weight.dtype)

    def merge(self, names=None, safe: bool = False) -> None:
        if self.quantized:
            raise TypeError(f"this LoRALinear's base weight is quantized ({self.weight.scheme}), so an adapter cannot "
                            "be folded into it in place; lowcost.merge(model) replaces the layer by a dense merged "
                            "nn.Linear")
        super().merge(names, safe=safe)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, "
                f"bias={self.bias is not None}, adapters={self.adapter_names}")
