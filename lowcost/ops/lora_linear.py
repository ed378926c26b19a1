"""``lowcost.ops.lora_linear``: the fused LoRA linear as a dispatcher-registered op with autograd.

    y = x Wᵀ + scale · (D ⊙ x) Aᵀ Bᵀ + bias

x: (..., K), weight W: (N, K), lora_a A: (r, K), lora_b B: (N, r), bias: (N,) or None → y: (..., N).
D is a dropout mask regenerated from (seed, element index) by Philox (docs/lora_linear_spec.md), so no
mask and no dropped copy of x is ever stored.

Two custom ops (``torch.library.custom_op``) carry it through the dispatcher, FakeTensor and
``torch.compile``: ``lowcost::lora_linear`` → (y, u) and ``lowcost::lora_linear_backward`` →
(dx, dA, dB, dbias). Saved for backward: x (the caller's tensor), u = (D⊙x)Aᵀ (M, r) and the seed, plus
references to the parameters W, A, B (their own storage, no new memory). An x made by a lowcost norm op
(``rms_norm``, ``layer_norm``) is saved as the norm's input and statistics instead, and rebuilt in backward
(``lowcost.ops.normed_input``): an RMSNorm's output on the Triton backend inside the x-pass's tile loads
(no (M, K) normed tensor at all, unless dW is asked for), otherwise in torch before the backward op.

Backward (g = dL/dy flattened to (M, N)):
    dB = s·gᵀu,  du = s·gB,  dA = duᵀ(D⊙x),  dx = gW + D⊙(duA),  dbias = Σ_m g,
    dW = gᵀx only when the weight requires grad (it is frozen in LoRA).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops.autocast import autocast_operands
from lowcost.ops.backend import backend_module, resolve_backend
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input

Tensor = torch.Tensor
SEED_LIMIT = 2**63
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, value, ndim: Optional[int] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def _check_shapes(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor]) -> None:
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-D tensor")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_a", lora_a, 2)
    _check_tensor("lora_b", lora_b, 2)
    (N, K), r = weight.shape, lora_a.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K} (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if r < 1:
        raise ValueError(f"lora_a must have r >= 1 rows, got shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must have shape (r, K={K}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, r):
        raise ValueError(f"lora_b must have shape (N={N}, r={r}), got {tuple(lora_b.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape (N={N},), got {tuple(bias.shape)}")


def _check_dtypes_devices(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                          bias: Optional[Tensor]) -> None:
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_a must be {x.dtype} (x's dtype) or torch.float32, got {lora_a.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b must have lora_a's dtype {lora_a.dtype}, got {lora_b.dtype}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_scalars(scale, dropout) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _seed_tensor(seed, dropout: float) -> Tensor:
    """The seed as an int64 0-D CPU tensor, so that a new seed never recompiles a compiled graph."""
    if seed is None:
        if dropout == 0.0:
            return torch.zeros((), dtype=torch.int64)
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)  # from torch's CPU generator
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"seed must be an int or a one-element int64 CPU tensor, got {seed.dtype} "
                             f"tensor of shape {tuple(seed.shape)} on {seed.device}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


def draw_seed(dropout: float) -> Tensor:
    """The seed ``lora_linear(seed=None)`` draws for dropout p: one draw from torch's CPU generator when p > 0,
    none (a zero seed) when p = 0; a 0-D int64 CPU tensor."""
    return _seed_tensor(None, dropout)


# ----------------------------------------------------------------------------------------------- custom ops
def _as_2d(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("lowcost::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                    scale: float, dropout: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    impl = backend_module(backend)
    y, u = impl.forward(_as_2d(x), weight, lora_a, lora_b, bias, scale, dropout, int(seed))
    return y.reshape(*x.shape[:-1], weight.shape[0]), u


@_lora_linear_op.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout, seed, backend):
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    M = math.prod(x.shape[:-1])
    return (x.new_empty(*x.shape[:-1], weight.shape[0]),
            x.new_empty(M, lora_a.shape[0], dtype=u_dtype))


@torch.library.custom_op("lowcost::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                             u: Tensor, scale: float, dropout: float, seed: Tensor, backend: str,
                             needs: Sequence[bool], norm_rstd: Optional[Tensor] = None,
                             norm_weight: Optional[Tensor] = None,
                             norm_form: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)), in grad_y's dtype: the Triton backend rebuilds it in its x-pass loads, the
    others rebuild it here in torch (``normed_input.kernel_input``)."""
    impl = backend_module(backend)
    inp, norm = kernel_input(_as_2d(x), norm_rstd, norm_weight, norm_form, grad_y.dtype, backend == "triton")
    grads = impl.backward(_as_2d(grad_y), inp, weight, lora_a, lora_b, u, scale, dropout, int(seed),
                          tuple(needs), **norm)
    dx, da, db, dbias = (g if g is not None else x.new_empty(0) for g in grads)
    return (dx.reshape(x.shape) if needs[0] else dx), da, db, dbias


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, backend, needs, norm_rstd=None, norm_weight=None,
      norm_form=""):
    shapes = (x.shape, lora_a.shape, lora_b.shape, (weight.shape[0],))
    y_dtype = grad_y.dtype if norm_form else x.dtype  # the op's input dtype
    dtypes = (y_dtype, lora_a.dtype, lora_b.dtype, y_dtype)
    return tuple(x.new_empty(shape if need else (0,), dtype=dtype if need else x.dtype)
                 for need, shape, dtype in zip(needs, shapes, dtypes))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, lora_a, lora_b, bias, scale, dropout, seed, backend = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.save_for_backward(*stored, weight, lora_a, lora_b, u, seed)
    ctx.scale, ctx.dropout, ctx.backend = scale, dropout, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: Tensor, _grad_u: Optional[Tensor]):
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    # a normed x stays (norm input, rstd, w) for the Triton kernels unless dW (which needs x itself) is asked for
    x, norm, (weight, lora_a, lora_b, u, seed) = backward_input(ctx.saved_tensors, ctx.input_rebuild,
                                                                ctx.backend == "triton" and not need_w)
    needs = [need_x, need_a, need_b, need_bias and ctx.has_bias]
    dx, da, db, dbias = _lora_linear_backward_op(grad_y, x, weight, lora_a, lora_b, u, ctx.scale,
                                                  ctx.dropout, seed, ctx.backend, needs, *norm)
    dw = (_as_2d(grad_y).t() @ _as_2d(x)).to(weight.dtype) if need_w else None
    return (dx if needs[0] else None, dw, da if needs[1] else None, db if needs[2] else None,
            dbias if needs[3] else None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Optional[Tensor] = None, dropout: float = 0.0, seed=None,
                backend: Optional[str] = None) -> Tensor:
    """y = x Wᵀ + scale · (D ⊙ x) Aᵀ Bᵀ + bias, one fused op in forward and one in backward.

    Args:
        x: (..., K) float32 / float16 / bfloat16, any strides.
        weight: (N, K), x's dtype (frozen base weight; dW is computed only if it requires grad).
        lora_a: (r, K) and lora_b: (N, r), x's dtype or float32 (adapters kept in fp32 with bf16 x).
        scale: the LoRA scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA); finite.
        bias: (N,) or None, x's dtype.
        dropout: p in [0, 1), applied to x on the LoRA path only.
        seed: int in [0, 2**63), int64 CPU tensor, or None (drawn from torch's CPU generator when p > 0).
            The mask is a pure function of (seed, element index): the same seed gives the same mask on
            every backend and in backward.
        backend: "torch", "triton", "cuda" or None (``LOWCOST_BACKEND``, else the best available).
    Returns:
        y: (..., N) in x's dtype.

    A ``lowcost.reference.quant.QuantizedWeight`` as ``weight`` (NF4, int8, GGUF blocks) runs
    ``lowcost.ops.qlora_linear``: the same op with the weight dequantized inside it.
    """
    if not isinstance(weight, torch.Tensor) and hasattr(weight, "scheme"):
        from lowcost.ops.qlora_linear import qlora_linear  # imports this module: bound here, not at the top
        return qlora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, seed, backend)
    (x, weight, bias), (lora_a, lora_b) = autocast_operands((x, weight, bias), (lora_a, lora_b))
    _check_shapes(x, weight, lora_a, lora_b, bias)
    _check_dtypes_devices(x, weight, lora_a, lora_b, bias)
    _check_scalars(scale, dropout)
    name = resolve_backend(backend, x.device, lora_a.shape[0])
    if x.dtype == torch.float64 and name != "torch":
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    y, _ = _lora_linear_op(x, weight, lora_a, lora_b, bias, float(scale), float(dropout),
                           _seed_tensor(seed, dropout), name)
    return y
