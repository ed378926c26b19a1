"""Grouped LoRA projections (q/k/v, gate/up) sharing one input on quantized frozen weights, as registered ops.

    y_i = x deq(W_i)ᵀ + b_i + s_i · (D_i ⊙ x) A_iᵀ B_iᵀ          i = 0 … P-1,  each W_i a ``QuantizedWeight``

the math, the masks and every gradient of ``lowcost.ops.lora_grouped_linear`` (``lowcost.reference.
lora_grouped_linear``), with the base GEMMs x W_iᵀ and g_i W_i on W_i decoded a block of rows at a time (torch)
or a tile at a time inside the GEMM (cuda), so no dense W exists. Saved for backward: x once (a lowcost norm's
output as the norm's input and statistics, ``lowcost.ops.normed_input``: on the Triton backend an RMSNorm's
output is rebuilt inside the loads of the passes that read it, so no (M, K) normed tensor exists in backward;
elsewhere it is rebuilt in torch), the u_i and the seeds, plus references to the stored codes and scales (never
a dequantized W, never a copy of x per projection).
Backward: dB_i = s_i g_iᵀu_i, du_i = s_i g_i B_i, dA_i = du_iᵀ(D_i⊙x), db_i = Σ_m g_i and ONE accumulator
dx = Σ_i g_i deq(W_i) + Σ_i D_i⊙(du_i A_i).

``lowcost.ops.lora_grouped_linear`` routes here when its weights are quantized (all P; a mix of dense and
quantized weights is refused there). Backends:
- ``torch`` (any device, every format): the grouped reference with each projection's row source
  (``_quant_backends._rows``: one block of rows decoded into one reused workspace);
- ``cuda`` (CUDA tensors on sm_80+ with lowcost._C built for CUDA; the formats of ``CUDA_FORMATS``): the dense
  grouped composition (``_cuda_grouped_linear``, one dx accumulator) with each projection's base step the CUDA
  dequantizing GEMM (``_cuda_backend.quant_base``: ``dequant_gemm`` forward, ``dequant_gemm_dgrad`` backward);
- ``triton`` (CUDA tensors, or CPU under TRITON_INTERPRET=1; the formats of ``QUANT_SUPPORT["triton"]``; at
  most ``TRITON_MAX_PROJECTIONS`` projections): ``kernels/qlora_grouped_linear.py``, the dense grouped u pass
  (one read of x) and dA pass around the dequantizing GEMMs, dx = Σ_i g_i deq(W_i) accumulated by the
  dequantizing dgrad kernel launch after launch (dx in x's dtype between them: one rounding per add in 16 bits,
  as for cuda). M = 0 or K = 0 runs the torch path (no tile to launch).
``backend=None``: ``LOWCOST_BACKEND``, else for CUDA tensors the first of triton (P ≤ ``TRITON_MAX_PROJECTIONS``)
and cuda that can run and takes every format, else torch.

Two custom ops: ``lowcost::qlora_grouped_linear`` → ([y_i], [u_i]) and ``lowcost::qlora_grouped_linear_backward``
→ (dx, [dA_i], [dB_i], [db_i]). The P weights' stored tensors travel as one flat ``Tensor[]`` with their counts,
their formats as one comma-separated string (the schema has no ``str[]``), so FakeTensor and the dispatcher
see plain tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lowcost.ops import _cuda_backend, _torch_backend
from lowcost.ops._quant_backends import QUANT_SUPPORT, _rows, _with_code_books, check_quant_backend
from lowcost.ops.autocast import autocast_operands
from lowcost.ops.backend import requested_backend, unavailable_reason
from lowcost.ops.lora_grouped_linear import (TRITON_MAX_PROJECTIONS, _check_counts, _seeds_tensor, _spread,
                                             backward_outputs, fake_backward, fake_forward)
from lowcost.ops.lora_linear import _check_scalars
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input
from lowcost.ops.qlora_linear import _check_adapters, _check_quantized
from lowcost.reference.lora_grouped_linear import GroupedProjection, grouped_backward, grouped_forward
from lowcost.reference.quant import QuantizedWeight

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------- validation
def _check_group(x: Tensor, weights, lora_as, lora_bs, biases, scales, dropouts) -> None:
    _check_counts(weights, lora_as, lora_bs, biases, scales, dropouts)
    for i, (w, a, b, bias) in enumerate(zip(weights, lora_as, lora_bs, biases)):
        try:
            N, K = _check_quantized(x, w, bias)
            _check_adapters(x, N, K, a, b)
            _check_scalars(scales[i], dropouts[i])
        except (TypeError, ValueError) as error:
            raise type(error)(f"projection {i}: {error}") from None


def _runs_all(name: str, x: Tensor, schemes: Sequence[str], rank: int) -> bool:
    """Whether kernel backend ``name`` can run this group on x's device: every format, x not float64 and, for
    triton, at most TRITON_MAX_PROJECTIONS projections."""
    return (x.device.type == "cuda" and x.dtype != torch.float64 and all(s in QUANT_SUPPORT[name] for s in schemes)
            and (name != "triton" or len(schemes) <= TRITON_MAX_PROJECTIONS)
            and unavailable_reason(name, x.device, rank) is None)


def _resolve(backend: Optional[str], x: Tensor, schemes: Sequence[str], rank: int) -> str:
    """"torch", "triton" or "cuda" for P weights of formats ``schemes``; a clear error naming the choice's source
    (argument or LOWCOST_BACKEND) and the projection when it cannot run them. None: triton, then cuda, then torch
    (as ``qlora_linear``)."""
    source, name = requested_backend(backend)
    if name is None:
        return next((c for c in ("triton", "cuda") if _runs_all(c, x, schemes, rank)), "torch")
    if name == "triton" and len(schemes) > TRITON_MAX_PROJECTIONS:
        raise ValueError(f"{source}='triton' groups at most {TRITON_MAX_PROJECTIONS} projections, got {len(schemes)}")
    for i, scheme in enumerate(schemes):
        check_quant_backend(source, name, x.device, rank, scheme, f"projection {i}")
    if name != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    return name


# ----------------------------------------------------------------------------------------------- custom ops
def _split(packed: Sequence[Tensor], counts: Sequence[int]) -> list[list[Tensor]]:
    """The flat stored tensors back into one list per projection."""
    out, start = [], 0
    for count in counts:
        out.append(list(packed[start:start + count]))
        start += count
    return out


def _run_args(backend, x2, packed, counts, schemes, block_sizes, lora_as, lora_bs, biases, scales, dropouts, seeds):
    """(projections, bases): GroupedProjection per projection (torch: with its row source) and, for cuda, each
    projection's dequantizing GEMM steps, for triton each projection's ``StoredWeight`` (None for torch)."""
    stored, K = _split(packed, counts), x2.shape[1]
    projections = [GroupedProjection(None, a, b, bias, float(s), float(p), int(seed),
                                     dequant=_rows(scheme, st, K, bs, x2.dtype) if backend == "torch" else None)
                   for st, scheme, bs, a, b, bias, s, p, seed in zip(stored, schemes, block_sizes, lora_as, lora_bs,
                                                                     biases, scales, dropouts, seeds)]
    if backend == "torch":
        return projections, None
    if backend == "triton":
        from lowcost.kernels.qlora_grouped_linear import StoredWeight  # triton: imported on first use
        return projections, [StoredWeight(_with_code_books(st, scheme), scheme, bs)
                             for st, scheme, bs in zip(stored, schemes, block_sizes)]
    bases = [_cuda_backend.quant_base(_with_code_books(st, scheme), scheme, b.shape[0], K, bs)
             for st, scheme, bs, b in zip(stored, schemes, block_sizes, lora_bs)]
    return projections, bases


def _tiles_or_torch(backend: str, x2: Tensor) -> str:
    """Triton with M = 0 or K = 0 runs the torch path: no tile to launch, and the torch path computes the empty /
    zero results exactly."""
    return "torch" if backend == "triton" and 0 in x2.shape else backend


@torch.library.custom_op("lowcost::qlora_grouped_linear", mutates_args=())
def _qgrouped_op(x: Tensor, packed: Sequence[Tensor], counts: Sequence[int], schemes: str,
                 block_sizes: Sequence[int], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
                 biases: Sequence[Tensor], has_bias: Sequence[bool], scales: Sequence[float],
                 dropouts: Sequence[float], seeds: Tensor, backend: str) -> tuple[list[Tensor], list[Tensor]]:
    x2 = x.reshape(-1, x.shape[-1])
    backend = _tiles_or_torch(backend, x2)
    projections, bases = _run_args(backend, x2, packed, counts, schemes.split(","), block_sizes, lora_as, lora_bs,
                                   _spread(biases, has_bias), scales, dropouts, seeds)
    if backend == "triton":
        from lowcost.kernels.qlora_grouped_linear import qgrouped_fwd
        ys, us = qgrouped_fwd(x2, projections, bases)
    elif backend == "cuda":
        from lowcost.ops import _cuda_grouped_linear
        ys, us = _cuda_grouped_linear.grouped_fwd(x2, projections, bases)
    else:
        ys, us = grouped_forward(x2, projections, _torch_backend._dropout)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys], list(us)


@_qgrouped_op.register_fake
def _(x, packed, counts, schemes, block_sizes, lora_as, lora_bs, biases, has_bias, scales, dropouts, seeds, backend):
    return fake_forward(x, lora_as, lora_bs)


@torch.library.custom_op("lowcost::qlora_grouped_linear_backward", mutates_args=())
def _qgrouped_backward_op(grads: Sequence[Tensor], x: Tensor, packed: Sequence[Tensor], counts: Sequence[int],
                          schemes: str, block_sizes: Sequence[int], lora_as: Sequence[Tensor],
                          lora_bs: Sequence[Tensor], us: Sequence[Tensor], has_bias: Sequence[bool],
                          scales: Sequence[float], dropouts: Sequence[float], seeds: Tensor, needs: Sequence[bool],
                          backend: str, norm_rstd: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                          norm_form: str = "") -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)) in the grads' dtype: the Triton kernels rebuild it in the loads of the passes
    that read it, the other paths (M = 0 or K = 0 included) rebuild it here in torch."""
    x2 = x.reshape(-1, x.shape[-1])
    backend = _tiles_or_torch(backend, x2)
    x2, norm = kernel_input(x2, norm_rstd, norm_weight, norm_form, grads[0].dtype, backend == "triton")
    biases = [x2 if flag else None for flag in has_bias]   # only "is there a bias" matters here
    projections, bases = _run_args(backend, x2, packed, counts, schemes.split(","), block_sizes, lora_as, lora_bs,
                                   biases, scales, dropouts, seeds)
    g2 = [g.reshape(-1, g.shape[-1]) for g in grads]
    if backend == "triton":
        from lowcost.kernels.qlora_grouped_linear import qgrouped_bwd
        dx, das, dbs, dbiases = qgrouped_bwd(g2, x2, projections, bases, list(us), tuple(needs), **norm)
    elif backend == "cuda":
        from lowcost.ops import _cuda_grouped_linear
        dx, das, dbs, dbiases = _cuda_grouped_linear.grouped_bwd(g2, x2, projections, list(us), tuple(needs), bases)
    else:
        dx, das, dbs, dbiases = grouped_backward(g2, x2, projections, list(us), tuple(needs), _torch_backend._dropout)
    return backward_outputs(x, dx, das, dbs, dbiases, dtype=grads[0].dtype if norm_form else None)


@_qgrouped_backward_op.register_fake
def _(grads, x, packed, counts, schemes, block_sizes, lora_as, lora_bs, us, has_bias, scales, dropouts, seeds, needs,
      backend, norm_rstd=None, norm_weight=None, norm_form=""):
    return fake_backward(x, lora_as, lora_bs, has_bias, needs, grads[0].dtype if norm_form else None)


def _setup_context(ctx, inputs, output) -> None:
    x, packed, counts, schemes, block_sizes, lora_as, lora_bs, biases, has_bias, scales, dropouts, seeds, backend \
        = inputs
    _, us = output
    ctx.mark_non_differentiable(*us)
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.count = len(lora_as)
    ctx.save_for_backward(*stored, *lora_as, *lora_bs, *us, seeds, *packed)
    ctx.settings = (list(counts), schemes, list(block_sizes), list(has_bias), list(scales), list(dropouts),
                    backend)


def _backward(ctx, grad_ys, _grad_us):
    counts, schemes, block_sizes, has_bias, scales, dropouts, backend = ctx.settings
    # a normed x on the Triton backend stays (norm input, rstd, w), rebuilt in the loads of the passes reading it
    x, norm, rest = backward_input(ctx.saved_tensors, ctx.input_rebuild, backend == "triton")
    count = ctx.count
    lora_as, lora_bs, us = (list(rest[i * count:(i + 1) * count]) for i in range(3))
    seeds, packed = rest[3 * count], list(rest[3 * count + 1:])
    dtype = next((g.dtype for g in grad_ys if g is not None), x.dtype)   # the op's input dtype (the y_i's)
    grads = [g if g is not None else x.new_zeros(*x.shape[:-1], b.shape[0], dtype=dtype)
             for g, b in zip(grad_ys, lora_bs)]
    need = [any(n) if isinstance(n, (list, tuple)) else bool(n) for n in ctx.needs_input_grad]  # per list input
    needs = [need[0], need[5], need[6], need[7] and any(has_bias)]
    dx, das, dbs, dbiases = _qgrouped_backward_op(grads, x, packed, counts, schemes, block_sizes, lora_as, lora_bs,
                                                  us, has_bias, scales, dropouts, seeds, needs, backend, *norm)
    nothing = [None] * count                      # list inputs get a list back (autograd checks the structure)
    present = [d if needs[3] else None for d, flag in zip(dbiases, has_bias) if flag]
    return (dx if needs[0] else None, [None] * len(packed), None, None, None, das if needs[1] else nothing,
            dbs if needs[2] else nothing, present, None, None, None, None, None)


_qgrouped_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def qlora_grouped_linear(x: Tensor, weights: Sequence[QuantizedWeight], lora_as: Sequence[Tensor],
                         lora_bs: Sequence[Tensor], scales: Sequence[float],
                         biases: Optional[Sequence[Optional[Tensor]]] = None,
                         dropouts: Optional[Sequence[float]] = None, seeds=None,
                         backend: Optional[str] = None) -> list[Tensor]:
    """``lowcost.ops.lora_grouped_linear`` with P quantized frozen weights W_i (N_i, K), each a
    ``QuantizedWeight`` (decoded to x's dtype; formats may differ between projections). Arguments and result
    as there; backend: 'torch' (every format), 'triton' (the formats of ``QUANT_SUPPORT["triton"]``, at most
    ``TRITON_MAX_PROJECTIONS`` projections), 'cuda' (CUDA tensors, the formats of ``CUDA_FORMATS``) or None (triton,
    then cuda, where it can run and takes every format, else torch). Every backend saves the same tensors for
    backward."""
    weights, lora_as, lora_bs = list(weights), list(lora_as), list(lora_bs)
    count = len(weights)
    biases = [None] * count if biases is None else list(biases)
    dropouts = [0.0] * count if dropouts is None else list(dropouts)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for i, w in enumerate(weights):
        if not isinstance(w, QuantizedWeight):
            raise TypeError(f"projection {i}: weight must be a QuantizedWeight like the others, got "
                            f"{type(w).__name__} (the grouped op takes P dense or P quantized weights)")
    (x, *biases), adapters = autocast_operands((x, *biases), (*lora_as, *lora_bs))
    lora_as, lora_bs = list(adapters[:count]), list(adapters[count:])
    _check_group(x, weights, lora_as, lora_bs, biases, scales, dropouts)
    name = _resolve(backend, x, [w.scheme for w in weights], max(a.shape[0] for a in lora_as))
    seeds = _seeds_tensor(seeds, dropouts)
    has_bias = [b is not None for b in biases]
    ys, _ = _qgrouped_op(x, [t for w in weights for t in w.packed], [len(w.packed) for w in weights],
                         ",".join(w.scheme for w in weights), [w.block_size for w in weights], lora_as, lora_bs,
                         [b for b in biases if b is not None], has_bias, [float(s) for s in scales],
                         [float(p) for p in dropouts], seeds, name)
    return ys
