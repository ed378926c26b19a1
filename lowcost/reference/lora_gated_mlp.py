"""Pure-torch fused LoRA gated MLP (SwiGLU / GeGLU): the ground truth and the CPU path.

    gate = x W_gᵀ + s_g·u_g B_gᵀ,   u_g = (D_g⊙x) A_gᵀ            (M, I), (M, r_g)
    up   = x W_uᵀ + s_u·u_u B_uᵀ,   u_u = (D_u⊙x) A_uᵀ            (M, I), (M, r_u)
    h    = act(gate) ⊙ up                                          (M, I), never saved
    y    = h W_dᵀ + s_d·u_d B_dᵀ,   u_d = (D_d⊙h) A_dᵀ            (M, H), (M, r_d)

act ∈ {"silu", "gelu_tanh", "gelu"} (SwiGLU of Llama/Mistral/Qwen2/Phi-3; GeGLU of Gemma, tanh-approximated;
exact erf GELU). Each projection is exactly ``lowcost.ops.lora_linear`` (``lowcost.reference.lora_linear``)
with its own seed, so the same seeds drop the same elements as three separate LoRA linears.

Saved for backward: x (the caller's tensor), gate, up, u_g, u_u, u_d and the seeds. Backward (g = dL/dy):
    h      = act(gate) ⊙ up                                        recomputed
    dB_d   = s_d·gᵀu_d;  du_d = s_d·g B_d;  dA_d = du_dᵀ(D_d⊙h);  dh = g W_d + D_d⊙(du_d A_d)
    dgate  = (dh ⊙ up) ⊙ act'(gate);  dup = dh ⊙ act(gate)
    dB_p   = s_p·dpᵀu_p;  du_p = s_p·dp B_p;  dA_p = du_pᵀ(D_p⊙x)   for p ∈ {gate, up}
    dx     = dgate W_g + dup W_u + D_g⊙(du_g A_g) + D_u⊙(du_u A_u)   one accumulator (grouped input gradient)
A projection's frozen W may be quantized (``Projection.dequant``, a row source as in
``lowcost.reference.qlora_linear``): its x Wᵀ and g W are then summed over dequantized blocks of rows, so no
dense W exists; every other step is unchanged. Roundings follow the unfused model: gate, up, h, dh, dgate and
dup are rounded to x's dtype as autograd's tensors would be; the activation and its derivative are torch's own
(``aten.silu_backward`` / ``aten.gelu_backward``), so fp32 results equal the unfused path's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lowcost.reference.lora_linear import accumulation_dtype, lora_linear_backward, lora_linear_forward
from lowcost.reference.qlora_linear import (RowSource, qlora_linear_backward, qlora_linear_forward,
                                            quantized_base_dgrad)
from lowcost.reference.philox import DropoutFn, apply_dropout, dropout_pair

Tensor = torch.Tensor
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@dataclass(frozen=True)
class Projection:
    """One adapted projection: weight W (N, K), lora_a A (r, K), lora_b B (N, r), scale s, dropout p, seed.
    A quantized W: ``weight`` None and ``dequant`` the row source (rows -> those rows of W in x's dtype)."""
    weight: Optional[Tensor]
    lora_a: Tensor
    lora_b: Tensor
    scale: float
    dropout: float
    seed: int
    dequant: Optional[RowSource] = None

    @property
    def n_out(self) -> int:
        return self.lora_b.shape[0]


def activation(gate: Tensor, name: str) -> Tensor:
    if name == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if name == "gelu_tanh" else "none")


def activation_backward(grad: Tensor, gate: Tensor, name: str) -> Tensor:
    """grad ⊙ act'(gate), with the kernels autograd runs for ``act`` (bit-identical to the unfused model)."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    return torch.ops.aten.gelu_backward(grad, gate, approximate="tanh" if name == "gelu_tanh" else "none")


def project(x: Tensor, p: Projection, dropout_fn: DropoutFn) -> tuple[Tensor, Tensor]:
    """(x Wᵀ + s·(D⊙x) Aᵀ Bᵀ, u) exactly as ``lowcost.reference.lora_linear_forward`` (no bias), or as
    ``qlora_linear_forward`` for a quantized W."""
    if p.dequant is not None:
        return qlora_linear_forward(x, p.dequant, p.n_out, p.lora_a, p.lora_b, None, p.scale, p.dropout, p.seed,
                                    dropout_fn)
    return lora_linear_forward(x, p.weight, p.lora_a, p.lora_b, None, p.scale, p.dropout, p.seed, dropout_fn)


def project_backward(grad: Tensor, x: Tensor, p: Projection, u: Tensor, needs: tuple,
                     dropout_fn: DropoutFn) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB, dbias) of ``project``: the dense or the quantized LoRA linear's backward."""
    if p.dequant is not None:
        return qlora_linear_backward(grad, x, p.dequant, p.lora_a, p.lora_b, u, p.scale, p.dropout, p.seed, needs,
                                     dropout_fn)
    return lora_linear_backward(grad, x, p.weight, p.lora_a, p.lora_b, u, p.scale, p.dropout, p.seed, needs,
                                dropout_fn)


def gated_mlp_forward(x: Tensor, gate: Projection, up: Projection, down: Projection, act: str,
                      dropout_fn: DropoutFn = apply_dropout) -> tuple[Tensor, ...]:
    """Returns (y (M, H), gate (M, I), up (M, I), u_g, u_u, u_d); h exists only inside this call."""
    gate_out, u_g = project(x, gate, dropout_fn)
    up_out, u_u = project(x, up, dropout_fn)
    y, u_d = project(activation(gate_out, act) * up_out, down, dropout_fn)
    return y, gate_out, up_out, u_g, u_u, u_d


def grouped_input_grad(x: Tensor, grads: list[Tensor], projections: list[Projection],
                       low_ranks: list[Tensor]) -> Tensor:
    """dx = Σ_p g_p W_p + Σ_p D_p⊙(du_p A_p) for projections sharing the input x: one (M, K) accumulator.
    ``low_ranks``: the D_p⊙(du_p A_p), in the accumulation dtype (``adapter_grads`` makes them)."""
    acc = accumulation_dtype(x)
    if any(p.dequant is not None for p in projections):
        return _grouped_input_grad_quantized(x, grads, projections, low_ranks)
    dx = grads[0] @ projections[0].weight
    for g, p in zip(grads[1:], projections[1:]):
        dx = dx.addmm_(g, p.weight) if x.dtype == acc else dx + g @ p.weight
    low_rank = low_ranks[0]
    for term in low_ranks[1:]:
        low_rank = low_rank.add_(term)
    return dx.add_(low_rank) if x.dtype == acc else (dx.to(acc) + low_rank).to(x.dtype)


def _grouped_input_grad_quantized(x: Tensor, grads: list[Tensor], projections: list[Projection],
                                  low_ranks: list[Tensor]) -> Tensor:
    """``grouped_input_grad`` with quantized weights: the low-rank terms first, in the accumulation dtype, then
    each g_p W_p summed into them (a quantized W block of rows by block of rows); rounded to x's dtype once."""
    acc = accumulation_dtype(x)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    for term in low_ranks:
        dx.add_(term)
    for g, p in zip(grads, projections):
        if p.dequant is None:
            dx.add_(g.to(acc) @ p.weight.to(acc))
        else:
            quantized_base_dgrad(g, p.dequant, x.shape[-1], out=dx)
    return dx.to(x.dtype)


def adapter_grads(x: Tensor, grad: Tensor, p: Projection, u: Tensor, need_a: bool, need_b: bool, need_dx: bool,
                  dropout_fn: DropoutFn) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dA, dB, D⊙(du A)) of one projection from its output gradient, du = s·g B (M, r); the last is dx's
    low-rank term (M, K) in the accumulation dtype (None unless ``need_dx``). D is applied to x and to du A
    together (``dropout_pair``: one mask generation where the backend has the kernel)."""
    acc = accumulation_dtype(x)
    g = grad.to(acc)
    du = (g @ p.lora_b.to(acc)).mul_(p.scale)
    db = (g.t() @ u).mul_(p.scale).to(p.lora_b.dtype) if need_b else None
    low_rank = du @ p.lora_a.to(acc) if need_dx else None
    x_tilde, low_rank = dropout_pair(dropout_fn, x if need_a else None, low_rank, p.seed, p.dropout)
    da = (du.t() @ x_tilde.to(acc)).to(p.lora_a.dtype) if need_a else None
    return da, db, low_rank


def gated_mlp_backward(grad_y: Tensor, x: Tensor, gate: Projection, up: Projection, down: Projection,
                       gate_out: Tensor, up_out: Tensor, u_g: Tensor, u_u: Tensor, u_d: Tensor, act: str,
                       needs: tuple, dropout_fn: DropoutFn = apply_dropout) -> tuple[Optional[Tensor], ...]:
    """(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d), None where ``needs`` (same order) says it is not wanted."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    act_gate = activation(gate_out, act)
    h = act_gate * up_out
    dh, da_d, db_d, _ = project_backward(grad_y, h, down, u_d, (True, need_ad, need_bd, False), dropout_fn)
    del h
    dgate = activation_backward(dh * up_out, gate_out, act)
    dup = dh * act_gate
    del dh, act_gate
    da_g, db_g, low_rank_g = adapter_grads(x, dgate, gate, u_g, need_ag, need_bg, need_dx, dropout_fn)
    da_u, db_u, low_rank_u = adapter_grads(x, dup, up, u_u, need_au, need_bu, need_dx, dropout_fn)
    dx = grouped_input_grad(x, [dgate, dup], [gate, up], [low_rank_g, low_rank_u]) if need_dx else None
    return dx, da_g, db_g, da_u, db_u, da_d, db_d
