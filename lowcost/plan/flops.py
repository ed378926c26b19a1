"""FLOPs of a traced step: torch's ``FlopCounterMode`` plus formulas for the ops it does not know.

Counted as torch counts them: 2 FLOPs per multiply-add of every matmul and attention product, in forward,
backward and any forward a checkpoint policy runs again. Added here:

- ``lowcost::lora_linear`` (x: (M, K), W: (N, K), A: (r, K), B: (N, r)):
  forward 2·M·K·N (x·Wᵀ) + 2·M·K·r (u = x̃·Aᵀ) + 2·M·r·N (s·u·Bᵀ);
- ``lowcost::lora_linear_backward``: dx = g·W + D⊙(du·A): 2·M·N·K + 2·M·r·K, du = s·g·B: 2·M·N·r,
  dA = duᵀ·x̃: 2·r·M·K, dB = s·gᵀ·u: 2·N·M·r (each only when requested);
- ``lowcost::lora_gated_mlp`` (x: (M, H), gate/up (I, H), down (H, I)): the three LoRA linears' forwards;
  its backward: the down projection's backward with dx (dh), then gate's and up's (du, dA, dB as requested,
  dx = dgate·W_g + dup·W_u + the two low-rank terms when requested). The elementwise activation is not counted
  (nor is it in torch's table).
- ``lowcost::lora_grouped_linear`` (x: (M, K), projections W_i (N_i, K), A_i (r_i, K)): the sum of the P LoRA
  linears' forwards; its backward: the sum of their backwards (the dx terms are summed in one accumulator, the
  same multiply-adds);
- ``lowcost::linear_cross_entropy`` (hidden (M, K), head (V, K)): the logits 2·M·K·V; when the op forms the
  gradients in the same pass (``needs``: dh, dW, dbias, dA, dB), dh = dz·W 2·M·V·K and dW = dzᵀ·h 2·V·M·K.
  Its backward recomputes the logits and forms the requested gradients the same way.
- the ops on a quantized weight: ``quantized.py`` (the GEMMs above plus the dequantization);
- CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which torch's
  table lacks: q: (B, H, S, D), k/v: (B, Hkv, S', D): forward 4·B·H·S·S'·D (Q·Kᵀ and P·V), backward
  2.5× that (Q·Kᵀ again, then dV, dP, dQ, dK). Causal masking is not discounted (as torch's table does
  not discount it for the GPU kernels either).
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode


def _lora_forward(x_shape, weight_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    M, K = math.prod(x_shape[:-1]), x_shape[-1]
    N, r = weight_shape[0], a_shape[0]
    return 2 * M * K * N + 2 * M * K * r + 2 * M * r * N


def _lora_backward(grad_shape, x_shape, weight_shape, a_shape, b_shape, u_shape, scale, dropout, seed, backend,
                   needs, *args, out_shape=None, **kwargs) -> int:
    M, K = math.prod(x_shape[:-1]), x_shape[-1]
    N, r = weight_shape[0], a_shape[0]
    need_dx, need_da, need_db = needs[0], needs[1], needs[2]
    flops = 2 * M * N * r if (need_dx or need_da) else 0          # du = s·g·B
    flops += (2 * M * N * K + 2 * M * r * K) if need_dx else 0    # g·W + D⊙(du·A)
    flops += 2 * r * M * K if need_da else 0
    flops += 2 * N * M * r if need_db else 0
    return flops


def _gated_forward(x_shape, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, *args, out_shape=None,
                   **kwargs) -> int:
    inner = (*x_shape[:-1], w_gate[0])
    return (_lora_forward(x_shape, w_gate, a_gate) + _lora_forward(x_shape, w_up, a_up)
            + _lora_forward(inner, w_down, a_down))


def _gated_backward(grad_shape, x_shape, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down,
                    gate_out, up_out, u_g, u_u, u_d, scales, dropouts, seeds, activation, needs, *args,
                    out_shape=None, **kwargs) -> int:
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    inner = (*x_shape[:-1], w_gate[0])
    down = _lora_backward(grad_shape, inner, w_down, a_down, b_down, None, 0, 0, None, None, (True, need_ad, need_bd))
    gate = _lora_backward(inner, x_shape, w_gate, a_gate, b_gate, None, 0, 0, None, None, (need_dx, need_ag, need_bg))
    up = _lora_backward(inner, x_shape, w_up, a_up, b_up, None, 0, 0, None, None, (need_dx, need_au, need_bu))
    return down + gate + up


def _grouped_forward(x_shape, w_shapes, a_shapes, *args, out_shape=None, **kwargs) -> int:
    return sum(_lora_forward(x_shape, w, a) for w, a in zip(w_shapes, a_shapes))


def _grouped_backward(grad_shapes, x_shape, w_shapes, a_shapes, b_shapes, u_shapes, has_bias, scales, dropouts,
                      seeds, needs, *args, out_shape=None, **kwargs) -> int:
    return sum(_lora_backward(g, x_shape, w, a, b, None, 0, 0, None, None, needs)
               for g, w, a, b in zip(grad_shapes, w_shapes, a_shapes, b_shapes))


def _cross_entropy(hidden_shape, weight_shape, needs) -> int:
    M, K, V = math.prod(hidden_shape[:-1]), hidden_shape[-1], weight_shape[0]
    return 2 * M * K * V * (1 + int(bool(needs[0])) + int(bool(needs[1])))


def _cross_entropy_forward(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _cross_entropy(hidden_shape, weight_shape, args[12])


def _cross_entropy_backward(grad_shape, hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _cross_entropy(hidden_shape, weight_shape, args[12])


def _attention_forward(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, seq_q, dim = q_shape
    seq_k, dim_v = k_shape[2], v_shape[3]
    return 2 * batch * heads * seq_q * seq_k * dim + 2 * batch * heads * seq_q * seq_k * dim_v


def _attention_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return int(2.5 * _attention_forward(q_shape, k_shape, v_shape))


def _custom_mapping() -> dict:
    from lowcost.plan.quantized import flop_formulas
    import lowcost.ops  # noqa: F401  (registers torch.ops.lowcost.*)
    aten, ops = torch.ops.aten, torch.ops.lowcost
    mapping = {ops.lora_linear: _lora_forward, ops.lora_linear_backward: _lora_backward,
               ops.lora_gated_mlp: _gated_forward, ops.lora_gated_mlp_backward: _gated_backward,
               ops.lora_grouped_linear: _grouped_forward, ops.lora_grouped_linear_backward: _grouped_backward,
               ops.linear_cross_entropy: _cross_entropy_forward,
               ops.linear_cross_entropy_backward: _cross_entropy_backward, **flop_formulas()}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _attention_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no printing) that also counts the ops above; ``.get_total_flops()`` after."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())
