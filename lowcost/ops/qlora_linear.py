"""LoRA linear on a quantized frozen weight (``QuantizedWeight``: NF4, int8, GGUF blocks), as registered ops.

    y = x Wᵀ + scale · (D ⊙ x) Aᵀ Bᵀ + bias,   W (N, K) stored quantized, dequantized inside the op

``lowcost.ops.lora_linear`` routes here when its weight is a ``QuantizedWeight``; ``quantized_linear`` is the
frozen layer without an adapter (y = x Wᵀ + bias). The custom ops take the weight as its stored tensors (a
``Tensor[]``), its format name, N and its block size, so the dispatcher, FakeTensor and ``torch.compile`` see
plain tensors. Saved for backward, as for a dense weight: x, u = (D⊙x)Aᵀ (M, r) and the seed, plus references
to the stored tensors (no new memory; the weight is never saved dequantized). An x made by a lowcost norm op is
saved as the norm's input and statistics (``lowcost.ops.normed_input``); an RMSNorm's output is rebuilt on the
Triton backend inside the x-pass's tile loads (no (M, K) normed tensor in backward), elsewhere in torch.

Backward (g = dL/dy, (M, N)):
    dB = s·gᵀu,  du = s·gB,  dA = duᵀ(D⊙x),  dx = gW + D⊙(duA),  dbias = Σ_m g;   no dW (W is frozen).
Without adapter: dx = g W, dbias = Σ_m g.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops import _quant_backends as qb
from lowcost.ops.autocast import autocast_operands
from lowcost.ops.lora_linear import SUPPORTED_DTYPES, _as_2d, _check_scalars, _check_tensor, _seed_tensor
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input
from lowcost.reference.quant import QuantizedWeight

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------- validation
def _check_quantized(x: Tensor, weight: QuantizedWeight, bias: Optional[Tensor]) -> tuple[int, int]:
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-D tensor")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K} (the quantized weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"the quantized weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != N or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be ({N},) in x's dtype {x.dtype} on {x.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return N, K


def _check_adapters(x: Tensor, N: int, K: int, lora_a: Tensor, lora_b: Tensor) -> None:
    _check_tensor("lora_a", lora_a, 2)
    _check_tensor("lora_b", lora_b, 2)
    r = lora_a.shape[0]
    if r < 1 or lora_a.shape[1] != K:
        raise ValueError(f"lora_a must have shape (r >= 1, K={K}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, r):
        raise ValueError(f"lora_b must have shape (N={N}, r={r}), got {tuple(lora_b.shape)}")
    if lora_a.dtype not in (x.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_a and lora_b must both be {x.dtype} (x's dtype) or torch.float32, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


# ----------------------------------------------------------------------------------------------- LoRA op
@torch.library.custom_op("lowcost::qlora_linear", mutates_args=())
def _qlora_linear_op(x: Tensor, packed: list[Tensor], scheme: str, n_rows: int, block_size: int, lora_a: Tensor,
                     lora_b: Tensor, bias: Optional[Tensor], scale: float, dropout: float, seed: Tensor,
                     backend: str) -> tuple[Tensor, Tensor]:
    y, u = qb.forward(backend, _as_2d(x), packed, scheme, n_rows, block_size, lora_a, lora_b, bias, scale,
                      dropout, int(seed))
    return y.reshape(*x.shape[:-1], n_rows), u


@_qlora_linear_op.register_fake
def _(x, packed, scheme, n_rows, block_size, lora_a, lora_b, bias, scale, dropout, seed, backend):
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(*x.shape[:-1], n_rows), x.new_empty(math.prod(x.shape[:-1]), lora_a.shape[0], dtype=u_dtype))


@torch.library.custom_op("lowcost::qlora_linear_backward", mutates_args=())
def _qlora_linear_backward_op(grad_y: Tensor, x: Tensor, packed: list[Tensor], scheme: str, block_size: int,
                              lora_a: Tensor, lora_b: Tensor, u: Tensor, scale: float, dropout: float, seed: Tensor,
                              backend: str, needs: Sequence[bool], norm_rstd: Optional[Tensor] = None,
                              norm_weight: Optional[Tensor] = None,
                              norm_form: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)), in grad_y's dtype: the Triton backend rebuilds it in its x-pass loads, the
    others rebuild it here in torch (``normed_input.kernel_input``)."""
    inp, norm = kernel_input(_as_2d(x), norm_rstd, norm_weight, norm_form, grad_y.dtype, backend == "triton")
    grads = qb.backward(backend, _as_2d(grad_y), inp, packed, scheme, block_size, lora_a, lora_b, u, scale,
                        dropout, int(seed), tuple(needs), **norm)
    dx, da, db, dbias = (g if g is not None else x.new_empty(0) for g in grads)
    return (dx.reshape(x.shape) if needs[0] else dx), da, db, dbias


@_qlora_linear_backward_op.register_fake
def _(grad_y, x, packed, scheme, block_size, lora_a, lora_b, u, scale, dropout, seed, backend, needs, norm_rstd=None,
      norm_weight=None, norm_form=""):
    shapes = (x.shape, lora_a.shape, lora_b.shape, (grad_y.shape[-1],))
    y_dtype = grad_y.dtype if norm_form else x.dtype  # the op's input dtype
    dtypes = (y_dtype, lora_a.dtype, lora_b.dtype, y_dtype)
    return tuple(x.new_empty(shape if need else (0,), dtype=dtype if need else x.dtype)
                 for need, shape, dtype in zip(needs, shapes, dtypes))


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scheme, n_rows, block_size, lora_a, lora_b, bias, scale, dropout, seed, backend = inputs
    ctx.mark_non_differentiable(output[1])
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.save_for_backward(*stored, lora_a, lora_b, output[1], seed, *packed)
    ctx.meta = (scheme, block_size, scale, dropout, backend, bias is not None)


def _backward(ctx, grad_y: Tensor, _grad_u: Optional[Tensor]):
    scheme, block_size, scale, dropout, backend, has_bias = ctx.meta
    # a normed x on the Triton backend stays (norm input, rstd, w), rebuilt in the x-pass's loads
    x, norm, (lora_a, lora_b, u, seed, *packed) = backward_input(ctx.saved_tensors, ctx.input_rebuild,
                                                                 backend == "triton")
    need = ctx.needs_input_grad
    needs = [need[0], need[5], need[6], need[7] and has_bias]
    dx, da, db, dbias = _qlora_linear_backward_op(grad_y, x, packed, scheme, block_size, lora_a, lora_b, u, scale,
                                                  dropout, seed, backend, needs, *norm)
    return (dx if needs[0] else None, [None] * len(packed), None, None, None, da if needs[1] else None,
            db if needs[2] else None, dbias if needs[3] else None, None, None, None, None)


_qlora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- frozen op
@torch.library.custom_op("lowcost::quantized_linear", mutates_args=())
def _quantized_linear_op(x: Tensor, packed: list[Tensor], scheme: str, n_rows: int, block_size: int,
                         bias: Optional[Tensor], backend: str) -> Tensor:
    y = qb.base_forward(backend, _as_2d(x), packed, scheme, n_rows, block_size, bias)
    return y.reshape(*x.shape[:-1], n_rows)


@_quantized_linear_op.register_fake
def _(x, packed, scheme, n_rows, block_size, bias, backend):
    return x.new_empty(*x.shape[:-1], n_rows)


@torch.library.custom_op("lowcost::quantized_linear_dgrad", mutates_args=())
def _quantized_linear_dgrad_op(grad_y: Tensor, packed: list[Tensor], scheme: str, n_cols: int, block_size: int,
                               backend: str) -> Tensor:
    dx = qb.base_dgrad(backend, _as_2d(grad_y), packed, scheme, n_cols, block_size)
    return dx.reshape(*grad_y.shape[:-1], n_cols)


@_quantized_linear_dgrad_op.register_fake
def _(grad_y, packed, scheme, n_cols, block_size, backend):
    return grad_y.new_empty(*grad_y.shape[:-1], n_cols)


def _setup_frozen(ctx, inputs, output) -> None:
    x, packed, scheme, n_rows, block_size, bias, backend = inputs
    ctx.save_for_backward(*packed)
    ctx.meta = (scheme, x.shape[-1], block_size, backend)


def _backward_frozen(ctx, grad_y: Tensor):
    scheme, K, block_size, backend = ctx.meta
    need, packed = ctx.needs_input_grad, list(ctx.saved_tensors)   # read once: a recomputed tensor is freed then
    dx = _quantized_linear_dgrad_op(grad_y, packed, scheme, K, block_size, backend) if need[0] else None
    dbias = _as_2d(grad_y).sum(0) if need[5] else None
    return dx, [None] * len(packed), None, None, None, dbias, None


_quantized_linear_op.register_autograd(_backward_frozen, setup_context=_setup_frozen)


# ----------------------------------------------------------------------------------------------- public
def qlora_linear(x: Tensor, weight: QuantizedWeight, lora_a: Tensor, lora_b: Tensor, scale: float,
                 bias: Optional[Tensor] = None, dropout: float = 0.0, seed=None, backend: Optional[str] = None,
                 where: str = "") -> Tensor:
    """y = x Wᵀ + scale · (D ⊙ x) Aᵀ Bᵀ + bias with W a ``QuantizedWeight`` (N, K), dequantized in the op.

    Arguments as for ``lowcost.ops.lora_linear`` (x (..., K), lora_a (r, K), lora_b (N, r), bias (N,) in x's
    dtype); the weight is dequantized to x's dtype. ``where`` names the caller (a module path) in errors.
    ``backend`` (``_quant_backends.QUANT_SUPPORT``): 'torch' (every format, one block of rows decoded at a
    time), 'triton' (every format, W's tile decoded inside the GEMM loop), 'cuda' (every format: the
    dequant_gemm ops of lowcost._C decode each W tile into shared memory before the MMA) or None; a backend without
    the weight's format is a ValueError naming the format and ``where``.
    Returns y (..., N) in x's dtype.
    """
    (x, bias), (lora_a, lora_b) = autocast_operands((x, bias), (lora_a, lora_b))
    N, K = _check_quantized(x, weight, bias)
    _check_adapters(x, N, K, lora_a, lora_b)
    _check_scalars(scale, dropout)
    name = qb.resolve_quant_backend(backend, x.device, lora_a.shape[0], weight.scheme, where)
    if x.dtype == torch.float64 and name != "torch":
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    y, _ = _qlora_linear_op(x, weight.packed, weight.scheme, N, weight.block_size, lora_a, lora_b, bias,
                            float(scale), float(dropout), _seed_tensor(seed, dropout), name)
    return y


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Optional[Tensor] = None,
                     backend: Optional[str] = None, where: str = "") -> Tensor:
    """y = x Wᵀ + bias for a frozen quantized weight (N, K): x (..., K) → y (..., N) in x's dtype; dx = g W."""
    (x, bias), _ = autocast_operands((x, bias))
    N, _ = _check_quantized(x, weight, bias)
    name = qb.resolve_quant_backend(backend, x.device, 1, weight.scheme, where)
    if x.dtype == torch.float64 and name != "torch":
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    return _quantized_linear_op(x, weight.packed, weight.scheme, N, weight.block_size, bias, name)
