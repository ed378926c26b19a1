"""``lowcost.ops.layer_norm``: LayerNorm over the last dimension as a registered op whose output consumers need
not save.

    y = (x − mean) · rstd ⊙ w + b,   mean and rstd = 1 / sqrt(var + eps) over the last dimension

x: (..., H), weight w and bias b: (H,) or None → y: (..., H), computed by ``torch.native_layer_norm`` (the kernel
``nn.LayerNorm`` runs, so y is bit-identical to it); backward is ``aten.native_layer_norm_backward`` on the saved
mean and rstd: dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) with ĝ = g ⊙ w, x̂ = (x − mean)·rstd;
dw = Σ_rows g ⊙ x̂, db = Σ_rows g (each only when that parameter requires grad).

Saved for backward: x (the caller's tensor), mean and rstd (..., 1) and references to w and b, which is what the
unfused module keeps too. Its output is tagged (``lowcost.ops.normed_input``): the LoRA ops that read it keep
(x, w, b) and run the same kernel again in backward instead of keeping the (M, H) normed tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lowcost.ops.lora_linear import _check_tensor
from lowcost.ops.normed_input import tag
from lowcost.ops.rms_norm import check_norm_operands

Tensor = torch.Tensor


@torch.library.custom_op("lowcost::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat = x.new_empty(*x.shape[:-1], 1, dtype=stat_dtype)
    return x.new_empty(x.shape), stat, x.new_empty(stat.shape, dtype=stat_dtype)


@torch.library.custom_op("lowcost::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad_y, x, (x.shape[-1],), mean, rstd, weight, bias,
                                                           list(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in (dx, dw, db))


@_layer_norm_backward_op.register_fake
def _(grad_y, x, mean, rstd, weight, bias, needs):
    like = (x, weight, bias)
    return tuple(x.new_empty(t.shape, dtype=t.dtype) if need and t is not None else x.new_empty(0)
                 for need, t in zip(needs, like))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _backward(ctx, grad_y: Tensor, _grad_mean, _grad_rstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[2]]
    grads = _layer_norm_backward_op(grad_y, x, mean, rstd, weight, bias, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias, eps) -> None:
    check_norm_operands(x, eps)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(name, t, 1)
        if t.shape[0] != x.shape[-1] or t.device != x.device:
            raise ValueError(f"{name} must have shape (H={x.shape[-1]},) on x's device {x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """LayerNorm of x: (..., H) over H, bit-identical to ``nn.LayerNorm`` / ``F.layer_norm`` with the same
    parameters. The output carries a ``lowcost.ops.normed_input`` tag (see the module docstring)."""
    _check(x, weight, bias, eps)
    y, _, _ = _layer_norm_op(x, weight, bias, float(eps))
    return tag(y, (x, weight, bias), "layer", eps)
