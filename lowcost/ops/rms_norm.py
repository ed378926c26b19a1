"""``lowcost.ops.rms_norm``: RMSNorm as a dispatcher-registered op whose output consumers need not save.

    y = w ⊙ cast(x · rstd)            form "llama"      rstd = 1 / sqrt(mean(x²) + eps)
    y = cast(x · rstd ⊙ (1 + w))      form "gemma"

x: (..., H), weight: (H,) → y: (..., H) (dtype: x's for "gemma"; the promotion of x's and w's for "llama", as in
HF). The forward runs the HF modules' own operations, so y is bit-identical to theirs
(``lowcost.reference.rms_norm``).

Saved for backward: x (the caller's tensor), rstd (..., 1) and a reference to w, which is what the unfused
module keeps too. What is new is the tag on y (``lowcost.ops.normed_input``): the LoRA ops that read y keep
(x, rstd, w) instead of y and rebuild it in backward, so the (M, H) normed tensor is never saved.

Backward (``lowcost.reference.rms_norm``): ĝ = g ⊙ w_e (w_e = w or 1 + w), x̂ = x·rstd,
dx = rstd · (ĝ − x̂ · mean(ĝ ⊙ x̂)), dw = Σ_rows g ⊙ x̂ (only when the weight requires grad).
The op runs on the torch backend on every device: it is elementwise work plus one row reduction.
"""
from __future__ import annotations

import math

from typing import Sequence

import torch

from lowcost.ops.lora_linear import SUPPORTED_DTYPES, _check_tensor
from lowcost.ops.normed_input import tag
from lowcost.reference.rms_norm import FORMS, compute_dtype, rms_norm as reference_rms_norm, rms_norm_backward

Tensor = torch.Tensor


def _out_dtype(x: Tensor, weight: Tensor, form: str) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype) if form == "llama" else x.dtype


@torch.library.custom_op("lowcost::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, form: str) -> tuple[Tensor, Tensor]:
    return reference_rms_norm(x, weight, eps, form)


@_rms_norm_op.register_fake
def _(x, weight, eps, form):
    return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, form)),
            x.new_empty(*x.shape[:-1], 1, dtype=compute_dtype(x.dtype)))


@torch.library.custom_op("lowcost::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_y: Tensor, x: Tensor, rstd: Tensor, weight: Tensor, form: str,
                          needs: Sequence[bool]) -> tuple[Tensor, Tensor]:
    dx, dw = rms_norm_backward(grad_y, x, rstd, weight, form, need_weight=needs[1])
    return dx if needs[0] else x.new_empty(0), dw if dw is not None else weight.new_empty(0)


@_rms_norm_backward_op.register_fake
def _(grad_y, x, rstd, weight, form, needs):
    return (x.new_empty(x.shape if needs[0] else (0,)), weight.new_empty(weight.shape if needs[1] else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, form = inputs
    _, stat = output
    ctx.mark_non_differentiable(stat)
    ctx.save_for_backward(x, stat, weight)
    ctx.form = form


def _backward(ctx, grad_y: Tensor, _grad_rstd):
    x, stat, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    dx, dw = _rms_norm_backward_op(grad_y, x, stat, weight, ctx.form, needs)
    return dx if needs[0] else None, dw if needs[1] else None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def check_norm_operands(x, eps) -> None:
    """The checks both norm ops make: x a floating (..., H) tensor of a supported dtype, eps finite and >= 0."""
    _check_tensor("x", x)
    if x.dim() < 1 or x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"x must be a float32/float16/bfloat16 (or float64) tensor of shape (..., H), got {x.dtype} "
                        f"of shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check(x, weight, eps, form) -> None:
    check_norm_operands(x, eps)
    _check_tensor("weight", weight, 1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape (H={x.shape[-1]},) to match x, got {tuple(weight.shape)}")
    if weight.device != x.device or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor on x's device {x.device}, got {weight.dtype} on "
                         f"{weight.device}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, form: str = "llama") -> Tensor:
    """RMSNorm of x: (..., H) with weight (H,), bit-identical to the HF module of that form.

    The returned tensor carries a ``lowcost.ops.normed_input`` tag: lowcost LoRA ops that read it save
    (x, rstd, weight) instead of it. Any other consumer sees an ordinary tensor.
    """
    _check(x, weight, eps, form)
    y, stat = _rms_norm_op(x, weight, float(eps), form)
    return tag(y, (x, stat, weight), f"rms:{form}")
