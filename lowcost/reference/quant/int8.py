"""int8 with one absmax scale per row (LLM.int8()'s vector-wise quantization of the weight).

For row n with absolute maximum a_n: scale_n = a_n / 127 (float32), q = round(w / scale_n) ∈ [-127, 127]
(round half to even; a zero row keeps scale 0 and q = 0), w' = q · scale_n. Stored: ``qweight`` (N, K) int8
and ``scale`` (N,) float32: K + 4 bytes per row.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


QUANTIZE_CHUNK_ELEMENTS = 1 << 20


def quantize_int8(weight: Tensor) -> dict[str, Tensor]:
    """{"qweight", "scale"} of ``weight`` (N, K), a chunk of rows at a time (bounded temporaries)."""
    N, K = weight.shape
    q = torch.empty((N, K), dtype=torch.int8, device=weight.device)
    scale = torch.empty((N,), dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(K, 1))
    for start in range(0, N, step):
        w = weight[start:start + step].float()
        s = w.abs().amax(dim=1) / 127.0
        inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[start:start + step] = torch.round(w * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + step] = s
    return {"qweight": q, "scale": scale}


def dequantize_int8(tensors: dict[str, Tensor], K: int, block_size: int, rows: Rows = slice(None),
                    workspace: Optional[Tensor] = None) -> Tensor:
    """float32 (R, K) of the selected rows (in the first R · K elements of ``workspace`` when given)."""
    q = tensors["qweight"][rows]
    R = q.shape[0]
    out = torch.empty((R, K), dtype=torch.float32, device=q.device) if workspace is None \
        else workspace[:R * K].view(R, K)
    return out.copy_(q).mul_(tensors["scale"][rows][:, None])
