"""The quantized base in a plan: the weights quantized on the meta device, and the workspace and FLOPs of the
ops that dequantize them (``lowcost::qlora_linear``, ``lowcost::quantized_linear`` and their backward ops),
which no dispatch mode sees inside; and the fused gated MLP on quantized weights (``lowcost::qlora_gated_mlp``
and its backward): the dense fused MLP's workspace and FLOPs plus the largest projection's dequantized block and
each W's decode.

Weights. ``quantize_base`` runs the real ``lowcost.quantize`` (the selection ``load_pretrained(quantize=...)``
makes: every linear layer but the output head) on the meta-device model: the quantizers only shape their
outputs there, so the codes and scales come out with their exact shapes and dtypes and the plan's weight bytes
are ``QuantReport.bytes`` plus the layers left dense, with no 8B weights quantized for real.

Workspace of the torch backend (``lowcost/reference/qlora_linear.py``): W (N, K) is dequantized R rows at a
time, R = min(N, max(1, ``ROW_CHUNK_ELEMENTS`` // K)). With x: (M, K), s the bytes of x's dtype, Kp the
NF4-padded width, p the dropout probability:

dequantizing R rows (the returned block included):
    nf4, nf4-dq: the uint8 indices, their int64 copy and the float32 values: 13·R·Kp (the absmax is R·Kp/B·4,
                 left out), then the float32 block and its cast to x's dtype (4·R·Kp + s·R·K when s ≠ 4);
    int8:        the float32 copy of the codes and its scaled product: 8·R·K (a cast adds no more);
    GGUF blocks: not modelled beyond the float32 block and its cast (4·R·K + s·R·K); plan does not offer them.
the block's GEMM:  the held block (4·R·Kp for float32 NF4, a view of the padded buffer; else s·R·K) plus the
                   (M, R) product before it is copied into y: + M·R·s (forward); + M·K·s for 16-bit dgrad
                   (``dx += g[:, c] W[c]``; float32 accumulates in place).
chunk = max(dequantizing, the block's GEMM).

forward, x float32:   (M·K·s when p>0: x̃) + chunk.
forward, x 16-bit:    x̃ (M·K·s·[p>0]) + max(M·K·4 (x̃ in fp32 while u forms), M·N·4 (y in fp32) + chunk).
backward, x float32:  x̃ for dA (M·K·s·[p>0]) + when dx is wanted max(M·K·s·[p>0] (the dropped-out du·A next to
                      the undropped one), chunk); du·A itself becomes the output dx.
backward, x 16-bit:   g in fp32 (M·N·4) + x̃ (M·K·s·[p>0], for dA) + max(M·K·4 (x̃ in fp32, for dA),
                      M·K·4 (du·A, the fp32 dx) + max(M·K·4·[p>0], chunk)) when dx is wanted.
frozen layer:         forward chunk (+ M·N·4, the fp32 y, for 16-bit x); dgrad chunk (+ M·K·4 for 16-bit).

The Triton kernels decode a tile of W in registers and shared memory inside the GEMM loop: no global memory
beyond their outputs, so the torch figure above is an upper bound for them.

FLOPs: the LoRA linear's (``flops.py``) plus the dequantization, counted as one multiply per weight element
(code value × its scale) each time W is decoded (the forward, and the dgrad when dx is wanted), plus 2 per
block for the double-quantized absmax (a' = DYNAMIC[q]·m + c).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowcost.reference.qlora_linear import ROW_CHUNK_ELEMENTS
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


# ----------------------------------------------------------------------------------------------- workspace
def _chunk_rows(N: int, K: int) -> int:
    return min(N, max(1, ROW_CHUNK_ELEMENTS // max(K, 1)))


def _dequantizing(scheme: str, block_size: int, R: int, K: int, s: int) -> int:
    cast = s * R * K if s != 4 else 0
    if scheme.startswith("nf4"):
        Kp = padded_width(K, block_size)
        return max(13 * R * Kp, 4 * R * Kp + cast)
    if scheme == "int8":
        return 8 * R * K
    return 4 * R * K + cast


def _held(scheme: str, block_size: int, R: int, K: int, s: int) -> int:
    if scheme.startswith("nf4") and s == 4:
        return 4 * R * padded_width(K, block_size)
    return s * R * K


def _chunk(scheme: str, block_size: int, M: int, N: int, K: int, s: int, dgrad: bool) -> int:
    R = _chunk_rows(N, K)
    product = (M * K * s if s != 4 else 0) if dgrad else M * R * s
    return max(_dequantizing(scheme, block_size, R, K, s), _held(scheme, block_size, R, K, s) + product)


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    return math.prod(x.shape[:-1]), x.shape[-1], x.element_size()


def _qlora_forward(args) -> int:
    x, _, scheme, N, block_size = args[:5]
    dropout = args[9]
    M, K, s = _sizes(x)
    tilde = M * K * s if dropout > 0 else 0
    chunk = _chunk(scheme, block_size, M, N, K, s, dgrad=False)
    if s >= 4:
        return tilde + chunk
    return tilde + max(M * K * 4, M * N * 4 + chunk)


def _qlora_backward(args) -> int:
    grad_y, x, _, scheme, block_size = args[:5]
    dropout, needs = args[9], args[12]
    M, K, s = _sizes(x)
    N = grad_y.shape[-1]
    need_dx, need_da = bool(needs[0]), bool(needs[1])
    tilde = M * K * s if dropout > 0 and need_da else 0
    chunk = _chunk(scheme, block_size, M, N, K, s, dgrad=True) if need_dx else 0
    if s >= 4:
        return tilde + (max(M * K * s if dropout > 0 else 0, chunk) if need_dx else 0)
    dx_phase = M * K * 4 + max(M * K * 4 if dropout > 0 else 0, chunk) if need_dx else 0
    return M * N * 4 + tilde + max(M * K * 4 if need_da else 0, dx_phase)


def _frozen_forward(args) -> int:
    x, _, scheme, N, block_size = args[:5]
    M, K, s = _sizes(x)
    return _chunk(scheme, block_size, M, N, K, s, dgrad=False) + (M * N * 4 if s < 4 else 0)


def _frozen_dgrad(args) -> int:
    grad_y, _, scheme, K, block_size = args[:5]
    M, N, s = _sizes(grad_y)
    return _chunk(scheme, block_size, M, N, K, s, dgrad=True) + (M * K * 4 if s < 4 else 0)


def _qgated_projections(args, first: int) -> list[tuple[str, int, int, int]]:
    """(scheme, block size, N, K) of gate, up and down from the fused quantized MLP's arguments, the stored
    tensors' list at ``first`` (forward: 1, backward: 2); N, K from the adapters (B is (N, r), A is (r, K))."""
    schemes, blocks = args[first + 3:first + 6], args[first + 6]
    a_b = args[first + 7:first + 13]
    return [(schemes[i], blocks[i], a_b[2 * i + 1].shape[0], a_b[2 * i].shape[1]) for i in range(3)]


def _qgated_forward(args) -> int:
    """The dense fused MLP's act(gate), h (and D⊙h) while down runs, plus the largest projection's block of
    dequantized rows (and its fp32 output for 16-bit x)."""
    x, dropouts = args[0], args[15]
    M, _, s = _sizes(x)
    projections = _qgated_projections(args, 1)
    inter = projections[0][2]
    chunk = max(_chunk(sc, b, M, N, K, s, dgrad=False) + (M * N * 4 if s < 4 else 0) for sc, b, N, K in projections)
    return (2 + int(dropouts[2] > 0)) * M * inter * s + chunk


def _qgated_backward(args) -> int:
    """The dense fused MLP backward's act(gate), h, dh and the activation's temporaries (5·M·I·s), plus the
    largest projection's dgrad block (and the fp32 dx accumulator for 16-bit x)."""
    x = args[1]
    M, _, s = _sizes(x)
    projections = _qgated_projections(args, 2)
    inter = projections[0][2]
    chunk = max(_chunk(sc, b, M, N, K, s, dgrad=True) + (M * K * 4 if s < 4 else 0) for sc, b, N, K in projections)
    return 5 * M * inter * s + chunk


WORKSPACE_MODELS = {"lowcost::qlora_linear": _qlora_forward, "lowcost::qlora_linear_backward": _qlora_backward,
                    "lowcost::quantized_linear": _frozen_forward, "lowcost::quantized_linear_dgrad": _frozen_dgrad,
                    "lowcost::qlora_gated_mlp": _qgated_forward, "lowcost::qlora_gated_mlp_backward": _qgated_backward}


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
    adapters, needs = args[:6], args[-1]
    w = _qgated_shapes(adapters)
    dense = _gated_backward(grad_shape, x_shape, w[0], adapters[0], adapters[1], w[1], adapters[2], adapters[3],
                            w[2], adapters[4], adapters[5], None, None, None, None, None, None, None, None, None,
                            needs)
    decoded = (bool(needs[0]), bool(needs[0]), True)   # gate's and up's W for dx; down's for dh always
    return dense + sum(dequantize_flops(sc, *shape, b) for sc, shape, b, on in
                       zip((scheme_g, scheme_u, scheme_d), w, block_sizes, decoded) if on)


def flop_formulas() -> dict:
    """The quantized ops → their FLOP formulas (for ``FlopCounterMode(custom_mapping=...)``)."""
    import lowcost.ops  # noqa: F401  (registers torch.ops.lowcost.*)
    ops = torch.ops.lowcost
    return {ops.qlora_linear: _qlora_forward_flops, ops.qlora_linear_backward: _qlora_backward_flops,
            ops.quantized_linear: _frozen_forward_flops, ops.quantized_linear_dgrad: _frozen_dgrad_flops,
            ops.qlora_gated_mlp: _qgated_forward_flops, ops.qlora_gated_mlp_backward: _qgated_backward_flops}
