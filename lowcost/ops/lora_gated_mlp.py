"""``lowcost.ops.lora_gated_mlp``: a LoRA-adapted gated MLP (SwiGLU / GeGLU) as one op with autograd.

    y = down(act(gate(x)) ⊙ up(x)),   each projection p(z) = z W_pᵀ + s_p·(D_p⊙z) A_pᵀ B_pᵀ

x: (..., H), w_gate/w_up: (I, H), w_down: (H, I), a_p: (r_p, in_p), b_p: (out_p, r_p) → y: (..., H).
``lowcost.reference.lora_gated_mlp`` has the math and every gradient.

What is saved for backward is the point: x (the caller's tensor), gate and up (M, I), the three u's (M, r) in
float32 and the seeds — not act(gate), not the product h = act(gate)⊙up (both rebuilt in backward), not a
mask. The unfused model keeps gate, up, act(gate) and h: this op keeps half of that. An x made by a lowcost
norm op is saved as the norm's input and statistics instead (``lowcost.ops.normed_input``): on the Triton
backend the gate and up x-passes rebuild an RMSNorm's output in their tile loads (no (M, H) normed tensor in
backward), elsewhere it is rebuilt in torch.

Dropout: each projection has its own seed, and ``seeds=None`` draws them in the order the unfused model
calls its LoRA linears (gate, up, down), each as ``lowcost.ops.lora_linear(seed=None)`` draws one (from
torch's CPU generator, only when that projection's dropout is > 0). So the fused MLP drops exactly the
elements the three unfused ``LoRALinear`` layers drop, for the same generator state.

Backends: torch (``lowcost.reference.lora_gated_mlp``), triton (``kernels/lora_gated_mlp.py``: h rebuilt inside the
down projection's tiles) and cuda (``lowcost.ops._cuda_gated_mlp``: the LoRA linear's CUDA composition per
projection, h = act(gate) ⊙ up from the ``gated_act_mul`` kernel, built for the down projection and freed).

Two custom ops: ``lowcost::lora_gated_mlp`` → (y, gate, up, u_g, u_u, u_d) and
``lowcost::lora_gated_mlp_backward`` → (dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops import _torch_backend
from lowcost.ops.autocast import autocast_projections
from lowcost.ops.backend import resolve_backend
from lowcost.ops.lora_linear import SUPPORTED_DTYPES, _check_scalars, _check_tensor, _seed_tensor
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input
from lowcost.reference.lora_gated_mlp import ACTIVATIONS, Projection, gated_mlp_backward, gated_mlp_forward

Tensor = torch.Tensor
ROLES = ("gate", "up", "down")


# ----------------------------------------------------------------------------------------------- validation
def _check_projection(role: str, weight, lora_a, lora_b, n_in: int, n_out: int, x: Tensor) -> None:
    for part, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        _check_tensor(f"{role} {part}", t, 2)
        if t.device != x.device:
            raise ValueError(f"{role} {part} must be on x's device {x.device}, got {t.device}")
    r = lora_a.shape[0]
    expected = {"weight": (n_out, n_in), "lora_a": (r, n_in), "lora_b": (n_out, r)}
    for part, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if tuple(t.shape) != expected[part] or r < 1:
            raise ValueError(f"{role} {part} must have shape {expected[part]}, got {tuple(t.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{role} weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"{role} lora_a and lora_b must both be {x.dtype} (x's dtype) or float32, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")


def _check_inputs(x, params, scales, dropouts, activation, check_projection=None) -> None:
    """x, the three projections and the settings. ``check_projection``: the per-projection check (default: dense
    weights; ``lowcost.ops.qlora_gated_mlp`` passes its check of a quantized weight)."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., H), got a 0-D tensor")
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    H = x.shape[-1]
    if check_projection is None:
        _check_tensor("gate weight", params[0], 2)
        check_projection = _check_projection
    inter = params[0].shape[0]
    for role, (w, a, b), n_in, n_out in zip(ROLES, (params[0:3], params[3:6], params[6:9]), (H, H, inter),
                                           (inter, inter, H)):
        check_projection(role, w, a, b, n_in, n_out, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for what, values in (("scales", scales), ("dropouts", dropouts)):
        if len(values) != 3:
            raise ValueError(f"{what} must hold 3 values (gate, up, down), got {len(values)}")
    for scale, dropout in zip(scales, dropouts):
        _check_scalars(scale, dropout)


def _seeds_tensor(seeds, dropouts) -> Tensor:
    """(3,) int64 CPU tensor; ``None`` draws one seed per projection in the unfused order (gate, up, down)."""
    if seeds is None:
        seeds = [None] * 3
    if isinstance(seeds, Tensor):
        if seeds.shape != (3,) or seeds.dtype != torch.int64 or seeds.device.type != "cpu":
            raise ValueError(f"seeds must be a (3,) int64 CPU tensor, got {seeds.dtype} {tuple(seeds.shape)} "
                             f"on {seeds.device}")
        return seeds
    if len(seeds) != 3:
        raise ValueError(f"seeds must hold 3 seeds (gate, up, down) or be None, got {len(seeds)}")
    return torch.stack([_seed_tensor(s, p) for s, p in zip(seeds, dropouts)])


def _resolve(backend: Optional[str], x: Tensor, ranks: Sequence[int]) -> str:
    """"torch", "triton" or "cuda" (the CUDA C++ composition, ``_cuda_gated_mlp``; on a GPU the default is
    Triton, then CUDA, else torch's GEMMs)."""
    name = resolve_backend(backend, x.device, max(ranks))
    if name != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    return name


def _impl(backend: str):
    """The module with ``gated_mlp_fwd`` / ``gated_mlp_bwd`` of a kernel backend (imported on first use), or None
    for torch (``lowcost.reference.lora_gated_mlp``)."""
    if backend == "triton":
        from lowcost.kernels import lora_gated_mlp as kernels  # triton: imported on first use
        return kernels
    if backend == "cuda":
        from lowcost.ops import _cuda_gated_mlp
        return _cuda_gated_mlp
    return None


# ----------------------------------------------------------------------------------------------- custom ops
def _as_tuple(p: Projection) -> tuple:
    return (p.weight, p.lora_a, p.lora_b, p.scale, p.dropout, p.seed)


def _projections(params, scales, dropouts, seeds) -> list[Projection]:
    return [Projection(params[3 * i], params[3 * i + 1], params[3 * i + 2], scales[i], dropouts[i], int(seeds[i]))
            for i in range(3)]


@torch.library.custom_op("lowcost::lora_gated_mlp", mutates_args=())
def _gated_mlp_op(x: Tensor, w_gate: Tensor, a_gate: Tensor, b_gate: Tensor, w_up: Tensor, a_up: Tensor,
                  b_up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor, scales: Sequence[float],
                  dropouts: Sequence[float], seeds: Tensor, activation: str, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = (w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down)
    gate, up, down = _projections(params, scales, dropouts, seeds)
    x2 = x.reshape(-1, x.shape[-1])
    kernels = _impl(backend)
    if kernels is not None:
        y, gate_out, up_out, u_g, u_u, u_d = kernels.gated_mlp_fwd(x2, *(_as_tuple(p) for p in (gate, up, down)),
                                                                   activation)
    else:
        y, gate_out, up_out, u_g, u_u, u_d = gated_mlp_forward(x2, gate, up, down, activation,
                                                               _torch_backend._dropout)
    return y.reshape(x.shape), gate_out, up_out, u_g, u_u, u_d


@_gated_mlp_op.register_fake
def _(x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down, scales, dropouts, seeds, activation,
      backend):
    M, inter = math.prod(x.shape[:-1]), w_gate.shape[0]
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape), x.new_empty(M, inter), x.new_empty(M, inter),
            *(x.new_empty(M, a.shape[0], dtype=u_dtype) for a in (a_gate, a_up, a_down)))


@torch.library.custom_op("lowcost::lora_gated_mlp_backward", mutates_args=())
def _gated_mlp_backward_op(grad_y: Tensor, x: Tensor, w_gate: Tensor, a_gate: Tensor, b_gate: Tensor, w_up: Tensor,
                           a_up: Tensor, b_up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor,
                           gate_out: Tensor, up_out: Tensor, u_g: Tensor, u_u: Tensor, u_d: Tensor,
                           scales: Sequence[float], dropouts: Sequence[float], seeds: Tensor, activation: str,
                           needs: Sequence[bool], backend: str, norm_rstd: Optional[Tensor] = None,
                           norm_weight: Optional[Tensor] = None, norm_form: str = ""
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)) in grad_y's dtype: the Triton kernels rebuild it in the gate and up x-passes'
    loads, the other backends rebuild it here in torch (``normed_input.kernel_input``)."""
    params = (w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down)
    gate, up, down = _projections(params, scales, dropouts, seeds)
    x2, norm = kernel_input(x.reshape(-1, x.shape[-1]), norm_rstd, norm_weight, norm_form, grad_y.dtype,
                            backend == "triton")
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    kernels = _impl(backend)
    if kernels is not None:
        grads = kernels.gated_mlp_bwd(g2, x2, *(_as_tuple(p) for p in (gate, up, down)), gate_out, up_out, u_g, u_u,
                                      u_d, activation, tuple(needs), **norm)
    else:
        grads = gated_mlp_backward(g2, x2, gate, up, down, gate_out, up_out, u_g, u_u, u_d, activation, tuple(needs),
                                   _torch_backend._dropout)
    dx = grads[0].reshape(x.shape) if grads[0] is not None else None
    return tuple(g if g is not None else x.new_empty(0) for g in (dx,) + tuple(grads[1:]))


@_gated_mlp_backward_op.register_fake
def _(grad_y, x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down, gate_out, up_out, u_g, u_u, u_d,
      scales, dropouts, seeds, activation, needs, backend, norm_rstd=None, norm_weight=None, norm_form=""):
    like = (x.to(grad_y.dtype) if norm_form else x, a_gate, b_gate, a_up, b_up, a_down, b_down)
    return tuple(x.new_empty(t.shape, dtype=t.dtype) if need else x.new_empty(0) for need, t in zip(needs, like))


def _setup_context(ctx, inputs, output) -> None:
    x, *params = inputs[:10]
    scales, dropouts, seeds, activation, backend = inputs[10:]
    _, gate_out, up_out, u_g, u_u, u_d = output
    ctx.mark_non_differentiable(gate_out, up_out, u_g, u_u, u_d)
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.save_for_backward(*stored, *params, gate_out, up_out, u_g, u_u, u_d, seeds)
    ctx.settings = (list(scales), list(dropouts), activation, backend)


_GRAD_INPUTS = (0, 2, 3, 5, 6, 8, 9)  # x, a_gate, b_gate, a_up, b_up, a_down, b_down among the op's inputs


def _backward(ctx, grad_y, *_):
    scales, dropouts, activation, backend = ctx.settings
    # a normed x on the Triton backend stays (norm input, rstd, w), rebuilt in the gate and up x-passes' loads
    x, norm, rest = backward_input(ctx.saved_tensors, ctx.input_rebuild, backend == "triton")
    params, (gate_out, up_out, u_g, u_u, u_d, seeds) = rest[:9], rest[9:]
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = _gated_mlp_backward_op(grad_y, x, *params, gate_out, up_out, u_g, u_u, u_d, scales, dropouts, seeds,
                                   activation, needs, backend, *norm)
    out = [None] * 15
    for index, need, grad in zip(_GRAD_INPUTS, needs, grads):
        out[index] = grad if need else None
    return tuple(out)


_gated_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def lora_gated_mlp(x: Tensor, gate: Sequence[Tensor], up: Sequence[Tensor], down: Sequence[Tensor],
                   scales: Sequence[float], activation: str = "silu", dropouts: Sequence[float] = (0.0, 0.0, 0.0),
                   seeds=None, backend: Optional[str] = None) -> Tensor:
    """y = down(act(gate(x)) ⊙ up(x)) with a LoRA adapter on each projection, one op forward and backward.

    Args:
        x: (..., H) float32 / float16 / bfloat16 (float64 for tests).
        gate, up: (W (I, H), A (r, H), B (I, r)); down: (W (H, I), A (r, I), B (H, r)). Base weights frozen,
            in x's dtype; adapters in x's dtype or float32. The same tensor may appear in two projections
            (Phi-3's packed gate_up: views of one weight and one B, the same A); autograd adds the gradients.
        scales: (s_gate, s_up, s_down); dropouts: (p_gate, p_up, p_down), each in [0, 1).
        activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU, tanh-approximated, Gemma) or "gelu" (exact).
        seeds: 3 ints / a (3,) int64 CPU tensor, or None (drawn as three ``lora_linear(seed=None)`` calls).
        backend: "torch", "triton", "cuda" or None (``LOWCOST_BACKEND``, else the best available). "cuda": the
            CUDA C++ kernels of ``lowcost._C`` around cuBLAS (``lowcost.ops._cuda_gated_mlp``), CUDA tensors only.
    Returns:
        y: (..., H) in x's dtype.

    Quantized frozen weights (three ``QuantizedWeight``) run ``lowcost.ops.qlora_gated_mlp`` (torch; Triton
    with W's tiles decoded inside the GEMM loops; or cuda, this composition with the CUDA dequantizing GEMMs).
    """
    params = tuple(gate) + tuple(up) + tuple(down)
    if len(params) != 9:
        raise ValueError("gate, up and down must each be (weight, lora_a, lora_b)")
    if any(not isinstance(w, Tensor) for w in params[0::3]):
        from lowcost.ops.qlora_gated_mlp import qlora_gated_mlp  # imports this module: bound here
        return qlora_gated_mlp(x, gate, up, down, scales, activation, dropouts, seeds, backend)
    x, params = autocast_projections(x, params)
    _check_inputs(x, params, scales, dropouts, activation)
    for role, weight in zip(ROLES, params[0::3]):
        if weight.requires_grad:
            raise ValueError(f"{role} weight must be frozen (requires_grad=False): the fused MLP trains adapters only")
    name = _resolve(backend, x, [a.shape[0] for a in params[1::3]])
    seeds = _seeds_tensor(seeds, dropouts)
    return _gated_mlp_op(x, *params, [float(s) for s in scales], [float(p) for p in dropouts], seeds, activation,
                         name)[0]
