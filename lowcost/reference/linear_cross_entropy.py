"""Pure-torch linear cross-entropy, chunk by chunk: the ground truth for the Triton row kernel and the CPU path.

    z    = h Wᵀ + bias + s·u Bᵀ          (M, V) logits, u = (D⊙h) Aᵀ when the head carries a LoRA adapter
    z    ← c·tanh(z / c)                  Gemma's final-logit soft-capping, when c is given
    loss = lse(z) − (1−ε)·z_y − (ε/V)·Σ_j z_j       per row, 0 where y == ignore_index

which is exactly ``F.cross_entropy(z, y, ignore_index, label_smoothing=ε)`` per row. The (M, V) logits are
never formed: rows are taken ``chunk`` at a time, and each chunk's logits buffer is overwritten in place by
its gradient before the next chunk starts.

The head's two GEMMs (z = h Wᵀ + bias and dh = dz W) are a small strategy: ``DenseHead`` (W a tensor, the
default) or another head with the same members, e.g. ``lowcost.ops.qlinear_cross_entropy.QuantizedHead``
(W dequantized inside its GEMMs; frozen, so no dW).

Gradient of the loss rows weighted by w (w_m = ∂L/∂loss_m, e.g. 1/n_valid for "mean"):
    dz     = w ⊙ (softmax(z) − (1−ε)·onehot(y) − ε/V)            rows with y == ignore_index: 0
    dz_raw = dz ⊙ (1 − (z/c)²)                                    through the soft-cap (z = c·tanh(z_raw/c))
    dh     = dz_raw W + D ⊙ (du A),  du = s·dz_raw B              (M, K), (M, r)
    dW     = dz_rawᵀ h,  dbias = Σ_m dz_raw,  dB = s·dz_rawᵀ u,  dA = duᵀ (D⊙h)

Precision: each chunk's logits come out of the matmul in h's dtype (fp32 accumulation, one rounding, as
``h @ W.T`` gives them); soft-cap, softmax and the loss run in float32 (float64 for float64 inputs); dz is
rounded to h's dtype before the gradient matmuls (as autograd rounds the logits' gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowcost.reference.lora_linear import accumulation_dtype
from lowcost.reference.philox import DropoutFn, apply_dropout

Tensor = torch.Tensor
NEEDS_ALL = (True, True, True, True, True)  # (dh, dW, dbias, dA, dB)


@dataclass(frozen=True)
class CrossEntropySpec:
    """ignore_index, label smoothing ε in [0, 1], soft-cap c (0: none)."""
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0


@dataclass(frozen=True)
class HeadLoRA:
    """A LoRA adapter on the head: lora_a A (r, K), lora_b B (V, r), scale s, dropout p with its seed."""
    lora_a: Tensor
    lora_b: Tensor
    scale: float
    dropout: float = 0.0
    seed: int = 0


RowsFn = Callable[[Tensor, Tensor, Optional[Tensor], CrossEntropySpec], Tensor]


class DenseHead:
    """The head's two GEMMs on a dense W (V, K): the strategy ``linear_cross_entropy_rows`` calls per chunk.

    Another head (e.g. a quantized W, dequantized inside its GEMMs) provides the same members: ``shape`` (V, K),
    ``dtype`` (of dW and dbias), ``trainable`` (whether dW can be formed: ``dense`` is W itself then) and
    ``logits`` / ``dgrad``."""
    trainable = True

    def __init__(self, weight: Tensor):
        self.dense = weight
        self.shape, self.dtype = weight.shape, weight.dtype

    def logits(self, h: Tensor, bias: Optional[Tensor]) -> Tensor:
        """z = h Wᵀ + bias (C, V) in h's dtype (one rounding of the fp32 accumulation)."""
        return torch.addmm(bias, h, self.dense.t()) if bias is not None else h @ self.dense.t()

    def dgrad(self, dz: Tensor, out: Tensor) -> None:
        """out (C, K) ← dz W, dz (C, V) in h's dtype."""
        torch.mm(dz, self.dense, out=out)


def as_head(weight) -> "DenseHead":
    """A tensor W as a ``DenseHead``; a head strategy as itself."""
    return DenseHead(weight) if isinstance(weight, Tensor) else weight


def softmax_xent_rows(z: Tensor, labels: Tensor, row_weight: Optional[Tensor], spec: CrossEntropySpec) -> Tensor:
    """Loss of each row of the logits chunk z (C, V); when ``row_weight`` (C,) is given, z is overwritten in
    place with dz_raw (the gradient of Σ_m w_m·loss_m with respect to the un-capped logits).

    z is the caller's scratch buffer: it is worked on in place (one more (C, V) buffer only for a dtype
    upcast or the soft-cap, whose tanh the gradient needs)."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z if z.dtype == acc else z.to(acc)
    tanh = None
    if spec.softcap:
        tanh = zf.div_(spec.softcap).tanh_()
        zf = tanh * spec.softcap
    V, eps = z.shape[1], spec.label_smoothing
    lse = torch.logsumexp(zf, dim=1)
    valid = labels != spec.ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    z_y = zf.gather(1, target[:, None]).squeeze(1)
    loss = lse - (1.0 - eps) * z_y
    if eps:
        loss -= (eps / V) * zf.sum(dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if row_weight is not None:
        grad = zf.sub_(lse[:, None]).exp_()
        if eps:
            grad -= eps / V
        grad.scatter_add_(1, target[:, None], torch.full_like(z_y[:, None], eps - 1.0))
        grad *= torch.where(valid, row_weight.to(acc), torch.zeros_like(loss))[:, None]
        if tanh is not None:
            grad *= tanh.mul_(tanh).neg_().add_(1.0)
        if grad is not z:
            z.copy_(grad)
    return loss


def _chunk_logits(h: Tensor, head: DenseHead, bias: Optional[Tensor], lora: Optional[HeadLoRA],
                  u: Optional[Tensor]) -> Tensor:
    """z (C, V) in h's dtype, as ``h @ W.T + bias`` (plus LoRA's term, as lowcost's LoRA linear adds it)."""
    if lora is None:
        return head.logits(h, bias)
    acc = u.dtype
    z = head.logits(h, None).to(acc).addmm_(u, lora.lora_b.to(acc).t(), alpha=lora.scale)
    if bias is not None:
        z += bias.to(acc)
    return z.to(h.dtype)


def _lora_input(hidden: Tensor, lora: HeadLoRA, dropout_fn: DropoutFn) -> Tensor:
    """D ⊙ h (M, K): the mask indexed over the whole (M, K) input, as the unfused LoRA head draws it."""
    return dropout_fn(hidden, lora.seed, lora.dropout) if lora.dropout > 0 else hidden


def linear_cross_entropy_rows(hidden: Tensor, weight, labels: Tensor, bias: Optional[Tensor],
                              lora: Optional[HeadLoRA], spec: CrossEntropySpec, chunk: int,
                              row_weight: Optional[Tensor] = None, needs: tuple = NEEDS_ALL,
                              rows_fn: RowsFn = softmax_xent_rows,
                              dropout_fn: DropoutFn = apply_dropout) -> tuple[Tensor, dict]:
    """Loss rows (M,) in the accumulation dtype and, when ``row_weight`` (M,) is given, the gradients of
    Σ_m w_m·loss_m: {"dh", "dw", "dbias", "da", "db"}, each present where ``needs`` asks for it.

    hidden (M, K), weight (V, K) (a tensor, or a head strategy such as ``DenseHead`` whose GEMMs form the
    logits and dh; a head that is not ``trainable`` has no dW), labels (M,) int64, bias (V,) or None;
    ``chunk`` rows per logits buffer.
    """
    weight = as_head(weight)
    if row_weight is not None and needs[1] and not weight.trainable:
        raise ValueError("needs asks for dW of a head whose weight is frozen (quantized): it has no gradient")
    M, acc = hidden.shape[0], accumulation_dtype(hidden)
    x_tilde = _lora_input(hidden, lora, dropout_fn) if lora is not None else None
    u = x_tilde.to(acc) @ lora.lora_a.to(acc).t() if lora is not None else None
    grads = _grad_buffers(hidden, weight, lora, needs if row_weight is not None else (False,) * 5)
    loss = torch.empty(M, dtype=acc, device=hidden.device)
    for start in range(0, M, chunk):
        rows = slice(start, min(M, start + chunk))
        h = hidden[rows]
        z = _chunk_logits(h, weight, bias, lora, None if u is None else u[rows])
        loss[rows] = rows_fn(z, labels[rows], None if row_weight is None else row_weight[rows], spec)
        if row_weight is not None:
            _accumulate_chunk(grads, z, h, weight, lora, None if u is None else u[rows], rows)
    if row_weight is not None:
        _finish_grads(grads, hidden, weight, lora, x_tilde, dropout_fn)
    return loss, grads


def _grad_buffers(hidden: Tensor, weight: DenseHead, lora: Optional[HeadLoRA], needs) -> dict:
    """Zeroed accumulators (float32, or float64 for float64 inputs) for every gradient asked for."""
    need_dh, need_dw, need_dbias, need_da, need_db = needs
    acc, dev = accumulation_dtype(hidden), hidden.device
    out = {"dh": torch.empty_like(hidden) if need_dh else None,
           "dw": torch.zeros(weight.shape, dtype=acc, device=dev) if need_dw else None,
           "dbias": torch.zeros(weight.shape[0], dtype=acc, device=dev) if need_dbias else None}
    has_lora = lora is not None
    out["du"] = torch.empty(hidden.shape[0], lora.lora_a.shape[0], dtype=acc, device=dev) \
        if has_lora and (need_dh or need_da) else None
    out["db"] = torch.zeros(lora.lora_b.shape, dtype=acc, device=dev) if has_lora and need_db else None
    out["need_da"] = has_lora and need_da
    return out


def _accumulate_chunk(grads: dict, dz: Tensor, h: Tensor, weight: DenseHead, lora: Optional[HeadLoRA],
                      u: Optional[Tensor], rows: slice) -> None:
    """One chunk's share of every gradient, from dz (C, V) in h's dtype."""
    acc = grads["dw"].dtype if grads["dw"] is not None else accumulation_dtype(h)
    if grads["dh"] is not None:
        weight.dgrad(dz, grads["dh"][rows])
    if grads["dw"] is not None:
        grads["dw"] += (dz.t() @ h).to(acc)
    if grads["dbias"] is not None:
        grads["dbias"] += dz.sum(0, dtype=acc)
    if lora is not None and (grads["du"] is not None or grads["db"] is not None):
        dz_acc = dz.to(u.dtype)
        if grads["du"] is not None:
            torch.mm(dz_acc, lora.lora_b.to(u.dtype), out=grads["du"][rows]).mul_(lora.scale)
        if grads["db"] is not None:
            grads["db"].addmm_(dz_acc.t(), u, alpha=lora.scale)


def _finish_grads(grads: dict, hidden: Tensor, weight: DenseHead, lora: Optional[HeadLoRA], x_tilde: Optional[Tensor],
                  dropout_fn: DropoutFn) -> None:
    """LoRA's input-side terms over all rows (dA = duᵀ(D⊙h), dh += D⊙(du A)) and the final dtypes."""
    du = grads.pop("du")
    need_da = grads.pop("need_da")
    grads["da"] = None
    if lora is not None:
        acc = du.dtype if du is not None else accumulation_dtype(hidden)
        grads["da"] = (du.t() @ x_tilde.to(acc)).to(lora.lora_a.dtype) if need_da else None
        if grads["dh"] is not None:
            back = du @ lora.lora_a.to(acc)
            if lora.dropout > 0:
                back = dropout_fn(back, lora.seed, lora.dropout)
            grads["dh"] = (grads["dh"].to(acc) + back).to(hidden.dtype)
        if grads["db"] is not None:
            grads["db"] = grads["db"].to(lora.lora_b.dtype)
    if grads["dw"] is not None:
        grads["dw"] = grads["dw"].to(weight.dtype)
    if grads["dbias"] is not None:
        grads["dbias"] = grads["dbias"].to(weight.dtype)


def valid_count(labels: Tensor, spec: CrossEntropySpec) -> Tensor:
    """Number of rows whose label is not ignore_index (the "mean" denominator), as a 0-D int64 tensor."""
    return (labels != spec.ignore_index).sum()


def reduce_rows(loss_rows: Tensor, labels: Tensor, spec: CrossEntropySpec, reduction: str) -> Tensor:
    """"none": the rows; "sum": their sum; "mean": sum / n_valid (NaN when every label is ignored)."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / valid_count(labels, spec)
