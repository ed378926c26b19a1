"""Pure-torch LoRA linear on a quantized frozen weight: ground truth for the dequantizing kernels, and the
CPU path. The weight is never dense as a whole: it is dequantized one block of rows at a time.

Shapes as in ``lowcost.reference.lora_linear``: x (M, K), W (N, K) given by ``dequant(rows) -> (n, K)`` (the
rows of a slice, in x's dtype), A (r, K), B (N, r), bias (N,) or None, y (M, N).

    forward:  u = x̃ Aᵀ;  y[:, c] = x W[c]ᵀ + s·u B[c]ᵀ + bias[c]          for each row chunk c of W
    backward: dB = s·gᵀu;  du = s·g B;  dA = duᵀ x̃;  dbias = Σ_m g
              dx = Σ_c g[:, c] W[c] + D ⊙ (du A)                          the chunks' products summed

The math is the dense reference's; only the base GEMMs are split by rows of W (chunks of at most
``ROW_CHUNK_ELEMENTS`` weight elements, at least one row), so the transient dequantized weight is bounded by
one chunk, not by the layer (the torch backend's ``dequant`` decodes every chunk into one workspace it reuses
within the op call, so each chunk's weight is consumed before the next is decoded). Every product
accumulates in float32 (float64 for float64 x).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from lowcost.reference.lora_linear import DropoutFn, accumulation_dtype, adapter_backward
from lowcost.reference.philox import apply_dropout

Tensor = torch.Tensor
RowSource = Callable[[slice], Tensor]
ROW_CHUNK_ELEMENTS = 1 << 20     # dequantized elements per chunk (4 MiB in float32)


def row_chunks(N: int, K: int, limit: Optional[int] = None) -> Iterator[slice]:
    """Consecutive row slices of an (N, K) weight, each at most ``limit`` elements (and at least one row)."""
    rows = max(1, (limit or ROW_CHUNK_ELEMENTS) // max(K, 1))
    for start in range(0, N, rows):
        yield slice(start, min(start + rows, N))


def quantized_base_forward(x: Tensor, dequant: RowSource, N: int, bias: Optional[Tensor] = None) -> Tensor:
    """x Wᵀ (+ bias) (M, N): in x's dtype for float32/float64 x, else float32 (bias still to add by the caller
    then, see ``qlora_linear_forward``)."""
    acc = accumulation_dtype(x)
    out_dtype = x.dtype if x.dtype == acc else acc
    y = torch.empty((x.shape[0], N), dtype=out_dtype, device=x.device)
    for rows in row_chunks(N, x.shape[1]):
        w = dequant(rows)
        if x.dtype != acc:
            y[:, rows] = x @ w.t()
        elif bias is not None:
            torch.addmm(bias[rows], x, w.t(), out=y[:, rows])
        else:
            torch.mm(x, w.t(), out=y[:, rows])     # with one block of rows this writes y itself, no copy
    return y


def quantized_base_dgrad(grad_y: Tensor, dequant: RowSource, K: int, out: Optional[Tensor] = None) -> Tensor:
    """g W (M, K), summed over row chunks into ``out`` (accumulation dtype; zeros when None)."""
    acc = accumulation_dtype(grad_y)
    M, N = grad_y.shape
    dx = torch.zeros((M, K), dtype=acc, device=grad_y.device) if out is None else out
    for rows in row_chunks(N, K):
        w = dequant(rows)
        if grad_y.dtype == acc:
            dx.addmm_(grad_y[:, rows], w)
        else:
            dx += grad_y[:, rows] @ w
    return dx


def quantized_linear_forward(x: Tensor, dequant: RowSource, N: int, bias: Optional[Tensor]) -> Tensor:
    """y = x Wᵀ + bias (M, N) in x's dtype: a frozen quantized layer without adapter."""
    acc = accumulation_dtype(x)
    y = quantized_base_forward(x, dequant, N, bias)
    if x.dtype == acc:
        return y
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype)


def qlora_linear_forward(x: Tensor, dequant: RowSource, N: int, lora_a: Tensor, lora_b: Tensor,
                         bias: Optional[Tensor], scale: float, dropout: float, seed: int,
                         dropout_fn: DropoutFn = apply_dropout) -> tuple[Tensor, Tensor]:
    """(y (M, N) in x.dtype, u (M, r) in the accumulation dtype)."""
    acc = accumulation_dtype(x)
    x_tilde = dropout_fn(x, seed, dropout) if dropout > 0 else x
    u = x_tilde.to(acc) @ lora_a.to(acc).t()
    y = quantized_base_forward(x, dequant, N, bias if x.dtype == acc else None)
    y.addmm_(u, lora_b.to(acc).t(), alpha=scale)
    if x.dtype == acc:
        return y, u
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype), u


def qlora_linear_backward(grad_y: Tensor, x: Tensor, dequant: RowSource, lora_a: Tensor, lora_b: Tensor,
                          u: Tensor, scale: float, dropout: float, seed: int,
                          needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
                          dropout_fn: DropoutFn = apply_dropout) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB, dbias), each None where ``needs`` (dx, dA, dB, dbias) says it is not wanted: the dense
    reference's backward with g W summed over dequantized row chunks."""
    def chunked_dgrad(g: Tensor, dx_low_rank: Tensor) -> Tensor:
        return quantized_base_dgrad(g, dequant, x.shape[1], out=dx_low_rank).to(x.dtype)

    return adapter_backward(grad_y, x, chunked_dgrad, lora_a, lora_b, u, scale, dropout, seed, needs, dropout_fn)
