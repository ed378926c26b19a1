"""The quantized base in a plan: the weights quantized on the meta device, and the FLOPs of the ops that
dequantize them (``lowcost::qlora_linear``, ``lowcost::quantized_linear``, the fused gated MLP on quantized
weights ``lowcost::qlora_gated_mlp``, the grouped projections on quantized weights ``lowcost::qlora_grouped_linear``,
and their backward ops), which no dispatch mode sees inside.

Weights. ``quantize_base`` runs the real ``lowcost.quantize`` (the selection ``load_pretrained(quantize=...)``
makes: every linear layer but the output head) on the meta-device model: the quantizers only shape their
outputs there, so the codes and scales come out with their exact shapes and dtypes and the plan's weight bytes
are ``QuantReport.bytes`` plus the layers left dense, with no 8B weights quantized for real.

Workspace of the torch backend: ``decode_workspace.py`` (the decoders' reused workspace and temporaries per
format, and every op's own temporaries around its row loop, measured exactly).

FLOPs: the LoRA linear's (``flops.py``) plus the dequantization, counted as one multiply per weight element
(code value × its scale) each time W is decoded (the forward, and the dgrad when dx is wanted), plus 2 per
block for the double-quantized absmax (a' = DYNAMIC[q]·m + c).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowcost.reference.quant import padded_width

PLAN_SCHEMES = ("nf4", "nf4-dq", "int8")


def check_plan_scheme(scheme) -> None:
    if scheme not in PLAN_SCHEMES:
        gguf = (" (GGUF blocks depend on each tensor's type in the file, which a config does not say)"
                if scheme == "gguf" else "")
        raise ValueError(f"quantize must be one of {', '.join(PLAN_SCHEMES)}{gguf}, got {scheme!r}")


def quantize_base(model: nn.Module, scheme: str):
    """Quantizes ``model`` (on the meta device) as ``load_pretrained(quantize=...)`` would; returns the report."""
    from lowcost.quant import quantize
    check_plan_scheme(scheme)
    model.requires_grad_(False)
    return quantize(model, "nf4" if scheme == "nf4-dq" else scheme, double_quant=scheme == "nf4-dq")


# ----------------------------------------------------------------------------------------------- FLOPs
def dequantize_flops(scheme: str, N: int, K: int, block_size: int) -> int:
    """Multiplies (and adds) to decode an (N, K) weight once."""
    extra = 2 * N * (padded_width(K, block_size) // block_size) if scheme == "nf4-dq" else 0
    return N * K + extra


def _qlora_forward_flops(x_shape, packed, scheme, n_rows, block_size, a_shape, *args, out_shape=None,
                         **kwargs) -> int:
    M, K, r = math.prod(x_shape[:-1]), x_shape[-1], a_shape[0]
    N = n_rows
    return 2 * M * K * N + 2 * M * K * r + 2 * M * r * N + dequantize_flops(scheme, N, K, block_size)


def _qlora_backward_flops(grad_shape, x_shape, packed, scheme, block_size, a_shape, b_shape, u_shape, scale,
                          dropout, seed, backend, needs, *args, out_shape=None, **kwargs) -> int:
    from lowcost.plan.flops import _lora_backward
    N, K = grad_shape[-1], x_shape[-1]
    flops = _lora_backward(grad_shape, x_shape, (N, K), a_shape, b_shape, u_shape, scale, dropout, seed, backend,
                           needs)
    return flops + (dequantize_flops(scheme, N, K, block_size) if needs[0] else 0)


def _frozen_forward_flops(x_shape, packed, scheme, n_rows, block_size, *args, out_shape=None, **kwargs) -> int:
    M, K = math.prod(x_shape[:-1]), x_shape[-1]
    return 2 * M * K * n_rows + dequantize_flops(scheme, n_rows, K, block_size)


def _frozen_dgrad_flops(grad_shape, packed, scheme, n_cols, block_size, *args, out_shape=None, **kwargs) -> int:
    M, N = math.prod(grad_shape[:-1]), grad_shape[-1]
    return 2 * M * N * n_cols + dequantize_flops(scheme, N, n_cols, block_size)


def _qgated_shapes(adapters) -> tuple:
    """(W_gate, W_up, W_down) shapes from (A_g, B_g, A_u, B_u, A_d, B_d) shapes: W is (B rows, A columns)."""
    return tuple((adapters[2 * i + 1][0], adapters[2 * i][1]) for i in range(3))


def _qgated_forward_flops(x_shape, packed_g, packed_u, packed_d, scheme_g, scheme_u, scheme_d, block_sizes,
                          *args, out_shape=None, **kwargs) -> int:
    from lowcost.plan.flops import _gated_forward
    adapters = args[:6]
    w = _qgated_shapes(adapters)
    dense = _gated_forward(x_shape, w[0], adapters[0], adapters[1], w[1], adapters[2], adapters[3], w[2],
                           adapters[4])
    return dense + sum(dequantize_flops(sc, *shape, b) for sc, shape, b in
                       zip((scheme_g, scheme_u, scheme_d), w, block_sizes))


def _qgated_backward_flops(grad_shape, x_shape, packed_g, packed_u, packed_d, scheme_g, scheme_u, scheme_d,
                           block_sizes, *args, out_shape=None, **kwargs) -> int:
    from lowcost.plan.flops import _gated_backward
    adapters, needs = args[:6], args[15]   # after A/B × 3, the 5 saved outputs, scales, dropouts, seeds, activation
    w = _qgated_shapes(adapters)
    dense = _gated_backward(grad_shape, x_shape, w[0], adapters[0], adapters[1], w[1], adapters[2], adapters[3],
                            w[2], adapters[4], adapters[5], None, None, None, None, None, None, None, None, None,
                            needs)
    decoded = (bool(needs[0]), bool(needs[0]), True)   # gate's and up's W for dx; down's for dh always
    return dense + sum(dequantize_flops(sc, *shape, b) for sc, shape, b, on in
                       zip((scheme_g, scheme_u, scheme_d), w, block_sizes, decoded) if on)


def _qgrouped_weights(x_shape, schemes: str, block_sizes, b_shapes) -> list[tuple]:
    """(scheme, (N_i, K), block size) per projection: N_i from B_i's rows, K from x."""
    K = x_shape[-1]
    return [(sc, (b[0], K), bs) for sc, bs, b in zip(schemes.split(","), block_sizes, b_shapes)]


def _qgrouped_forward_flops(x_shape, packed, counts, schemes, block_sizes, a_shapes, b_shapes, *args,
                            out_shape=None, **kwargs) -> int:
    from lowcost.plan.flops import _grouped_forward
    weights = _qgrouped_weights(x_shape, schemes, block_sizes, b_shapes)
    return (_grouped_forward(x_shape, [shape for _, shape, _ in weights], a_shapes)
            + sum(dequantize_flops(sc, *shape, bs) for sc, shape, bs in weights))


def _qgrouped_backward_flops(grad_shapes, x_shape, packed, counts, schemes, block_sizes, a_shapes, b_shapes,
                             u_shapes, has_bias, scales, dropouts, seeds, needs, *args, out_shape=None,
                             **kwargs) -> int:
    from lowcost.plan.flops import _grouped_backward
    weights = _qgrouped_weights(x_shape, schemes, block_sizes, b_shapes)
    dense = _grouped_backward(grad_shapes, x_shape, [shape for _, shape, _ in weights], a_shapes, b_shapes, u_shapes,
                              has_bias, scales, dropouts, seeds, needs)
    return dense + (sum(dequantize_flops(sc, *shape, bs) for sc, shape, bs in weights) if needs[0] else 0)


def flop_formulas() -> dict:
    """The quantized ops → their FLOP formulas (for ``FlopCounterMode(custom_mapping=...)``)."""
    import lowcost.ops  # noqa: F401  (registers torch.ops.lowcost.*)
    ops = torch.ops.lowcost
    return {ops.qlora_linear: _qlora_forward_flops, ops.qlora_linear_backward: _qlora_backward_flops,
            ops.quantized_linear: _frozen_forward_flops, ops.quantized_linear_dgrad: _frozen_dgrad_flops,
            ops.qlora_gated_mlp: _qgated_forward_flops, ops.qlora_gated_mlp_backward: _qgated_backward_flops,
            ops.qlora_grouped_linear: _qgrouped_forward_flops,
            ops.qlora_grouped_linear_backward: _qgrouped_backward_flops}
