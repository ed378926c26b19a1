"""FLOPs of a traced step: torch's ``FlopCounterMode`` plus formulas for the ops it does not know.

Counted as torch counts them: 2 FLOPs per multiply-add of every matmul and attention product, in forward,
backward and any forward a checkpoint policy runs again. Added here:

- ``lowcost::lora_linear`` (x: (M, K), W: (N, K), A: (r, K), B: (N, r)):
  forward 2·M·K·N (x·Wᵀ) + 2·M·K·r (u = x̃·Aᵀ) + 2·M·r·N (s·u·Bᵀ);
- ``lowcost::lora_linear_backward``: dx = g·W + D⊙(du·A): 2·M·N·K + 2·M·r·K, du = s·g·B: 2·M·N·r,
  dA = duᵀ·x̃: 2·r·M·K, dB = s·gᵀ·u: 2·N·M·r (each only when requested);
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


def _attention_forward(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, seq_q, dim = q_shape
    seq_k, dim_v = k_shape[2], v_shape[3]
    return 2 * batch * heads * seq_q * seq_k * dim + 2 * batch * heads * seq_q * seq_k * dim_v


def _attention_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return int(2.5 * _attention_forward(q_shape, k_shape, v_shape))


def _custom_mapping() -> dict:
    import lowcost.ops.lora_linear  # noqa: F401  (registers torch.ops.lowcost.*)
    aten = torch.ops.aten
    mapping = {torch.ops.lowcost.lora_linear: _lora_forward,
               torch.ops.lowcost.lora_linear_backward: _lora_backward}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _attention_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no printing) that also counts the ops above; ``.get_total_flops()`` after."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())
