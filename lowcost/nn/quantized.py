"""Frozen layers whose weight is a ``QuantizedWeight`` (NF4, int8, GGUF blocks): each forward is one op call.

``QuantizedLinear``: y = x Wᵀ + b, x (..., in_features) → y (..., out_features), through
``lowcost.ops.quantized_linear`` (the weight is dequantized inside the op, a block of rows at a time on the
torch path; backward gives dx = g W). Its ``weight`` is the ``QuantizedWeight`` submodule, which answers
``.shape``, ``.dtype`` (the compute dtype) and ``.device`` like a tensor would; ``bias`` stays a frozen dense
Parameter. ``LoRALinear`` wraps it like an ``nn.Linear`` (the adapter runs in ``lowcost.ops.qlora_linear``).

``QuantizedEmbedding``: y = W[ids] (ids (...) → (..., embedding_dim)), dequantizing only the looked-up rows.
It may share its ``QuantizedWeight`` with a ``QuantizedLinear`` output head (tied embeddings).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowcost.ops.qlora_linear import quantized_linear
from lowcost.reference.quant import QuantizedWeight


def is_quantized(module: nn.Module) -> bool:
    """True for a layer whose ``weight`` is a ``QuantizedWeight``."""
    return isinstance(getattr(module, "weight", None), QuantizedWeight)


class QuantizedLinear(nn.Module):
    """A frozen linear layer over a quantized weight (out_features, in_features)."""

    def __init__(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a lowcost QuantizedWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias
        self.backend = backend

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight (out_features, in_features) in the compute dtype."""
        return self.weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.scheme}")


class QuantizedEmbedding(nn.Module):
    """A frozen embedding table (num_embeddings, embedding_dim) held quantized."""

    def __init__(self, weight: QuantizedWeight, padding_idx: Optional[int] = None):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a lowcost QuantizedWeight, got {type(weight).__name__}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight
        self.padding_idx = padding_idx

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.dequantize(rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.scheme}"
