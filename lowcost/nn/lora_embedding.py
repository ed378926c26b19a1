"""``LoRAEmbedding``: a frozen ``nn.Embedding`` plus low-rank adapters (PEFT's ``lora.Embedding``).

    y = W[ids] + s · Aᵀ[ids] Bᵀ,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

ids: (...) integer → y: (..., embedding_dim); W = ``weight`` (num_embeddings, embedding_dim), the *same
Parameter object* as the wrapped embedding's (so new tokens warm-started into it can stay trainable);
A = ``lora_A``: (r, num_embeddings), B = ``lora_B``: (embedding_dim, r), PEFT's layout and init (A zero,
B standard normal, so a fresh adapter adds nothing). PEFT applies no dropout to embedding adapters, and
neither does this layer. The first running adapter goes through ``lowcost.ops.lora_embedding``; each further
one adds s · Aᵀ[ids] Bᵀ with the same gathers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from lowcost.nn.adapters import AdapterSlots, AdapterSpec
from lowcost.ops.lora_embedding import lora_embedding


def embedding_blocker(module: nn.Module) -> str:
    """Why ``module`` cannot be wrapped by ``LoRAEmbedding`` ("" when it can)."""
    if type(module).forward is not nn.Embedding.forward:
        return f"{type(module).__name__} overrides nn.Embedding.forward"
    if module.max_norm is not None:
        return "max_norm renormalises the looked-up rows in place"
    if module.sparse:
        return "sparse=True gradients"
    if not module.weight.is_floating_point():
        return f"its weight is {module.weight.dtype}"
    return ""


class LoRAEmbedding(AdapterSlots, nn.Module):
    """A LoRA-adapted ``nn.Embedding``."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None, adapter_name: str = "default", **_):
        super().__init__()
        if not isinstance(base, nn.Embedding) or embedding_blocker(base):
            why = embedding_blocker(base) if isinstance(base, nn.Embedding) else type(base).__name__
            raise TypeError(f"base must be a plain nn.Embedding, got one that cannot be wrapped: {why}")
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.scale_grad_by_freq = base.padding_idx, base.scale_grad_by_freq
        self.weight = base.weight
        self._init_slots(adapter_name, AdapterSpec(r, alpha, dropout, use_rslora),
                         {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype})

    def _init_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        with torch.no_grad():
            nn.init.zeros_(lora_a)
            nn.init.normal_(lora_b)

    def base_param(self) -> torch.Tensor:
        return self.weight

    def _delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()            # s·B A is (embedding_dim, num_embeddings); the table is its transpose

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        names = self.running_adapters()
        if not names:
            return F.embedding(ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        first = self.factors(names[0])
        y = lora_embedding(ids, self.weight, first.lora_A, first.lora_B, first.scaling,
                           padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        for name in names[1:]:
            f = self.factors(name)
            u = F.embedding(ids, f.lora_A.t(), self.padding_idx, None, 2.0, self.scale_grad_by_freq)
            y = y + ((u @ f.lora_B.t()) * f.scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}, "
                f"rslora={self.use_rslora}, padding_idx={self.padding_idx}, adapters={self.adapter_names}")
