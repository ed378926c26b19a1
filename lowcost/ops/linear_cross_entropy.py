"""``lowcost.ops.linear_cross_entropy``: the loss of a linear head without (tokens × vocab) logits.

    loss = F.cross_entropy(h Wᵀ + bias [+ s·(D⊙h) Aᵀ Bᵀ], labels, ignore_index, reduction, label_smoothing)

with Gemma's soft-capping z ← c·tanh(z/c) optionally applied to the logits first. hidden h: (..., K),
weight W: (V, K), labels: (...) int64, bias: (V,); an optional LoRA adapter on the head: lora_a A (r, K),
lora_b B (V, r), scale s, dropout p (mask D from Philox(seed), as ``lowcost.ops.lora_linear`` draws it).

Rows are processed ``chunk`` at a time (``lowcost.reference.linear_cross_entropy`` has the math): a chunk's
logits are formed by one GEMM, turned into losses and overwritten in place by their gradient, then used for
the gradient GEMMs, so at most one (chunk, V) buffer exists at any time.

Two custom ops carry it through the dispatcher, FakeTensor and ``torch.compile``:
- ``lowcost::linear_cross_entropy`` → (loss, dh, dW, dbias, dA, dB). For "mean"/"sum" with a frozen W, the
  gradients of the loss are computed in the same pass (the logits are formed once per step, as in the
  unfused forward) and saved; backward only scales them by the incoming scalar gradient. Saved: dh (M, K),
  plus dbias, dA, dB where they are trained — never logits or log-probabilities.
- ``lowcost::linear_cross_entropy_backward`` → (dh, dW, dbias, dA, dB): for reduction "none" (a per-row
  incoming gradient) or a trainable W (whose gradient would be a saved (V, K) tensor), backward recomputes
  each chunk's logits instead. Saved: h (the caller's tensor), labels and the seed.

A ``QuantizedWeight`` as the weight runs ``lowcost.ops.qlinear_cross_entropy`` (the same composition with W
dequantized inside the head's two GEMMs; no dW).

Backends: the composition (``lowcost.reference.linear_cross_entropy_rows``: GEMMs by torch) is one; only the row
pass differs: "torch" (the reference's), "triton" (``lowcost.kernels.linear_cross_entropy``), "cuda" (lowcost._C's
``softmax_xent_rows``, csrc/xent_rows.h: CUDA kernels, with a C++ twin that runs the same composition on CPU
tensors for the tests; a row's reduction order is fixed by V alone, so its bits do not depend on the chunk or on how
many blocks the launch plan gives a row). "triton" and "cuda" take fp32/fp16/bf16 and compute the row pass in float32.

Backward (g = ∂L/∂loss; w_m = g_m, or g/n_valid for "mean", g for "sum"):
    dz = w ⊙ (softmax(z) − (1−ε)·onehot(y) − ε/V) (⊙ (1 − (z/c)²) with soft-capping); ignored rows 0
    dh = dz W + D⊙(du A),  du = s·dz B,  dW = dzᵀ h,  dbias = Σ_m dz,  dB = s·dzᵀ u,  dA = duᵀ (D⊙h)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops import _torch_backend
from lowcost.ops.autocast import autocast_loss_dtype, autocast_operands
from lowcost.ops.backend import resolve_backend
from lowcost.ops.lora_linear import SUPPORTED_DTYPES, _check_tensor, _seed_tensor
from lowcost.reference.quant import QuantizedWeight
from lowcost.reference.linear_cross_entropy import (CrossEntropySpec, HeadLoRA, linear_cross_entropy_rows,
                                                    reduce_rows, softmax_xent_rows, valid_count)

Tensor = torch.Tensor
REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 2**23          # default chunk: about 8M logits (32 MiB in float32) per buffer
NO_GRADS = (False,) * 5
# The cuda backend's default chunk keeps 2 rows per SM (as the Triton kernel's programs, for the chunk GEMMs); its row
# pass fills the SMs beyond that by splitting each row over several blocks when the rows alone are too few
# (csrc/cuda/launch_plan.h's plan_xent_rows: 4 blocks per row at 264 rows of 128,256 logits on 132 SMs).
CUDA_ROW_BLOCKS_PER_SM = 2


def default_chunk(rows: int, vocab: int, min_rows: int = 1) -> int:
    """Rows per logits buffer: ~CHUNK_ELEMENTS logits, at least ``min_rows`` (the Triton or CUDA row kernel's
    rows that fill the GPU; 1 on the torch backend) and at least 1 row, at most all of them."""
    return max(1, min(rows, max(min_rows, CHUNK_ELEMENTS // max(vocab, 1))))


def _min_chunk_rows(backend: str, device: torch.device) -> int:
    if backend == "cuda" and device.type == "cuda":
        return CUDA_ROW_BLOCKS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    if backend != "triton":
        return 1
    from lowcost.kernels.linear_cross_entropy import min_chunk_rows  # triton: heavy import
    return min_chunk_rows(device)


# ----------------------------------------------------------------------------------------------- validation
def _check_hidden_and_labels(hidden, weight_shape, labels) -> None:
    """hidden (..., K) and labels (...) against W's shape (V, K); the weight's own checks are the caller's."""
    _check_tensor("hidden", hidden)
    _check_tensor("labels", labels)
    if hidden.dim() < 1 or hidden.shape[-1] != weight_shape[1]:
        raise ValueError(f"hidden must have last dimension K={weight_shape[1]} (weight is "
                         f"{tuple(weight_shape)}), got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if hidden.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")


def _check_operands(hidden, weight, labels, bias, lora_a, lora_b) -> None:
    _check_tensor("weight", weight, 2)
    _check_hidden_and_labels(hidden, weight.shape, labels)
    V = weight.shape[0]
    for name, t, shape in (("weight", weight, None), ("bias", bias, (V,))):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        if t is not None and shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _check_head_lora(hidden, weight, lora_a, lora_b)
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")


def _check_head_lora(hidden, weight, lora_a, lora_b) -> None:
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (a LoRA adapter on the head) or not at all")
    if lora_a is None:
        return
    _check_tensor("lora_a", lora_a, 2)
    _check_tensor("lora_b", lora_b, 2)
    (V, K), r = weight.shape, lora_a.shape[0]
    if r < 1 or lora_a.shape[1] != K:
        raise ValueError(f"lora_a must have shape (r >= 1, K={K}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (V, r):
        raise ValueError(f"lora_b must have shape (V={V}, r={r}), got {tuple(lora_b.shape)}")
    if lora_a.dtype not in (hidden.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_a and lora_b must both be {hidden.dtype} (hidden's dtype) or float32, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")


def _check_settings(ignore_index, reduction, label_smoothing, softcap, chunk, lora_scale, lora_dropout) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1 (rows per logits buffer), got {chunk!r}")
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite real number, got {lora_scale!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")


def _check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Raises ValueError (instead of reading out of bounds) when a label is neither a class nor ignored."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; got "
                         f"{int(labels[index])} at flat position {index}")


def _resolve(backend: Optional[str], device: torch.device) -> str:
    """"torch", "triton" or "cuda" (on a GPU the default is Triton, then CUDA; on CPU torch). backend='cuda' needs
    CUDA tensors and lowcost._C built with the CUDA kernels, and is refused with the reason otherwise."""
    return resolve_backend(backend, device)


# ----------------------------------------------------------------------------------------------- custom ops
def _rows_fn(backend: str):
    """The row pass of ``linear_cross_entropy_rows``: the reference's (torch), the Triton kernel, or lowcost._C's
    ``softmax_xent_rows`` (cuda: a CUDA kernel on CUDA tensors, its C++ twin on CPU tensors)."""
    if backend == "torch":
        return softmax_xent_rows
    if backend == "cuda":
        def cuda_rows(z, labels, row_weight, spec):
            return torch.ops.lowcost.softmax_xent_rows(z, labels, row_weight, spec.ignore_index,
                                                       spec.label_smoothing, spec.softcap)
        return cuda_rows
    from lowcost.kernels.linear_cross_entropy import softmax_xent_rows as triton_rows  # triton: heavy import

    def rows(z, labels, row_weight, spec):
        return triton_rows(z, labels, row_weight, spec.ignore_index, spec.label_smoothing, spec.softcap)
    return rows


def _row_weights(grad: Tensor, labels: Tensor, spec: CrossEntropySpec, reduction: str, hidden: Tensor) -> Tensor:
    """w (M,): ∂L/∂loss_m for the incoming gradient ``grad`` (0-D for "mean"/"sum", (M,) for "none"), in the row
    pass's accumulation dtype: float64 for float64 hidden, else float32 — whatever ``loss_dtype`` made of
    ``grad`` (a float64 loss of fp32 logits must not hand the row kernels float64 weights)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad = grad.to(acc).reshape(-1)
    if reduction == "mean":
        grad = grad / valid_count(labels, spec)
    return grad.expand(labels.shape[0]).contiguous()


def _run(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, spec, chunk, backend,
         row_weight, needs):
    lora = None if lora_a is None else HeadLoRA(lora_a, lora_b, lora_scale, lora_dropout, int(seed))
    h2, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    _check_label_range(lab, weight.shape[0], spec.ignore_index)
    chunk = chunk or default_chunk(h2.shape[0], weight.shape[0], _min_chunk_rows(backend, h2.device))
    return linear_cross_entropy_rows(h2, weight, lab, bias, lora, spec, chunk, row_weight, tuple(needs),
                                     _rows_fn(backend), _torch_backend._dropout), lab


def _grads_out(grads: dict, hidden: Tensor) -> tuple:
    dh = grads.get("dh")
    dh = dh.reshape(hidden.shape) if dh is not None else None
    return tuple(g if g is not None else hidden.new_empty(0) for g in (dh, grads.get("dw"), grads.get("dbias"),
                                                                      grads.get("da"), grads.get("db")))


@torch.library.custom_op("lowcost::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor],
            lora_b: Optional[Tensor], lora_scale: float, lora_dropout: float, seed: Tensor, ignore_index: int,
            label_smoothing: float, softcap: float, reduction: str, chunk: int, needs: Sequence[bool],
            backend: str, loss_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = CrossEntropySpec(ignore_index, label_smoothing, softcap)
    lab = labels.reshape(-1).long()
    row_weight = _row_weights(hidden.new_ones(()), lab, spec, reduction, hidden) if any(needs) else None
    (loss_rows, grads), lab = _run(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed,
                                   spec, chunk, backend, row_weight, needs)
    loss = reduce_rows(loss_rows, lab, spec, reduction).to(loss_dtype)
    return (loss.reshape(labels.shape) if reduction == "none" else loss,) + _grads_out(grads, hidden)


def _fake_grads(hidden, weight, bias, lora_a, lora_b, needs):
    shapes = (hidden.shape, weight.shape, (weight.shape[0],),
              None if lora_a is None else lora_a.shape, None if lora_b is None else lora_b.shape)
    dtypes = (hidden.dtype, weight.dtype, weight.dtype, None if lora_a is None else lora_a.dtype,
              None if lora_b is None else lora_b.dtype)
    return tuple(hidden.new_empty(shape, dtype=dtype) if need and shape is not None else hidden.new_empty(0)
                 for need, shape, dtype in zip(needs, shapes, dtypes))


@_lce_op.register_fake
def _(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, ignore_index, label_smoothing,
      softcap, reduction, chunk, needs, backend, loss_dtype):
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=loss_dtype)
    return (loss,) + _fake_grads(hidden, weight, bias, lora_a, lora_b, needs)


@torch.library.custom_op("lowcost::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                     lora_a: Optional[Tensor], lora_b: Optional[Tensor], lora_scale: float, lora_dropout: float,
                     seed: Tensor, ignore_index: int, label_smoothing: float, softcap: float, reduction: str,
                     chunk: int, needs: Sequence[bool], backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = CrossEntropySpec(ignore_index, label_smoothing, softcap)
    row_weight = _row_weights(grad_loss, labels.reshape(-1).long(), spec, reduction, hidden)
    (_, grads), _ = _run(hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, spec, chunk,
                         backend, row_weight, needs)
    return _grads_out(grads, hidden)


@_lce_backward_op.register_fake
def _(grad_loss, hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, ignore_index,
      label_smoothing, softcap, reduction, chunk, needs, backend):
    return _fake_grads(hidden, weight, bias, lora_a, lora_b, needs)


_SETTINGS = ("lora_scale", "lora_dropout", "ignore_index", "label_smoothing", "softcap", "reduction", "chunk",
             "backend")


def _setup_context(ctx, inputs, output) -> None:
    (hidden, weight, labels, bias, lora_a, lora_b, lora_scale, lora_dropout, seed, ignore_index, label_smoothing,
     softcap, reduction, chunk, needs, backend, _) = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.in_forward, ctx.computed = any(needs), tuple(needs)
    ctx.settings = (lora_scale, lora_dropout, ignore_index, label_smoothing, softcap, reduction, chunk, backend)
    if ctx.in_forward:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, labels, bias, lora_a, lora_b, seed)


def _backward(ctx, grad_loss, *_):
    order = (0, 1, 3, 4, 5)  # hidden, weight, bias, lora_a, lora_b
    wanted = [ctx.needs_input_grad[i] for i in order]
    if ctx.in_forward:
        grads = [g.mul(grad_loss.to(g.dtype)) if want and computed else None
                 for want, computed, g in zip(wanted, ctx.computed, ctx.saved_tensors)]
    else:
        hidden, weight, labels, bias, lora_a, lora_b, seed = ctx.saved_tensors
        scale, dropout, ignore, smoothing, softcap, reduction, chunk, backend = ctx.settings
        wanted[2] = wanted[2] and bias is not None
        out = _lce_backward_op(grad_loss, hidden, weight, labels, bias, lora_a, lora_b, scale, dropout, seed, ignore,
                               smoothing, softcap, reduction, chunk, wanted, backend)
        grads = [g if want else None for want, g in zip(wanted, out)]
    dh, dw, dbias, da, db = grads
    return (dh, dw, None, dbias, da, db) + (None,) * 11


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk: Optional[int] = None, *, softcap: Optional[float] = None,
                         lora_a: Optional[Tensor] = None, lora_b: Optional[Tensor] = None, lora_scale: float = 1.0,
                         lora_dropout: float = 0.0, seed=None, backend: Optional[str] = None,
                         loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ...)`` without ever forming the logits.

    Args:
        hidden: (..., K) float32 / float16 / bfloat16 (float64 on backend "torch").
        weight: (V, K), hidden's dtype; frozen or trainable (a tied embedding works: same tensor). A frozen
            ``QuantizedWeight`` (NF4, int8, GGUF blocks) runs ``lowcost.ops.qlinear_cross_entropy``: the same
            composition with W dequantized inside the head's two GEMMs (no dW).
        labels: (...) int64 class indices in [0, V) or ``ignore_index``; hidden's leading shape.
        bias: (V,) or None. ignore_index, reduction ("mean" | "sum" | "none"), label_smoothing: as in
            ``F.cross_entropy`` ("mean" over the labels not ignored; NaN when all are ignored).
        chunk: rows per logits buffer (default: about 2**23 logits per buffer; on the Triton and CUDA backends
            at least 2 rows per SM, so the row kernel fills the GPU: 264 rows on a 132-SM H100/H200).
        softcap: c for Gemma's final-logit soft-capping z ← c·tanh(z/c), or None.
        lora_a (r, K), lora_b (V, r), lora_scale, lora_dropout, seed: a LoRA adapter on the head, exactly
            as ``lowcost.ops.lora_linear`` computes it (same Philox mask for the same seed).
        backend: "torch", "triton", "cuda" or None (``LOWCOST_BACKEND``, else the best available). "cuda": the
            row pass is lowcost._C's ``softmax_xent_rows`` kernel, the GEMMs torch's (CUDA tensors only).
        loss_dtype: the returned loss's dtype (default hidden's; transformers' losses are float32). The loss
            is accumulated in float32 (float64 for float64 inputs) and rounded once.
    Returns:
        the loss: 0-D for "mean"/"sum", labels' shape for "none".
    """
    if isinstance(weight, QuantizedWeight):
        from lowcost.ops.qlinear_cross_entropy import qlinear_cross_entropy  # imports this module: bound here
        return qlinear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, chunk,
                                     softcap=softcap, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale,
                                     lora_dropout=lora_dropout, seed=seed, backend=backend, loss_dtype=loss_dtype)
    loss_dtype = loss_dtype or autocast_loss_dtype(hidden)
    (hidden, weight, bias), (lora_a, lora_b) = autocast_operands((hidden, weight, bias), (lora_a, lora_b))
    _check_operands(hidden, weight, labels, bias, lora_a, lora_b)
    _check_settings(ignore_index, reduction, label_smoothing, softcap, chunk, lora_scale, lora_dropout)
    if loss_dtype is not None and (not isinstance(loss_dtype, torch.dtype) or not loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be a floating torch.dtype or None, got {loss_dtype!r}")
    name = _resolve(backend, hidden.device)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"hidden of dtype float64 runs only on backend='torch' (got backend={name!r})")
    needs = NO_GRADS
    if torch.is_grad_enabled() and reduction != "none" and not weight.requires_grad:
        needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias, lora_a, lora_b))
    return _lce_op(hidden, weight, labels, bias, lora_a, lora_b, float(lora_scale), float(lora_dropout),
                   _seed_tensor(seed, lora_dropout if lora_a is not None else 0.0), ignore_index,
                   float(label_smoothing), float(softcap or 0.0), reduction, int(chunk or 0), needs, name,
                   loss_dtype or hidden.dtype)[0]
