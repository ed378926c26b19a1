"""``lowcost.ops.lora_grouped_linear``: P LoRA projections sharing one input (q/k/v, gate/up) as one op.

    y_i = x W_iᵀ + b_i + s_i · (D_i ⊙ x) A_iᵀ B_iᵀ          i = 0 … P-1

x: (..., K); projection i: W_i (N_i, K) frozen, A_i (r_i, K), B_i (N_i, r_i), b_i (N_i,) or None, its own
scale s_i, dropout p_i and seed (its own Philox mask D_i, the stream ``lowcost.ops.lora_linear`` uses for
that seed: the grouped op drops exactly the elements P unfused calls drop). ``lowcost.reference.
lora_grouped_linear`` has the math and every gradient.

Saved for backward: x once (the caller's tensor; a lowcost norm's output as the norm's input and statistics,
``lowcost.ops.normed_input``: on the Triton backend an RMSNorm's output is rebuilt inside the dA pass's tile
loads, so no (M, K) normed tensor exists in backward; elsewhere it is rebuilt in torch), the
u_i = (D_i⊙x)A_iᵀ (M, r_i) in float32 and the seeds; never a D_i ⊙ x, never a mask. Backward computes
dx = Σ_i g_i W_i + Σ_i D_i ⊙ (du_i A_i) into one accumulator (torch: an ``addmm_`` chain; Triton: one kernel
summing every projection's terms in its tile; cuda: the first low-rank term as the accumulator, each g_i W_i
added by cuBLAS with beta = 1), and dA_i, dB_i, db_i.

Two custom ops: ``lowcost::lora_grouped_linear`` → ([y_i], [u_i]) and ``lowcost::lora_grouped_linear_backward``
→ (dx, [dA_i], [dB_i], [db_i]). Backends: "torch" (the reference with the fastest dropout kernel),
"triton" (``lowcost.kernels.lora_grouped_linear``: the u_i of every projection from one pass over each x tile,
dA_i from another, dx from one grouped kernel; at most ``TRITON_MAX_PROJECTIONS`` projections) and "cuda"
(``lowcost.ops._cuda_grouped_linear``: per projection the LoRA linear's CUDA C++ composition around cuBLAS, with
one dx accumulator that the dense terms g_i W_i join in place, and the u_i of every projection from one read of x,
with dropout too (``lora_down_grouped``), as the dA_i and the low-rank part of dx (``lora_dx_da_grouped``); CUDA
tensors on sm_80+, no float64).
Quantized frozen weights (all P ``QuantizedWeight``) route to ``lowcost.ops.qlora_grouped_linear`` (torch,
triton and cuda backends, the same saved set); a group mixing dense and quantized weights is refused.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lowcost.ops import _torch_backend
from lowcost.ops.autocast import autocast_operands
from lowcost.ops.backend import requested_backend, resolve_backend, unavailable_reason
from lowcost.ops.lora_linear import _check_dtypes_devices, _check_scalars, _check_shapes, _seed_tensor
from lowcost.ops.normed_input import backward_input, kernel_input, pack_input
from lowcost.reference.lora_grouped_linear import GroupedProjection, grouped_backward, grouped_forward
from lowcost.reference.quant import QuantizedWeight

Tensor = torch.Tensor
TRITON_MAX_PROJECTIONS = 3   # kernels/lora_grouped_linear.py MAX_PROJECTIONS: one slot per projection


# ----------------------------------------------------------------------------------------------- validation
def _check_counts(weights, lora_as, lora_bs, biases, scales, dropouts) -> int:
    """P, after checking that every per-projection list holds P entries (P >= 1)."""
    count = len(weights)
    if count < 1:
        raise ValueError("weights must hold at least one projection's weight, got none")
    for what, values in (("lora_as", lora_as), ("lora_bs", lora_bs), ("biases", biases), ("scales", scales),
                         ("dropouts", dropouts)):
        if len(values) != count:
            raise ValueError(f"{what} must hold {count} entries (one per projection, as weights), got {len(values)}")
    return count


def _check_group(x, weights, lora_as, lora_bs, biases, scales, dropouts) -> int:
    """P after checking every projection against x (the shape and dtype rules of ``lora_linear``)."""
    count = _check_counts(weights, lora_as, lora_bs, biases, scales, dropouts)
    for i, (w, a, b, bias) in enumerate(zip(weights, lora_as, lora_bs, biases)):
        if isinstance(w, Tensor) and w.dim() == 2 and x.dim() >= 1 and w.shape[1] != x.shape[-1]:
            raise ValueError(f"projection {i}: weight must have K={x.shape[-1]} columns (every projection reads the "
                             f"same x of shape {tuple(x.shape)}), got shape {tuple(w.shape)}")
        try:
            _check_shapes(x, w, a, b, bias)
            _check_dtypes_devices(x, w, a, b, bias)
            _check_scalars(scales[i], dropouts[i])
        except (TypeError, ValueError) as error:
            raise type(error)(f"projection {i}: {error}") from None
        if isinstance(w, Tensor) and w.requires_grad:
            raise ValueError(f"projection {i}: weight must be frozen (requires_grad=False): the grouped op trains "
                             f"adapters only")
    return count


def _seeds_tensor(seeds, dropouts) -> Tensor:
    """(P,) int64 CPU tensor; ``None`` draws one seed per projection in order, each as ``lora_linear(seed=None)``
    draws one (from torch's CPU generator, only where that projection's dropout is > 0)."""
    count = len(dropouts)
    if seeds is None:
        seeds = [None] * count
    if isinstance(seeds, Tensor):
        if seeds.shape != (count,) or seeds.dtype != torch.int64 or seeds.device.type != "cpu":
            raise ValueError(f"seeds must be a ({count},) int64 CPU tensor (one seed per projection), got "
                             f"{seeds.dtype} {tuple(seeds.shape)} on {seeds.device}")
        return seeds
    if len(seeds) != count:
        raise ValueError(f"seeds must hold {count} seeds (one per projection) or be None, got {len(seeds)}")
    return torch.stack([_seed_tensor(s, p) for s, p in zip(seeds, dropouts)])


def _resolve(backend: Optional[str], x: Tensor, ranks: Sequence[int]) -> str:
    """"torch", "triton" or "cuda" (the CUDA C++ composition, ``_cuda_grouped_linear``; on a GPU the default is
    Triton, then CUDA, else torch's GEMMs). More projections than the Triton kernels group: the default passes
    on to CUDA, then torch; an explicit 'triton' is refused."""
    name = resolve_backend(backend, x.device, max(ranks))
    if name == "triton" and len(ranks) > TRITON_MAX_PROJECTIONS and requested_backend(backend)[1] is None:
        name = "cuda" if unavailable_reason("cuda", x.device, max(ranks)) is None else "torch"
    if name != "torch" and x.dtype == torch.float64:
        raise TypeError(f"x of dtype float64 runs only on backend='torch' (got backend={name!r})")
    if name == "triton" and len(ranks) > TRITON_MAX_PROJECTIONS:
        raise ValueError(f"backend='triton' groups at most {TRITON_MAX_PROJECTIONS} projections, got {len(ranks)}")
    return name


def _kernels(backend: str, x2: Tensor):
    """The module with ``grouped_fwd`` / ``grouped_bwd`` of a kernel backend (imported on first use), or None for
    the torch backend. Triton with M = 0 or K = 0 also gets None: no tile to launch, the torch path computes the
    empty / zero results exactly; the CUDA ops take empty operands themselves."""
    if backend == "triton" and x2.shape[0] > 0 and x2.shape[1] > 0:
        from lowcost.kernels import lora_grouped_linear as kernels  # triton: imported on first use
        return kernels
    if backend == "cuda":
        from lowcost.ops import _cuda_grouped_linear
        return _cuda_grouped_linear
    return None


# ----------------------------------------------------------------------------------------------- custom ops
def _spread(present: Sequence[Tensor], has_bias: Sequence[bool]) -> list[Optional[Tensor]]:
    """The per-projection biases (None where a projection has none) from the present ones. The op takes the
    present biases as a ``Tensor[]`` (a ``Tensor?[]`` input cannot receive gradients from a custom op's
    autograd) and ``has_bias`` says which projections they belong to."""
    it = iter(present)
    return [next(it) if flag else None for flag in has_bias]


def _projections(weights, lora_as, lora_bs, biases, scales, dropouts, seeds) -> list[GroupedProjection]:
    return [GroupedProjection(w, a, b, bias, float(s), float(p), int(seed))
            for w, a, b, bias, s, p, seed in zip(weights, lora_as, lora_bs, biases, scales, dropouts, seeds)]


@torch.library.custom_op("lowcost::lora_grouped_linear", mutates_args=())
def _grouped_op(x: Tensor, weights: Sequence[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
                biases: Sequence[Tensor], has_bias: Sequence[bool], scales: Sequence[float], dropouts: Sequence[float],
                seeds: Tensor, backend: str) -> tuple[list[Tensor], list[Tensor]]:
    projections = _projections(weights, lora_as, lora_bs, _spread(biases, has_bias), scales, dropouts, seeds)
    x2 = x.reshape(-1, x.shape[-1])
    kernels = _kernels(backend, x2)
    if kernels is not None:
        ys, us = kernels.grouped_fwd(x2, projections)
    else:
        ys, us = grouped_forward(x2, projections, _torch_backend._dropout)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys], list(us)


def fake_forward(x: Tensor, lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor]) -> tuple[list, list]:
    """The grouped forward ops' fake outputs: [y_i (..., N_i)] in x's dtype, [u_i (M, r_i)] float32 (float64 for
    float64 x)."""
    M = math.prod(x.shape[:-1])
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ([x.new_empty(*x.shape[:-1], b.shape[0]) for b in lora_bs],
            [x.new_empty(M, a.shape[0], dtype=u_dtype) for a in lora_as])


@_grouped_op.register_fake
def _(x, weights, lora_as, lora_bs, biases, has_bias, scales, dropouts, seeds, backend):
    return fake_forward(x, lora_as, lora_bs)


@torch.library.custom_op("lowcost::lora_grouped_linear_backward", mutates_args=())
def _grouped_backward_op(grads: Sequence[Tensor], x: Tensor, weights: Sequence[Tensor], lora_as: Sequence[Tensor],
                         lora_bs: Sequence[Tensor], us: Sequence[Tensor], has_bias: Sequence[bool],
                         scales: Sequence[float], dropouts: Sequence[float], seeds: Tensor, needs: Sequence[bool],
                         backend: str, norm_rstd: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                         norm_form: str = "") -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """With ``norm_form`` ("llama" | "gemma"), x is an RMSNorm's input and the op's input is that norm's output
    (rstd (..., 1), weight (K,)) in the grads' dtype: the Triton kernels rebuild it in the dA pass's loads, the
    other paths rebuild it here in torch (``normed_input.kernel_input``)."""
    biases = [w if flag else None for w, flag in zip(weights, has_bias)]   # only "is there a bias" matters here
    projections = _projections(weights, lora_as, lora_bs, biases, scales, dropouts, seeds)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = [g.reshape(-1, g.shape[-1]) for g in grads]
    kernels = _kernels(backend, x2)
    inp, norm = kernel_input(x2, norm_rstd, norm_weight, norm_form, grads[0].dtype,
                             backend == "triton" and kernels is not None)
    run = kernels.grouped_bwd if kernels is not None else (
        lambda *a: grouped_backward(*a, dropout_fn=_torch_backend._dropout))
    return backward_outputs(x, *run(g2, inp, projections, list(us), tuple(needs), **norm),
                            dtype=grads[0].dtype if norm_form else None)


def backward_outputs(x: Tensor, dx, das, dbs, dbiases, dtype=None) -> tuple[Tensor, list, list, list]:
    """The grouped backward ops' outputs: dx in x's shape, a fresh empty tensor for each gradient not computed
    (outputs must not alias one another), in ``dtype`` (the op's input dtype, default x's)."""
    def fill(t):
        return t if t is not None else x.new_empty(0, dtype=dtype)
    return (fill(dx.reshape(x.shape) if dx is not None else None), [fill(t) for t in das], [fill(t) for t in dbs],
            [fill(t) for t in dbiases])


def fake_backward(x: Tensor, lora_as, lora_bs, has_bias, needs, dtype=None) -> tuple[Tensor, list, list, list]:
    """The grouped backward ops' fake outputs: (dx, [dA_i], [dB_i], [dbias_i]), empty where ``needs`` says no;
    dx and the dbias_i in ``dtype`` (the op's input dtype, default x's)."""
    need_dx, need_da, need_db, need_dbias = needs
    return (x.new_empty(x.shape if need_dx else (0,), dtype=dtype),
            [a.new_empty(a.shape if need_da else (0,)) for a in lora_as],
            [b.new_empty(b.shape if need_db else (0,)) for b in lora_bs],
            [x.new_empty(b.shape[0] if need_dbias and flag else 0, dtype=dtype) for b, flag in zip(lora_bs, has_bias)])


@_grouped_backward_op.register_fake
def _(grads, x, weights, lora_as, lora_bs, us, has_bias, scales, dropouts, seeds, needs, backend, norm_rstd=None,
      norm_weight=None, norm_form=""):
    return fake_backward(x, lora_as, lora_bs, has_bias, needs, grads[0].dtype if norm_form else None)


def _setup_context(ctx, inputs, output) -> None:
    x, weights, lora_as, lora_bs, biases, has_bias, scales, dropouts, seeds, backend = inputs
    _, us = output
    ctx.mark_non_differentiable(*us)
    stored, ctx.input_rebuild = pack_input(x)   # a normed x: kept as its norm's input and statistics
    ctx.count = len(weights)
    ctx.save_for_backward(*stored, *weights, *lora_as, *lora_bs, *us, seeds)
    ctx.settings = (list(has_bias), list(scales), list(dropouts), backend)


def _backward(ctx, grad_ys, _grad_us):
    # a normed x on the Triton backend stays (norm input, rstd, w), rebuilt in the dA pass's loads
    x, norm, rest = backward_input(ctx.saved_tensors, ctx.input_rebuild, ctx.settings[3] == "triton")
    count = ctx.count
    weights, lora_as, lora_bs, us = (list(rest[i * count:(i + 1) * count]) for i in range(4))
    seeds = rest[4 * count]
    has_bias, scales, dropouts, backend = ctx.settings
    grads = [g if g is not None else w.new_zeros(*x.shape[:-1], w.shape[0]) for g, w in zip(grad_ys, weights)]
    need = [any(n) if isinstance(n, (list, tuple)) else bool(n) for n in ctx.needs_input_grad]  # per list input
    needs = [need[0], need[2], need[3], need[4] and any(has_bias)]
    dx, das, dbs, dbiases = _grouped_backward_op(grads, x, weights, lora_as, lora_bs, us, has_bias, scales, dropouts,
                                                 seeds, needs, backend, *norm)
    nothing = [None] * count                      # list inputs get a list back (autograd checks the structure)
    present = [d if needs[3] else None for d, flag in zip(dbiases, has_bias) if flag]
    return (dx if needs[0] else None, nothing, das if needs[1] else nothing, dbs if needs[2] else nothing, present,
            None, None, None, None, None)


_grouped_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public
def lora_grouped_linear(x: Tensor, weights: Sequence[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
                        scales: Sequence[float], biases: Optional[Sequence[Optional[Tensor]]] = None,
                        dropouts: Optional[Sequence[float]] = None, seeds=None,
                        backend: Optional[str] = None) -> list[Tensor]:
    """[y_i = x W_iᵀ + b_i + s_i · (D_i ⊙ x) A_iᵀ B_iᵀ for each projection i], one op forward and backward.

    Args:
        x: (..., K) float32 / float16 / bfloat16 (float64 on the torch backend, for tests).
        weights: P frozen W_i (N_i, K) in x's dtype (N_i may differ: grouped-query attention's k/v).
        lora_as: P A_i (r_i, K); lora_bs: P B_i (N_i, r_i); each pair in x's dtype or float32 (r_i may differ).
        scales: P finite scales s_i.
        biases: None, or P entries each (N_i,) in x's dtype or None.
        dropouts: None (all 0), or P probabilities in [0, 1), applied to x on projection i's LoRA path only.
        seeds: P ints / a (P,) int64 CPU tensor, or None (drawn as P ``lora_linear(seed=None)`` calls, in order).
        backend: "torch", "triton", "cuda" or None (``LOWCOST_BACKEND``, else the best available). "cuda": the
            CUDA C++ kernels of ``lowcost._C`` around cuBLAS (``lowcost.ops._cuda_grouped_linear``), CUDA tensors
            only; "triton" groups at most ``TRITON_MAX_PROJECTIONS`` projections.
    Returns:
        [y_i (..., N_i)] in x's dtype.

    Quantized frozen weights (P ``QuantizedWeight``) run ``lowcost.ops.qlora_grouped_linear`` (torch, or triton /
    cuda: their dequantizing GEMMs); a mix of dense and quantized weights is a TypeError.
    """
    weights, lora_as, lora_bs = list(weights), list(lora_as), list(lora_bs)
    if any(isinstance(w, QuantizedWeight) for w in weights):
        from lowcost.ops.qlora_grouped_linear import qlora_grouped_linear  # imports this module: bound here
        return qlora_grouped_linear(x, weights, lora_as, lora_bs, scales, biases, dropouts, seeds, backend)
    count = len(weights)
    biases = [None] * count if biases is None else list(biases)
    dropouts = [0.0] * count if dropouts is None else list(dropouts)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    (x, *rest), adapters = autocast_operands((x, *weights, *[b for b in biases]), (*lora_as, *lora_bs))
    weights, biases = list(rest[:count]), list(rest[count:])
    lora_as, lora_bs = list(adapters[:len(lora_as)]), list(adapters[len(lora_as):])
    _check_group(x, weights, lora_as, lora_bs, biases, scales, dropouts)
    name = _resolve(backend, x, [a.shape[0] for a in lora_as])
    seeds = _seeds_tensor(seeds, dropouts)
    has_bias = [b is not None for b in biases]
    ys, _ = _grouped_op(x, weights, lora_as, lora_bs, [b for b in biases if b is not None], has_bias,
                        [float(s) for s in scales],
                        [float(p) for p in dropouts], seeds, name)
    return ys
