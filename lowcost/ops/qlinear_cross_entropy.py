"""``lowcost.ops.qlinear_cross_entropy``: the fused linear cross-entropy on a frozen QUANTIZED head weight.

    loss = F.cross_entropy(h Wᵀ + bias [+ s·(D⊙h) Aᵀ Bᵀ], labels, ignore_index, reduction, label_smoothing)

with W (V, K) a ``QuantizedWeight`` (NF4, int8, GGUF blocks) and Gemma's soft-cap optionally applied first.
``lowcost.ops.linear_cross_entropy`` routes here when its weight is a ``QuantizedWeight``. The composition is
the dense op's (``lowcost.reference.linear_cross_entropy_rows``, rows ``chunk`` at a time, never the (M, V)
logits); only the head's two GEMMs differ (``QuantizedHead``): each chunk's logits z = h Wᵀ + bias and its
dh = dz W are the dequantizing GEMMs of ``lowcost.ops._quant_backends`` (torch: one block of W's rows decoded
at a time; triton / cuda: W's tile decoded inside the GEMM). The row pass is the dense op's per backend.

W is frozen (a quantized weight has no gradient): there is no dW. Backward (g = ∂L/∂loss; w_m = g_m, g/n_valid
for "mean", g for "sum"):
    dz = w ⊙ (softmax(z) − (1−ε)·onehot(y) − ε/V) (⊙ (1 − (z/c)²) with soft-capping); ignored rows 0
    dh = dz W + D⊙(du A),  du = s·dz B,  dbias = Σ_m dz,  dB = s·dzᵀ u,  dA = duᵀ (D⊙h)

Two custom ops, the weight crossing the dispatcher as its stored tensors (``Tensor[]``), its format name, V and
its block size (as ``lowcost::qlora_linear``):
- ``lowcost::qlinear_cross_entropy`` → (loss, dh, dbias, dA, dB): for "mean"/"sum" the gradients are computed
  in the same pass and saved (dh (M, K), plus dbias, dA, dB where trained), backward scales them.
- ``lowcost::qlinear_cross_entropy_backward`` → (dh, dbias, dA, dB): for "none", backward recomputes each
  chunk's logits. Saved: h (the caller's tensor), labels, the seed and references to the stored tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lowcost.ops import _quant_backends as qb
from lowcost.ops.autocast import autocast_loss_dtype, autocast_operands
from lowcost.ops.linear_cross_entropy import (_check_head_lora, _check_hidden_and_labels, _check_settings,
                                              _row_weights, _run)
from lowcost.ops.lora_linear import _check_tensor, _seed_tensor
from lowcost.reference.linear_cross_entropy import CrossEntropySpec, reduce_rows
from lowcost.reference.quant import QuantizedWeight

Tensor = torch.Tensor
NO_GRADS = (False,) * 4


class QuantizedHead:
    """The head's GEMMs on a quantized W (V, K), dequantized inside them by backend ``backend``'s kernels
    (``_quant_backends.base_forward`` / ``base_dgrad``). Frozen: no dW. dbias comes out in ``dtype`` (h's)."""
    trainable = False

    def __init__(self, packed: Sequence[Tensor], scheme: str, shape: tuple[int, int], block_size: int,
                 backend: str, dtype: torch.dtype):
        self.packed, self.scheme, self.block_size, self.backend = list(packed), scheme, block_size, backend
        self.shape, self.dtype = torch.Size(shape), dtype

    def logits(self, h: Tensor, bias: Optional[Tensor]) -> Tensor:
        """z = h Wᵀ + bias (C, V) in h's dtype."""
        return qb.base_forward(self.backend, h, self.packed, self.scheme, self.shape[0], self.block_size, bias)

    def dgrad(self, dz: Tensor, out: Tensor) -> None:
        """out (C, K) ← dz W in dz's (h's) dtype."""
        out.copy_(qb.base_dgrad(self.backend, dz, self.packed, self.scheme, self.shape[1], self.block_size))


# ----------------------------------------------------------------------------------------------- validation
def _check_quantized_operands(hidden, weight: QuantizedWeight, labels, bias, lora_a, lora_b) -> None:
    _check_hidden_and_labels(hidden, weight.shape, labels)
    V = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if tuple(bias.shape) != (V,) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be ({V},) in hidden's dtype {hidden.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
    _check_head_lora(hidden, weight, lora_a, lora_b)
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")


# ----------------------------------------------------------------------------------------------- custom ops
def _rows(hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed,
          spec, chunk, backend, row_weight, needs):
    """The dense op's composition on a ``QuantizedHead``; needs (dh, dbias, dA, dB) → its (dh, dW, ...) with no dW."""
    head = QuantizedHead(packed, scheme, (n_rows, hidden.shape[-1]), block_size, backend, hidden.dtype)
    dense_needs = (needs[0], False) + tuple(needs[1:])
    (loss_rows, grads), lab = _run(hidden, head, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, spec,
                                   chunk, backend, row_weight, dense_needs)
    dh = grads.get("dh")
    out = (dh.reshape(hidden.shape) if dh is not None else None, grads.get("dbias"), grads.get("da"),
           grads.get("db"))
    return loss_rows, lab, tuple(g if g is not None else hidden.new_empty(0) for g in out)


@torch.library.custom_op("lowcost::qlinear_cross_entropy", mutates_args=())
def _qlce_op(hidden: Tensor, packed: list[Tensor], scheme: str, n_rows: int, block_size: int, labels: Tensor,
             bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], lora_scale: float,
             lora_dropout: float, seed: Tensor, ignore_index: int, label_smoothing: float, softcap: float,
             reduction: str, chunk: int, needs: Sequence[bool], backend: str, loss_dtype: torch.dtype
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = CrossEntropySpec(ignore_index, label_smoothing, softcap)
    lab = labels.reshape(-1).long()
    row_weight = _row_weights(hidden.new_ones(()), lab, spec, reduction, hidden) if any(needs) else None
    loss_rows, lab, grads = _rows(hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b,
                                  lora_scale, lora_dropout, seed, spec, chunk, backend, row_weight, needs)
    loss = reduce_rows(loss_rows, lab, spec, reduction).to(loss_dtype)
    return (loss.reshape(labels.shape) if reduction == "none" else loss,) + grads


def _fake_grads(hidden, n_rows, lora_a, lora_b, needs):
    shapes = (hidden.shape, (n_rows,), None if lora_a is None else lora_a.shape,
              None if lora_b is None else lora_b.shape)
    dtypes = (hidden.dtype, hidden.dtype, None if lora_a is None else lora_a.dtype,
              None if lora_b is None else lora_b.dtype)
    return tuple(hidden.new_empty(shape, dtype=dtype) if need and shape is not None else hidden.new_empty(0)
                 for need, shape, dtype in zip(needs, shapes, dtypes))


@_qlce_op.register_fake
def _(hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed,
      ignore_index, label_smoothing, softcap, reduction, chunk, needs, backend, loss_dtype):
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=loss_dtype)
    return (loss,) + _fake_grads(hidden, n_rows, lora_a, lora_b, needs)


@torch.library.custom_op("lowcost::qlinear_cross_entropy_backward", mutates_args=())
def _qlce_backward_op(grad_loss: Tensor, hidden: Tensor, packed: list[Tensor], scheme: str, n_rows: int,
                      block_size: int, labels: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor],
                      lora_b: Optional[Tensor], lora_scale: float, lora_dropout: float, seed: Tensor,
                      ignore_index: int, label_smoothing: float, softcap: float, reduction: str, chunk: int,
                      needs: Sequence[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = CrossEntropySpec(ignore_index, label_smoothing, softcap)
    row_weight = _row_weights(grad_loss, labels.reshape(-1).long(), spec, reduction, hidden)
    return _rows(hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b, lora_scale, lora_dropout,
                 seed, spec, chunk, backend, row_weight, needs)[2]


@_qlce_backward_op.register_fake
def _(grad_loss, hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b, lora_scale, lora_dropout,
      seed, ignore_index, label_smoothing, softcap, reduction, chunk, needs, backend):
    return _fake_grads(hidden, n_rows, lora_a, lora_b, needs)


def _setup_context(ctx, inputs, output) -> None:
    (hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed,
     ignore_index, label_smoothing, softcap, reduction, chunk, needs, backend, _) = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.in_forward, ctx.computed, ctx.n_packed = any(needs), tuple(needs), len(packed)
    ctx.settings = (scheme, n_rows, block_size, lora_scale, lora_dropout, ignore_index, label_smoothing, softcap,
                    reduction, chunk, backend)
    if ctx.in_forward:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, labels, bias, lora_a, lora_b, seed, *packed)


def _backward(ctx, grad_loss, *_):
    order = (0, 6, 7, 8)  # hidden, bias, lora_a, lora_b
    wanted = [ctx.needs_input_grad[i] for i in order]
    if ctx.in_forward:
        grads = [g.mul(grad_loss.to(g.dtype)) if want and computed else None
                 for want, computed, g in zip(wanted, ctx.computed, ctx.saved_tensors)]
    else:
        hidden, labels, bias, lora_a, lora_b, seed, *packed = ctx.saved_tensors
        scheme, n_rows, block_size, scale, dropout, ignore, smoothing, softcap, reduction, chunk, backend = ctx.settings
        wanted[1] = wanted[1] and bias is not None
        out = _qlce_backward_op(grad_loss, hidden, packed, scheme, n_rows, block_size, labels, bias, lora_a, lora_b,
                                scale, dropout, seed, ignore, smoothing, softcap, reduction, chunk, wanted, backend)
        grads = [g if want else None for want, g in zip(wanted, out)]
    dh, dbias, da, db = grads
    return (dh, [None] * ctx.n_packed, None, None, None, None, dbias, da, db) + (None,) * 11


_qlce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def qlinear_cross_entropy(hidden: Tensor, weight: QuantizedWeight, labels: Tensor, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                          chunk: Optional[int] = None, *, softcap: Optional[float] = None,
                          lora_a: Optional[Tensor] = None, lora_b: Optional[Tensor] = None, lora_scale: float = 1.0,
                          lora_dropout: float = 0.0, seed=None, backend: Optional[str] = None,
                          loss_dtype: Optional[torch.dtype] = None, where: str = "") -> Tensor:
    """``lowcost.ops.linear_cross_entropy`` with W a frozen ``QuantizedWeight`` (V, K), dequantized inside the
    head's GEMMs to hidden's dtype. Arguments as there (bias (V,) in hidden's dtype; a trainable quantized W does
    not exist). ``backend`` (``_quant_backends.QUANT_SUPPORT``): 'torch' (every format), 'triton', 'cuda' or
    None; a backend without the weight's format is a ValueError naming the format and ``where``.
    Returns the loss: 0-D for "mean"/"sum", labels' shape for "none"."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a lowcost QuantizedWeight, got {type(weight).__name__}")
    loss_dtype = loss_dtype or autocast_loss_dtype(hidden)
    (hidden, bias), (lora_a, lora_b) = autocast_operands((hidden, bias), (lora_a, lora_b))
    _check_quantized_operands(hidden, weight, labels, bias, lora_a, lora_b)
    _check_settings(ignore_index, reduction, label_smoothing, softcap, chunk, lora_scale, lora_dropout)
    if loss_dtype is not None and (not isinstance(loss_dtype, torch.dtype) or not loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be a floating torch.dtype or None, got {loss_dtype!r}")
    rank = 1 if lora_a is None else lora_a.shape[0]
    name = qb.resolve_quant_backend(backend, hidden.device, rank, weight.scheme, where)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"hidden of dtype float64 runs only on backend='torch' (got backend={name!r})")
    needs = NO_GRADS
    if torch.is_grad_enabled() and reduction != "none":
        needs = tuple(t is not None and t.requires_grad for t in (hidden, bias, lora_a, lora_b))
    return _qlce_op(hidden, weight.packed, weight.scheme, weight.shape[0], weight.block_size, labels, bias, lora_a,
                    lora_b, float(lora_scale), float(lora_dropout),
                    _seed_tensor(seed, lora_dropout if lora_a is not None else 0.0), ignore_index,
                    float(label_smoothing), float(softcap or 0.0), reduction, int(chunk or 0), needs, name,
                    loss_dtype or hidden.dtype)[0]
