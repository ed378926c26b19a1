"""The fused LoRA gated MLP on quantized frozen weights (NF4, int8, GGUF blocks), as registered ops.

    y = down(act(gate(x)) ⊙ up(x)),   each projection p(z) = z W_pᵀ + s_p·(D_p⊙z) A_pᵀ B_pᵀ

the math, the saved tensors and every gradient of ``lowcost.ops.lora_gated_mlp`` (``lowcost.reference.
lora_gated_mlp``), with each W_p a ``QuantizedWeight``: x W_pᵀ and g W_p are computed from W decoded a block of
rows at a time (torch backend, ``lowcost.reference.qlora_linear``) or a tile at a time inside the GEMM loops
(Triton), so no dense W exists, and what backward keeps is unchanged: x, gate and up (M, I), the three u's and
the seeds, plus references to the stored codes and scales. The unfused quantized MLP keeps act(gate) and
h = act(gate)⊙up too.

``lowcost.ops.lora_gated_mlp`` routes here when its weights are quantized (all three; a mix of dense and
quantized projections is refused there). Backends:
- ``torch`` (any device, every format): cuBLAS / CPU GEMMs on one dequantized block of rows at a time;
- ``triton`` (CUDA, or the interpreter; every format ``kernels/qlora_dequant.py`` decodes: nf4, nf4-dq, int8,
  q8_0, q4_0, q4_1, q4_k, q6_k): gate and up through the dequantizing LoRA-linear kernels, the down
  projection through the fused MLP kernels with W_d's tile decoded inside the GEMM loop, in the forward
  (h W_dᵀ) and in backward (g W_d) (``lowcost.kernels.qlora_gated_mlp``); no dense W at any time;
- ``cuda`` (CUDA tensors on sm_80+ with lowcost._C built for CUDA; every format of ``CUDA_FORMATS``: nf4,
  nf4-dq, int8, q8_0, q4_0, q4_1, q4_k, q6_k): the dense cuda backend's composition (``_cuda_gated_mlp``: the
  skinny LoRA kernels, ``gated_act_mul`` and its backward) with each projection's GEMM the CUDA dequantizing
  GEMM (``dequant_gemm`` forward, ``dequant_gemm_dgrad`` backward), W's tiles decoded into shared memory; no
  dense W at any time.
``backend=None``: ``LOWCOST_BACKEND``, else, for CUDA tensors, the first of Triton, cuda that can run here and
takes all three formats (as ``lora_gated_mlp`` chooses on dense weights), else torch.

Two custom ops: ``lowcost::qlora_gated_mlp`` → (y, gate, up, u_g, u_u, u_d) and
``lowcost::qlora_gated_mlp_backward`` → (dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d). The stored tensors are
``Tensor[]`` arguments and the formats strings, so FakeTensor and the dispatcher see plain tensors.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops import _torch_backend
from lowcost.ops._quant_backends import QUANT_SUPPORT, _rows, _with_code_books, check_quant_backend
from lowcost.ops.autocast import autocast_projections
from lowcost.ops.backend import requested_backend, unavailable_reason
from lowcost.ops.lora_gated_mlp import ROLES, _check_inputs, _seeds_tensor
from lowcost.ops.lora_linear import _check_tensor
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input
from lowcost.reference.lora_gated_mlp import Projection, gated_mlp_backward, gated_mlp_forward
from lowcost.reference.quant import QuantizedWeight

Tensor = torch.Tensor
_GRAD_INPUTS = (0, 8, 9, 10, 11, 12, 13)  # x, a_gate, b_gate, a_up, b_up, a_down, b_down among the op's inputs


# ----------------------------------------------------------------------------------------------- validation
def _check_projection(role: str, weight: QuantizedWeight, lora_a: Tensor, lora_b: Tensor, n_in: int, n_out: int,
                      x: Tensor) -> None:
    if tuple(weight.shape) != (n_out, n_in):
        raise ValueError(f"{role} weight must have shape {(n_out, n_in)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{role} weight must be on x's device {x.device}, got {weight.device}")
    for part, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        _check_tensor(f"{role} {part}", t, 2)
        if t.device != x.device:
            raise ValueError(f"{role} {part} must be on x's device {x.device}, got {t.device}")
    r = lora_a.shape[0]
    if r < 1 or tuple(lora_a.shape) != (r, n_in) or tuple(lora_b.shape) != (n_out, r):
        raise ValueError(f"{role} lora_a and lora_b must have shapes (r, {n_in}) and ({n_out}, r), got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.dtype not in (x.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"{role} lora_a and lora_b must both be {x.dtype} (x's dtype) or float32, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")


def _resolve(backend: Optional[str], x: Tensor, schemes: Sequence[str], rank: int) -> str:
    """"torch", "triton" or "cuda" for three weights of formats ``schemes`` (gate, up, down); a clear error naming
    the choice's source (argument or LOWCOST_BACKEND) and the projection when it cannot run them. None: the
    first of triton, cuda that can run here and takes all three formats, for CUDA tensors (not float64), else
    torch."""
    source, name = requested_backend(backend)
    if name is None:
        if x.device.type != "cuda" or x.dtype == torch.float64:
            return "torch"
        return next((c for c in ("triton", "cuda") if all(s in QUANT_SUPPORT[c] for s in schemes)
                     and unavailable_reason(c, x.device, rank) is None), "torch")
    for role, scheme in zip(ROLES, schemes):
        check_quant_backend(source, name, x.device, rank, scheme, f"the {role} projection")
    if name != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    return name


# ----------------------------------------------------------------------------------------------- custom ops
def _projections(x: Tensor, packed: tuple, schemes: tuple, block_sizes, adapters: tuple, scales, dropouts,
                 seeds) -> list[Projection]:
    """gate, up, down with row sources that decode their W into x's dtype, a block of rows at a time."""
    fan_in = (x.shape[-1], x.shape[-1], adapters[4].shape[1])      # H, H, I (a_down is (r, I))
    return [Projection(None, adapters[2 * i], adapters[2 * i + 1], scales[i], dropouts[i], int(seeds[i]),
                       dequant=_rows(schemes[i], packed[i], fan_in[i], block_sizes[i], x.dtype))
            for i in range(3)]


def _kernel_projections(packed: tuple, schemes: tuple, block_sizes, adapters: tuple, scales, dropouts,
                        seeds) -> list[tuple]:
    """gate, up, down for the Triton kernels and the CUDA composition: (stored tensors + code books, scheme, N,
    block size, A, B, scale, dropout, seed), N the projection's output size (B's rows)."""
    return [(_with_code_books(packed[i], schemes[i]), schemes[i], adapters[2 * i + 1].shape[0], block_sizes[i],
             adapters[2 * i], adapters[2 * i + 1], scales[i], dropouts[i], int(seeds[i])) for i in range(3)]


def _kernels(backend: str):
    """The module with ``qgated_mlp_fwd`` / ``qgated_mlp_bwd`` of a kernel backend (imported on first use)."""
    if backend == "cuda":
        from lowcost.ops import _cuda_gated_mlp
        return _cuda_gated_mlp
    from lowcost.kernels import qlora_gated_mlp as kernels  # triton
    return kernels


@torch.library.custom_op("lowcost::qlora_gated_mlp", mutates_args=())
def _qgated_op(x: Tensor, packed_gate: list[Tensor], packed_up: list[Tensor], packed_down: list[Tensor],
               scheme_gate: str, scheme_up: str, scheme_down: str, block_sizes: Sequence[int], a_gate: Tensor,
               b_gate: Tensor, a_up: Tensor, b_up: Tensor, a_down: Tensor, b_down: Tensor, scales: Sequence[float],
               dropouts: Sequence[float], seeds: Tensor, activation: str, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    stored, schemes = (packed_gate, packed_up, packed_down), (scheme_gate, scheme_up, scheme_down)
    adapters = (a_gate, b_gate, a_up, b_up, a_down, b_down)
    x2 = x.reshape(-1, x.shape[-1])
    if backend in ("triton", "cuda"):
        projections = _kernel_projections(stored, schemes, block_sizes, adapters, scales, dropouts, seeds)
        y, gate_out, up_out, u_g, u_u, u_d = _kernels(backend).qgated_mlp_fwd(x2, *projections, activation)
        return y.reshape(x.shape), gate_out, up_out, u_g, u_u, u_d
    gate, up, down = _projections(x, stored, schemes, block_sizes, adapters, scales, dropouts, seeds)
    y, gate_out, up_out, u_g, u_u, u_d = gated_mlp_forward(x2, gate, up, down, activation, _torch_backend._dropout)
    return y.reshape(x.shape), gate_out, up_out, u_g, u_u, u_d


@_qgated_op.register_fake
def _(x, packed_gate, packed_up, packed_down, scheme_gate, scheme_up, scheme_down, block_sizes, a_gate, b_gate,
      a_up, b_up, a_down, b_down, scales, dropouts, seeds, activation, backend):
    M, inter = math.prod(x.shape[:-1]), b_gate.shape[0]
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape), x.new_empty(M, inter), x.new_empty(M, inter),
            *(x.new_empty(M, a.shape[0], dtype=u_dtype) for a in (a_gate, a_up, a_down)))


@torch.library.custom_op("lowcost::qlora_gated_mlp_backward", mutates_args=())
def _qgated_backward_op(grad_y: Tensor, x: Tensor, packed_gate: list[Tensor], packed_up: list[Tensor],
                        packed_down: list[Tensor], scheme_gate: str, scheme_up: str, scheme_down: str,
                        block_sizes: Sequence[int], a_gate: Tensor, b_gate: Tensor, a_up: Tensor, b_up: Tensor,
                        a_down: Tensor, b_down: Tensor, gate_out: Tensor, up_out: Tensor, u_g: Tensor, u_u: Tensor,
                        u_d: Tensor, scales: Sequence[float], dropouts: Sequence[float], seeds: Tensor,
                        activation: str, needs: Sequence[bool], backend: str, norm_rstd: Optional[Tensor] = None,
                        norm_weight: Optional[Tensor] = None, norm_form: str = ""
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)) in grad_y's dtype: the Triton kernels rebuild it in the gate and up x-passes'
    loads, the other backends rebuild it here in torch (``normed_input.kernel_input``)."""
    stored, schemes = (packed_gate, packed_up, packed_down), (scheme_gate, scheme_up, scheme_down)
    adapters = (a_gate, b_gate, a_up, b_up, a_down, b_down)
    x2, norm = kernel_input(x.reshape(-1, x.shape[-1]), norm_rstd, norm_weight, norm_form, grad_y.dtype,
                            backend == "triton")
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    if backend in ("triton", "cuda"):
        projections = _kernel_projections(stored, schemes, block_sizes, adapters, scales, dropouts, seeds)
        grads = _kernels(backend).qgated_mlp_bwd(g2, x2, *projections, gate_out, up_out, u_g, u_u, u_d, activation,
                                                 tuple(bool(n) for n in needs), **norm)
    else:
        gate, up, down = _projections(x2, stored, schemes, block_sizes, adapters, scales, dropouts, seeds)
        grads = gated_mlp_backward(g2, x2, gate, up, down, gate_out, up_out, u_g, u_u, u_d, activation,
                                   tuple(needs), _torch_backend._dropout)
    dx = grads[0].reshape(x.shape) if grads[0] is not None else None
    return tuple(g if g is not None else x.new_empty(0) for g in (dx,) + tuple(grads[1:]))


@_qgated_backward_op.register_fake
def _(grad_y, x, packed_gate, packed_up, packed_down, scheme_gate, scheme_up, scheme_down, block_sizes, a_gate,
      b_gate, a_up, b_up, a_down, b_down, gate_out, up_out, u_g, u_u, u_d, scales, dropouts, seeds, activation,
      needs, backend, norm_rstd=None, norm_weight=None, norm_form=""):
    like = (x.to(grad_y.dtype) if norm_form else x, a_gate, b_gate, a_up, b_up, a_down, b_down)
    return tuple(x.new_empty(t.shape, dtype=t.dtype) if need else x.new_empty(0) for need, t in zip(needs, like))


def _setup_context(ctx, inputs, output) -> None:
    x, packed_gate, packed_up, packed_down, *schemes_blocks = inputs[:8]
    adapters, (scales, dropouts, seeds, activation, backend) = inputs[8:14], inputs[14:19]
    _, gate_out, up_out, u_g, u_u, u_d = output
    ctx.mark_non_differentiable(gate_out, up_out, u_g, u_u, u_d)
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.save_for_backward(*stored, *adapters, gate_out, up_out, u_g, u_u, u_d, seeds, *packed_gate, *packed_up,
                          *packed_down)
    ctx.counts = (len(packed_gate), len(packed_up), len(packed_down))
    ctx.settings = (*schemes_blocks, list(scales), list(dropouts), activation, backend)


def _backward(ctx, grad_y, *_):
    # a normed x on the Triton backend stays (norm input, rstd, w), rebuilt in the gate and up x-passes' loads
    x, norm, saved = backward_input(ctx.saved_tensors, ctx.input_rebuild, ctx.settings[7] == "triton")
    adapters, rest = saved[0:6], saved[6:12]
    n_gate, n_up, _ = ctx.counts
    stored = saved[12:]
    packed = (list(stored[:n_gate]), list(stored[n_gate:n_gate + n_up]), list(stored[n_gate + n_up:]))
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = _qgated_backward_op(grad_y, x, *packed, *ctx.settings[:4], *adapters, *rest[:5], *ctx.settings[4:6],
                                rest[5], ctx.settings[6], needs, ctx.settings[7], *norm)
    out = [None] * 19
    for index, need, grad in zip(_GRAD_INPUTS, needs, grads):
        out[index] = grad if need else None
    out[1:4] = [[None] * len(p) for p in packed]
    return tuple(out)


_qgated_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def qlora_gated_mlp(x: Tensor, gate: Sequence, up: Sequence, down: Sequence, scales: Sequence[float],
                    activation: str = "silu", dropouts: Sequence[float] = (0.0, 0.0, 0.0), seeds=None,
                    backend: Optional[str] = None) -> Tensor:
    """``lowcost.ops.lora_gated_mlp`` with quantized frozen weights: gate, up = (W (I, H), A (r, H), B (I, r)),
    down = (W (H, I), A (r, I), B (H, r)), each W a ``QuantizedWeight`` (decoded to x's dtype). x (..., H)
    float32 / float16 / bfloat16 (float64 for tests) → y (..., H) in x's dtype.

    backend: 'torch' (every format, any device), 'triton' (the formats with a Triton dequantizing tile: nf4,
    nf4-dq, int8, q8_0, q4_0, q4_1, q4_k, q6_k; W's tiles decoded inside the GEMM loops), 'cuda' (CUDA tensors,
    the same formats: the CUDA dequantizing GEMMs with the skinny LoRA kernels and the gated-activation ops) or
    None (for CUDA tensors Triton, then cuda, whichever first can run and takes all three formats; else torch).
    A backend that cannot run a format or on x's device is a clear error naming the projection. Every backend
    saves the same tensors for backward."""
    params = tuple(gate) + tuple(up) + tuple(down)
    if len(params) != 9:
        raise ValueError("gate, up and down must each be (weight, lora_a, lora_b)")
    for role, weight in zip(ROLES, params[0::3]):
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"{role} weight must be a QuantizedWeight like the others, got {type(weight).__name__} "
                            "(the fused MLP takes three dense or three quantized weights)")
    x, params = autocast_projections(x, params)
    _check_inputs(x, params, scales, dropouts, activation, check_projection=_check_projection)
    weights = params[0::3]
    name = _resolve(backend, x, [w.scheme for w in weights], max(a.shape[0] for a in params[1::3]))
    seeds = _seeds_tensor(seeds, dropouts)
    return _qgated_op(x, *(w.packed for w in weights), *(w.scheme for w in weights),
                      [w.block_size for w in weights], *(t for i, t in enumerate(params) if i % 3),
                      [float(s) for s in scales], [float(p) for p in dropouts], seeds, activation, name)[0]
