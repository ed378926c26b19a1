"""Reference RMSNorm, in the two forms that HF decoder models use, forward and backward in plain torch.

x: (..., H), weight w: (H,) → y: (..., H). With the per-row statistic

    rstd = 1 / sqrt(mean(x²) + eps)        (computed in float32; float64 for a float64 x)
    x̂    = x · rstd

the two forms are (``cast`` = back to x's dtype)

    "llama":  y = w ⊙ cast(x̂)              Llama, Mistral, Qwen2/3, Phi-3 (``weight * h.to(input_dtype)``)
    "gemma":  y = cast(x̂ ⊙ (1 + w))        Gemma 1/2/3 (the weight is stored as an offset from one)

Each function below runs the same torch operations in the same order as those models' modules, so the output
is bit-identical to theirs; ``normed`` rebuilds y from (x, rstd, w) bit-identically to the forward, which is
what lets a consumer keep x and rstd instead of y.

Backward, with g = dL/dy and the effective scale w_e = w ("llama") or 1 + w ("gemma"), in the compute dtype:

    ĝ  = g ⊙ w_e
    dx = rstd · (ĝ − x̂ · mean(ĝ ⊙ x̂))          (d rstd/dx_k = −rstd³ x_k / H)
    dw = Σ_rows g ⊙ cast(x̂)  ("llama"),   Σ_rows g ⊙ x̂  ("gemma")
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor
FORMS = ("llama", "gemma")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); every other dtype computes in float32, as the HF modules do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rstd(x: Tensor, eps: float) -> Tensor:
    """(..., 1) in the compute dtype: 1 / sqrt(mean(x², last dim) + eps)."""
    xc = x.to(compute_dtype(x.dtype))
    return torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)


def normed(x: Tensor, stat: Tensor, weight: Tensor, form: str) -> Tensor:
    """y from x, its ``rstd`` and the weight: the forward's own operations, so bit-identical to it."""
    xc = x.to(compute_dtype(x.dtype))
    if form == "llama":
        return weight * (xc * stat).to(x.dtype)
    if form == "gemma":
        return ((xc * stat) * (1.0 + weight.to(xc.dtype))).to(x.dtype)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, form: str = "llama") -> tuple[Tensor, Tensor]:
    """(y, rstd) for x: (..., H), weight: (H,)."""
    stat = rstd(x, eps)
    return normed(x, stat, weight, form), stat


def rms_norm_backward(grad_y: Tensor, x: Tensor, stat: Tensor, weight: Tensor, form: str,
                      need_weight: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(dx in x's dtype, dw in the weight's dtype or None) for the math in the module docstring."""
    ct = compute_dtype(x.dtype)
    xhat = x.to(ct) * stat
    scale = weight.to(ct) if form == "llama" else 1.0 + weight.to(ct)
    g = grad_y.to(ct)
    g_hat = g * scale
    dx = stat * (g_hat - xhat * (g_hat * xhat).mean(-1, keepdim=True))
    dw = None
    if need_weight:
        basis = xhat.to(x.dtype).to(ct) if form == "llama" else xhat
        dw = (g * basis).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw
