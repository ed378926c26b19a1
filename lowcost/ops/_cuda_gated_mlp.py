"""The ``cuda`` backend of ``lowcost.ops.lora_gated_mlp``: three LoRA-linear compositions of ``_cuda_backend`` joined
by two elementwise ops of ``lowcost._C`` (``gated_act_mul``, ``gated_act_mul_backward``; csrc/gated_act.h).

forward:  gate, u_g = lora_linear(x)                      _cuda_backend.forward (lora_down, lora_up, cuBLAS)
          up,   u_u = lora_linear(x)
          h = gated_act_mul(gate, up)                     act(gate) ⊙ up, fp32 math, one rounding   (M, I)
          y,    u_d = lora_linear(h)                      h is freed on return: never saved
backward: h = gated_act_mul(gate, up)                     recomputed
          dh, dA_d, dB_d = lora_linear_backward(g, h)    dA_d = du_dᵀ(D_d⊙h) reads h; dh = g W_d + D_d⊙(du_d A_d)
          dgate, dup = gated_act_mul_backward(dh, gate, up)   (dh⊙up)⊙act'(gate), dh⊙act(gate); h, dh freed
          dx_g, dA_g, dB_g = lora_linear_backward(dgate, x); dx_u, dA_u, dB_u = lora_linear_backward(dup, x)
          dx = dx_g + dx_u                                in place on dx_g

The autograd op (``lowcost.ops.lora_gated_mlp``) saves x, gate, up, the three u's and the seeds, as it does for
the other backends; this module only computes. Each projection draws its mask from its own seed with the same
Philox ops as ``lora_linear(backend='cuda')``, so the dropped elements are the unfused model's. Roundings are the
Triton backend's: h, dgate and dup are rounded once from fp32 to x's dtype (the torch backend rounds act(gate)
first). The ops have C++ CPU kernels, so this composition also runs, and is tested, on CPU tensors.

The same composition serves ``lowcost.ops.qlora_gated_mlp`` (``qgated_mlp_fwd`` / ``qgated_mlp_bwd``): the
per-projection forward and backward are parameters, and on a quantized weight they are ``_cuda_backend``'s
``quant_forward`` / ``quant_backward``, whose dequantizing GEMMs (``dequant_gemm`` x deq(W)ᵀ, ``dequant_gemm_dgrad``
g deq(W)) take cuBLAS's place: each 64 x 64 tile of W is decoded into shared memory, no dense W ever exists.
Those two ops have no CPU kernel, so on CPU the quantized composition is tested with a float64 stand-in for them.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowcost.ops import _cuda_backend

Tensor = torch.Tensor
ops = torch.ops.lowcost


# ----------------------------------------------------------------------------------------------- projections
def _project(x: Tensor, p) -> tuple[Tensor, Tensor]:
    """(x Wᵀ + s·(D⊙x) Aᵀ Bᵀ, u) of one dense projection p = (W, A, B, scale, dropout, seed), no bias."""
    weight, lora_a, lora_b, scale, dropout, seed = p
    return _cuda_backend.forward(x, weight, lora_a, lora_b, None, scale, dropout, seed)


def _project_backward(grad: Tensor, x: Tensor, p, u: Tensor, needs: tuple) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB) of ``_project`` (None where ``needs`` = (dx, dA, dB) says it is not wanted)."""
    weight, lora_a, lora_b, scale, dropout, seed = p
    dx, da, db, _ = _cuda_backend.backward(grad, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs + (False,))
    return dx, da, db


def _quant_project(x: Tensor, p) -> tuple[Tensor, Tensor]:
    """(x deq(W)ᵀ + s·(D⊙x) Aᵀ Bᵀ, u) of one quantized projection p = (stored tensors + code books, scheme, N,
    block size, A, B, scale, dropout, seed): ``dequant_gemm`` in place of cuBLAS, no bias."""
    packed, scheme, n_rows, block_size, lora_a, lora_b, scale, dropout, seed = p
    return _cuda_backend.quant_forward(x, packed, scheme, n_rows, block_size, lora_a, lora_b, None, scale, dropout,
                                       seed)


def _quant_project_backward(grad: Tensor, x: Tensor, p, u: Tensor, needs: tuple) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB) of ``_quant_project``: dx = g deq(W) + D⊙(du A) through ``dequant_gemm_dgrad``."""
    packed, scheme, _, block_size, lora_a, lora_b, scale, dropout, seed = p
    dx, da, db, _ = _cuda_backend.quant_backward(grad, x, packed, scheme, block_size, lora_a, lora_b, u, scale,
                                                 dropout, seed, needs + (False,))
    return dx, da, db


# ----------------------------------------------------------------------------------------------- the composition
def gated_mlp_fwd(x: Tensor, gate_p, up_p, down_p, act: str, project=_project) -> tuple[Tensor, ...]:
    """gate_p/up_p/down_p: what ``project`` takes (dense: (W, A, B, scale, dropout, seed)); x (M, H).
    Returns (y, gate, up, u_g, u_u, u_d)."""
    gate, u_g = project(x, gate_p)
    up, u_u = project(x, up_p)
    y, u_d = project(ops.gated_act_mul(gate, up, act), down_p)
    return y, gate, up, u_g, u_u, u_d


def gated_mlp_bwd(grad_y: Tensor, x: Tensor, gate_p, up_p, down_p, gate: Tensor, up: Tensor, u_g: Tensor,
                  u_u: Tensor, u_d: Tensor, act: str, needs, project_backward=_project_backward
                  ) -> tuple[Optional[Tensor], ...]:
    """(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d) as ``lowcost.reference.gated_mlp_backward`` defines them;
    ``project_backward``: the per-projection backward matching the forward's ``project``."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    dh, da_d, db_d = project_backward(grad_y, ops.gated_act_mul(gate, up, act), down_p, u_d,
                                      (True, need_ad, need_bd))
    dgate, dup = ops.gated_act_mul_backward(dh, gate, up, act)
    del dh
    dx_g, da_g, db_g = project_backward(dgate, x, gate_p, u_g, (need_dx, need_ag, need_bg))
    del dgate
    dx_u, da_u, db_u = project_backward(dup, x, up_p, u_u, (need_dx, need_au, need_bu))
    dx = dx_g.add_(dx_u) if need_dx else None
    return dx, da_g, db_g, da_u, db_u, da_d, db_d


def qgated_mlp_fwd(x: Tensor, gate_p, up_p, down_p, act: str) -> tuple[Tensor, ...]:
    """``gated_mlp_fwd`` on quantized weights; each p as ``_quant_project`` takes it (the tuples of
    ``lowcost.ops.qlora_gated_mlp``, the same as the Triton backend's ``qgated_mlp_fwd``)."""
    return gated_mlp_fwd(x, gate_p, up_p, down_p, act, project=_quant_project)


def qgated_mlp_bwd(grad_y: Tensor, x: Tensor, gate_p, up_p, down_p, gate: Tensor, up: Tensor, u_g: Tensor,
                   u_u: Tensor, u_d: Tensor, act: str, needs) -> tuple[Optional[Tensor], ...]:
    """``gated_mlp_bwd`` on quantized weights (the LoRA-linear backward with ``dequant_gemm_dgrad``)."""
    return gated_mlp_bwd(grad_y, x, gate_p, up_p, down_p, gate, up, u_g, u_u, u_d, act, needs,
                         project_backward=_quant_project_backward)
