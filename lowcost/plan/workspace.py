"""Memory a kernel allocates and frees inside itself, which no dispatch mode sees (an estimate per op).

Modelled: ``lowcost::lora_linear``, ``lowcost::lora_gated_mlp``, ``lowcost::lora_grouped_linear``, ``lowcost::rms_norm`` and
``lowcost::linear_cross_entropy``, with their backward ops. For the LoRA linear, the ``torch`` backend (the CPU path,
``lowcost/reference/lora_linear.py``) makes full-size temporaries. With x: (M, K), W: (N, K), rank r, p the
dropout probability, s the bytes of x's dtype and ``[p>0]`` 1 when dropout is on:

forward, x float32:   x̃ = D⊙x (M×K·s, only when p>0); y and u are outputs the meter already counts.
forward, x 16-bit:    x̃ (M·K·s·[p>0]) and its fp32 copy (M·K·4) while u is formed, then x·Wᵀ in fp32 and
                      the fp32 sum (2·M·N·4) before the rounding to s: max of the two phases.
backward, x float32:  du·A (for dx), then x̃ (for dA) made and du·A masked in place under one mask (with dx
                      alone, D⊙(du·A) is a copy); x̃ is freed once dA exists, before the output dx:
                      p>0: ([dA] + [dx] + [dx and not dA])·M·K·4;  p=0: [dx]·M·K·4 (du·A next to the output).
backward, x 16-bit:   g in fp32 (M·N·4) plus, when dx is wanted, D⊙(du·A), the fp32 g·W and their fp32 sum
                      (3·M·K·4; x̃ and its fp32 copy come and go before them); x̃ and its copy alone otherwise.

Fused gated MLP (x: (M, H), intermediate I, s the bytes of x's dtype; ``lowcost/reference/lora_gated_mlp.py``):
forward:  act(gate) and h = act(gate)⊙up while the down projection runs, plus D⊙h when p_down > 0:
          (2 + [p>0])·M·I·s (gate and up are outputs, already counted).
backward: act(gate), h, dh, dh⊙up, and the activation's gradient temporaries are alive together before
          dgate and dup exist: about 5·M·I·s.

Grouped projections (``lowcost::lora_grouped_linear``, x: (M, K), P projections of N_i outputs; torch backend,
``lowcost/reference/lora_grouped_linear.py``): forward runs the LoRA linears' forwards one after the other, so
its workspace is the largest of theirs. Backward (on = [any p_i > 0]): x float32: the one reused scratch for
D⊙(du·A) and x̃ for dA, on·([dx] + [dA])·M·K·4 (dx itself is the output); x 16-bit: g_i in fp32
(M·max N_i·4) and, for dx, the fp32 accumulator, one g_i·W_i in x's dtype and the scratch
(M·K·(4 + s + 4·on)); for dA, x's fp32 copy and x̃ (M·K·(4 + s·on)). On the cuda backend
(``lowcost/ops/_cuda_grouped_linear.py``) dx's only transient is at most one projection's low-rank term at a time,
in x's dtype ([dx]·[P > 1]·M·K·s; none on its stacked path without dropout), which the torch estimate does not
cover for float32 x without dropout: the model takes the larger of the two there (an upper bound).

RMSNorm (``lowcost::rms_norm``, x: (M, H), computed in float32; ``lowcost/reference/rms_norm.py``): the fp32
copy of a 16-bit x, x² (or x·rstd) and, for 16-bit x, the product before its rounding: 4·M·H bytes for fp32 x,
12·M·H for 16-bit. Backward: x̂, ĝ and two elementwise temporaries alive before dx (plus g's fp32 copy for 16-bit
x): 16·M·H for fp32 x, 20·M·H for 16-bit. The consumers' rebuild of the normed tensor in backward runs as
aten ops outside any custom op, so the meter sees it; on the Triton backend an RMSNorm's output is rebuilt inside
the dA kernels instead (nothing allocated), and the backward op then receives the norm's input as x: the torch
formulas above are applied to that x's dtype (fp32 under autocast), still an upper bound for the Triton kernels.

Fused linear cross-entropy (hidden (M, K), vocabulary V, C = the rows of one chunk, ``default_chunk``): the
chunk's logits buffer in hidden's dtype, its fp32 copy for 16-bit hidden, and ``torch.logsumexp``'s
temporary of the same size: C·V·s + C·V·4·[s < 4] + C·V·4, in the forward and again in a backward that
recomputes the chunks.

The LoRA linear on a quantized weight, the frozen quantized layer, the fused gated MLP and the grouped projections
on quantized weights (``lowcost::qlora_linear``, ``lowcost::quantized_linear``, ``lowcost::qlora_gated_mlp``,
``lowcost::qlora_grouped_linear`` and their backward ops) are modelled in ``decode_workspace.py``.

Aten kernels are assumed to need no workspace beyond their outputs (on CPU the flash-attention and
GEMM kernels use per-thread tiles; cuBLAS workspaces are a few MiB). The Triton and CUDA backends fuse
the mask and keep less than this; the estimate is for the torch backend and is an upper bound for them.
One exception: the fused loss on Triton takes chunks of at least 2 rows per SM (264 on 132 SMs) so that its
row kernel fills the GPU; at vocabulary 128256 that chunk is 264 rows instead of the torch backend's 65,
about 250 MB more in bf16. That term depends on the GPU, so the trace keeps the torch chunk and the plan adds
``triton_loss_extra`` per GPU when it checks the fit (``Estimate.peak_on``).
"""
from __future__ import annotations

import math

import torch

from lowcost.ops._cuda_grouped_linear import transient_low_rank_terms
from lowcost.plan.decode_workspace import WORKSPACE_MODELS


def _lora_forward(args) -> int:
    x, weight, _, _, _, _, dropout = args[:7]
    M, K, N, s = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0], x.element_size()
    tilde = M * K * s if dropout > 0 else 0
    if x.dtype in (torch.float32, torch.float64):
        return tilde
    return max(tilde + M * K * 4, 2 * M * N * 4)


def _lora_backward(args) -> int:
    _, x, weight, _, _, _, _, dropout, _, _, needs = args[:11]
    M, K, N, s = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0], x.element_size()
    need_dx, need_da = int(bool(needs[0])), int(bool(needs[1]))
    on = 1 if dropout > 0 else 0
    if x.dtype in (torch.float32, torch.float64):
        return (need_da + need_dx + need_dx * (1 - need_da)) * M * K * s if on else need_dx * M * K * s
    if need_dx:
        return M * N * 4 + 3 * M * K * 4
    return need_da * (M * K * 4 + on * M * K * s)


def _gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, factor: int) -> int:
    M, inter = math.prod(x.shape[:-1]), w_gate.shape[0]
    return factor * M * inter * x.element_size()


def _gated_forward(args) -> int:
    x, w_gate, dropouts = args[0], args[1], args[11]
    return _gated_mlp(x, w_gate, 2 + int(dropouts[2] > 0))


def _gated_backward(args) -> int:
    return _gated_mlp(args[1], args[2], 5)


def _grouped_forward(args) -> int:
    x, weights, dropouts = args[0], args[1], args[7]
    return max(_lora_forward((x, w, None, None, None, None, p)) for w, p in zip(weights, dropouts))


def _grouped_backward(args) -> int:
    grads, x, lora_as, dropouts, needs, backend = args[0], args[1], args[3], args[8], args[10], args[11]
    M, K, s = math.prod(x.shape[:-1]), x.shape[-1], x.element_size()
    need_dx, need_da, on = int(bool(needs[0])), int(bool(needs[1])), int(any(p > 0 for p in dropouts))
    if x.dtype in (torch.float32, torch.float64):
        torch_bytes = on * (need_dx + need_da) * M * K * s
    else:
        widest = max((g.shape[-1] for g in grads), default=0)
        torch_bytes = M * widest * 4 + need_dx * M * K * (4 + s + 4 * on) + need_da * M * K * (4 + s * on)
    # cuda: the (M, K) terms held besides dx (lowcost.ops._cuda_grouped_linear: one t_i on the per-projection path
    # with dropout, none on the stacked and the grouped dropout paths)
    cuda_bytes = transient_low_rank_terms(lora_as, dropouts, bool(needs[0])) * M * K * s if backend == "cuda" else 0
    return max(torch_bytes, cuda_bytes)


def _rms_norm(x: torch.Tensor, fp32_factor: int, low_precision_factor: int) -> int:
    factor = fp32_factor if x.element_size() >= 4 else low_precision_factor
    return factor * math.prod(x.shape)


TRITON_LOSS_ROWS_PER_SM = 2    # kernels/lora_linear_plan.PROGRAMS_PER_SM (not imported: no Triton in the plan)


def _loss_row_bytes(vocab: int, itemsize: int) -> int:
    """Workspace per chunk row: logits in hidden's dtype, their fp32 copy when 16-bit, logsumexp's temporary."""
    return vocab * (itemsize + 4 + (4 if itemsize < 4 else 0))


def _cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> int:
    from lowcost.ops.linear_cross_entropy import default_chunk
    M, V = math.prod(hidden.shape[:-1]), weight.shape[0]
    rows = min(M, chunk or default_chunk(M, V))
    return rows * _loss_row_bytes(V, hidden.element_size())


def triton_loss_extra(tokens: int, vocab: int, itemsize: int, sms: int) -> int:
    """Bytes the Triton fused loss's chunk (at least ``TRITON_LOSS_ROWS_PER_SM`` rows per SM) holds beyond the
    torch-backend chunk the trace models, for ``tokens`` rows of hidden with ``itemsize`` bytes per element."""
    from lowcost.ops.linear_cross_entropy import default_chunk
    torch_rows = default_chunk(tokens, vocab)
    triton_rows = default_chunk(tokens, vocab, TRITON_LOSS_ROWS_PER_SM * sms)
    return (triton_rows - torch_rows) * _loss_row_bytes(vocab, itemsize)


_MODELS = {"lowcost::lora_linear": _lora_forward, "lowcost::lora_linear_backward": _lora_backward,
           "lowcost::lora_gated_mlp": _gated_forward, "lowcost::lora_gated_mlp_backward": _gated_backward,
           "lowcost::lora_grouped_linear": _grouped_forward, "lowcost::lora_grouped_linear_backward": _grouped_backward,
           "lowcost::rms_norm": lambda args: _rms_norm(args[0], 4, 12),
           "lowcost::rms_norm_backward": lambda args: _rms_norm(args[1], 16, 20),
           "lowcost::linear_cross_entropy": lambda args: _cross_entropy(args[0], args[1], args[13]),
           "lowcost::linear_cross_entropy_backward": lambda args: _cross_entropy(args[1], args[2], args[14]),
           **WORKSPACE_MODELS}


def kernel_workspace(func, args, kwargs, out) -> int:
    """Bytes ``func`` allocates and frees internally on top of its outputs (0 for ops not modelled)."""
    model = _MODELS.get(func._schema.name) if hasattr(func, "_schema") else None
    return model(args) if model is not None else 0

