"""The workspace of the torch backend's ops on a quantized weight: the bytes each op call allocates and frees
inside itself, on top of its outputs (``lowcost::qlora_linear``, ``lowcost::quantized_linear``,
``lowcost::qlora_gated_mlp``, ``lowcost::qlora_grouped_linear`` and their backward ops), which no dispatch mode
sees. Every figure is the peak of the live bytes the op's own Python code creates
(``lowcost/reference/qlora_linear.py``, ``lowcost/reference/lora_gated_mlp.py``,
``lowcost/reference/lora_grouped_linear.py``, the decoders of ``lowcost/reference/quant``), followed statement by
statement, minus the op's outputs; ``tests/plan/test_plan_decode_workspace.py`` checks it equals the measured
peak, byte for byte, for every format, dtype and dropout setting on odd shapes.

Notation: x (M, K), W (N, K), rank r; s the bytes of x's dtype; a the accumulation dtype's bytes (4, or 8 for
float64 x); "16-bit" means x is neither float32 nor float64 (products then go through float32 temporaries).

Decoding R rows (``lowcost.ops._quant_backends._rows``). Each op call's row source allocates one float32
workspace at its first (largest) block of R = min(N, max(1, ``ROW_CHUNK_ELEMENTS`` // K)) rows and keeps it
until the op returns: Ws = 4·R·K (4·R·Kp for NF4, Kp the block-padded width). A decode then holds, next to
Ws, the temporaries T(R) (for the GGUF formats n = R·K / block, the number of blocks decoded):
    nf4:    the packed bytes as int32 indices for the byte table: 2·R·Kp;
    nf4-dq: max(2·R·Kp, 8·N + 8·R (the row indices), 24·R·Kp/B (the 8-bit absmax decoded));
    int8:   0 (the codes are copied into Ws and scaled in place);
    q8_0:   6·n (the float16 scale read as a word, then as float32);
    q4_0:   80·n (the nibble split of 16 bytes: copy, low, high and their interleave, 5 bytes per byte);
    q4_1:   8·n (d and m as float32) + 80·n;
    q4_k:   88·n (6-bit scales and mins, d and dmin, the 8 sub-block scales and offsets) + 640·n (the split
            of 128 bytes);
    q6_k:   64·n (the 16 group scales) + 640·n.
A block for x not float32 is cast to x's dtype: C(R) = s·R·K. The row loop then peaks at
    Ws + max(T(R), C(R) + P, C(R) + max(T(R2), C(R2)) when N > R),  R2 = min(R, N - R),
P the 16-bit GEMM's product (M·R·s forward; M·K·s dgrad, ``dx += g[:, c] W[c]``; 0 for float32, whose GEMMs
write in place): the previous block's cast is alive while the next decodes.

Around the loop each op's own temporaries are followed the same way (the dropped-out x̃, the float32 copies of
x, g and the adapters for 16-bit x, the float32 y or dx before the rounding, du, the low-rank term of dx), see
the functions below; the fused MLP adds act(gate), h, dh, dgate and dup, and keeps the three projections'
workspaces, each from its first decode to the end of the op call.

Grouped projections (P projections of x (M, K): W_i (N_i, K), rank r_i; each keeps its Ws_i from its first
decode to the end of the op call). Forward: the P LoRA linears' forwards in turn, projection i on top of
Σ_{j<i} (Ws_j + y_j + u_j). Backward, per projection i on top of what the previous ones left: g_i in the
accumulation dtype (a·M·N_i for 16-bit x), dB_i, dbias_i, the row loop of g_i W_i into dx (a·M·K zeros made by
the first projection; the loop's P is M·K·s), du_i (a·M·r_i), then with dx wanted A_i in the accumulation
dtype and, p_i = 0, du_i A_i added in place, or p_i > 0, du_i A_i formed in one (M, K) scratch (a·M·K, made
by the first projection with dropout and reused) and masked in place while x̃_i (M·K·s) is made for dA_i, or
copied masked (a·M·K) without dA; without dx, x̃_i and dA_i. The previous projection's g_i, du_i and x̃_i are
freed only when the next one's exist (their names are rebound); dx is rounded to x's dtype last (M·K·s).

Dropout is the ``lowcost::philox_dropout`` kernel's (no temporaries); float64 x (tests only) drops out through
the pure-torch Philox reference instead, whose temporaries are left out.

The Triton kernels decode a tile of W in registers and shared memory inside the GEMM loop: no global memory
beyond their outputs, so this torch figure is an upper bound for them.
"""
from __future__ import annotations

import math

import torch

from lowcost.reference import qlora_linear
from lowcost.reference.quant import padded_width

# bytes held per GGUF block while its rows decode (module docstring): (kept fields) + 5 per split byte
GGUF_DECODE_BYTES_PER_BLOCK = {"q8_0": (32, 6), "q4_0": (32, 80), "q4_1": (32, 8 + 80), "q4_k": (256, 88 + 640),
                               "q6_k": (256, 64 + 640)}


def chunk_rows(N: int, K: int) -> int:
    """Rows of W per block of the row loop (``lowcost.reference.qlora_linear.row_chunks``)."""
    return min(N, max(1, qlora_linear.ROW_CHUNK_ELEMENTS // max(K, 1)))   # read at call time, as row_chunks does


def decode_bytes(scheme: str, block_size: int, N: int, R: int, K: int) -> tuple[int, int]:
    """(Ws, T): the float32 workspace of an R-row block of an (N, K) weight, and the temporaries its decode
    holds next to it (module docstring)."""
    if scheme.startswith("nf4"):
        Kp = padded_width(K, block_size)
        indices = 2 * R * Kp
        if scheme == "nf4-dq":
            indices = max(indices, 8 * N + 8 * R, 24 * R * (Kp // block_size))
        return 4 * R * Kp, indices
    if scheme == "int8":
        return 4 * R * K, 0
    if scheme not in GGUF_DECODE_BYTES_PER_BLOCK:
        raise ValueError(f"no decode workspace model for a {scheme!r} weight")
    block, per_block = GGUF_DECODE_BYTES_PER_BLOCK[scheme]
    return 4 * R * K, per_block * (R * K // block)


def row_loop_peak(scheme: str, block_size: int, M: int, N: int, K: int, dtype: torch.dtype,
                  dgrad: bool) -> tuple[int, int]:
    """(the row loop's peak bytes, the workspace Ws that stays allocated after it): x Wᵀ (forward) or g W
    (``dgrad``) of M rows of x (or g) in ``dtype`` against an (N, K) quantized W."""
    R = chunk_rows(N, K)
    workspace, first = decode_bytes(scheme, block_size, N, R, K)
    s = _itemsize(dtype)
    cast = s * R * K if dtype != torch.float32 else 0
    product = (M * K * s if dgrad else M * R * s) if _low(dtype) else 0
    peak = max(first, cast + product)
    if N > R:
        R2 = min(R, N - R)
        peak = max(peak, cast + max(decode_bytes(scheme, block_size, N, R2, K)[1], s * R2 * K if cast else 0))
    return workspace + peak, workspace


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _low(dtype: torch.dtype) -> bool:
    """x's products go through float32 temporaries (16-bit x)."""
    return dtype not in (torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _copy(numel: int, dtype: torch.dtype, to: torch.dtype) -> int:
    """Bytes of ``t.to(to)`` for a tensor of ``numel`` elements in ``dtype`` (0: no copy)."""
    return numel * _itemsize(to) if dtype != to else 0


def _sizes(x: torch.Tensor) -> tuple[int, int]:
    return math.prod(x.shape[:-1]), x.shape[-1]


# ----------------------------------------------------------------------------------------------- one LoRA linear
def qlora_forward_peak(scheme: str, block_size: int, x: torch.Tensor, N: int, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, has_bias: bool, dropout: float) -> tuple[int, int]:
    """(peak live bytes of ``qlora_linear_forward``, its outputs y and u included; Ws kept after it):
    x̃ (p > 0), then u = x̃ Aᵀ (x̃ and A copied to the accumulation dtype first), then y (float32 for 16-bit
    x) and the row loop, then s·u Bᵀ added (B copied), the bias added and y rounded to x's dtype."""
    M, K = _sizes(x)
    acc, low, r = _acc(x.dtype), _low(x.dtype), lora_a.shape[0]
    a = _itemsize(acc)
    tilde = M * K * x.element_size() if dropout > 0 else 0
    u = M * r * a
    forming_u = tilde + _copy(M * K, x.dtype, acc) + _copy(r * K, lora_a.dtype, acc) + u
    y = M * N * (a if low else x.element_size())
    loop, workspace = row_loop_peak(scheme, block_size, M, N, K, x.dtype, dgrad=False)
    after = tilde + u + y + workspace
    phases = [forming_u, tilde + u + y + loop, after + _copy(N * r, lora_b.dtype, acc)]
    if low:
        phases += [after + (N * a if has_bias else 0), after + M * N * x.element_size()]
    return max(phases), workspace


def _dropped_copy(low_rank: int, with_x_tilde: bool) -> int:
    """Bytes alive while the dropout masks du A (``low_rank`` bytes, 0 when dx is not wanted): with x̃ wanted
    too, ``philox_dropout_pair_`` makes x̃ and masks du A in place; alone, ``philox_dropout`` copies it."""
    return low_rank if with_x_tilde else 2 * low_rank


def _db_step(held: int, N: int, lora_b: torch.Tensor, acc: torch.dtype) -> tuple[int, int]:
    """(live bytes while dB = s·gᵀu (N, r) is formed in the accumulation dtype and rounded to B's dtype, dB's
    bytes) on top of ``held``."""
    db_out = N * lora_b.shape[1] * lora_b.element_size()
    return held + N * lora_b.shape[1] * _itemsize(acc) + (db_out if lora_b.dtype != acc else 0), db_out


def _da_steps(held: int, x: torch.Tensor, lora_a: torch.Tensor) -> tuple[list[int], int]:
    """(the live bytes of dA = duᵀx̃ (r, K) on top of ``held`` (x̃ included there): x̃ copied to the
    accumulation dtype next to the product, then the product rounded to A's dtype; dA's bytes)."""
    M, K = _sizes(x)
    acc = _acc(x.dtype)
    product = lora_a.shape[0] * K * _itemsize(acc)
    da_out = lora_a.shape[0] * K * lora_a.element_size()
    return [held + _copy(M * K, x.dtype, acc) + product, held + product + (da_out if lora_a.dtype != acc else 0)], \
        da_out


def qlora_backward_peak(scheme: str, block_size: int, grad_y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, dropout: float, needs) -> tuple[int, int]:
    """(peak live bytes of ``qlora_linear_backward`` (``adapter_backward``), outputs included; Ws kept after
    it): g in the accumulation dtype, dB, du = s·g B, the low-rank term du A of dx, x̃ made and the term
    masked in place together (``_dropped_copy``), dA = duᵀx̃ (x̃ then freed), the row loop summing g W into
    the low-rank term, its rounding to x's dtype, then dbias."""
    need_dx, need_da, need_db, need_dbias = (bool(n) for n in needs)
    M, K = _sizes(x)
    N = grad_y.shape[-1]
    acc, low, r, s = _acc(x.dtype), _low(x.dtype), lora_a.shape[0], x.element_size()
    a = _itemsize(acc)
    base = _copy(M * N, grad_y.dtype, acc)
    phases, workspace = [base], 0
    if need_db:
        phase, db_out = _db_step(base, N, lora_b, acc)
        phases.append(phase)
        base += db_out
    if need_dx or need_da:
        phases.append(base + _copy(N * r, lora_b.dtype, acc) + M * r * a)
        base += M * r * a
    low_rank = M * K * a if need_dx else 0
    if need_dx:
        phases.append(base + _copy(r * K, lora_a.dtype, acc) + low_rank)
    tilde = M * K * s if dropout > 0 and need_da else 0
    if dropout > 0:
        phases.append(base + tilde + _dropped_copy(low_rank, need_da))
    base += low_rank
    if need_da:
        steps, da_out = _da_steps(base + tilde, x, lora_a)
        phases += steps
        base += da_out                                   # x̃ freed once dA exists
    if need_dx:
        loop, workspace = row_loop_peak(scheme, block_size, M, N, K, grad_y.dtype, dgrad=True)
        phases.append(base + loop)
        base += workspace + _copy(M * K, acc, x.dtype)
        phases.append(base)
    if need_dbias:
        phases.append(base + N * a + _copy(N, acc, x.dtype))
    return max(phases), workspace


def qlora_backward_outputs(x: torch.Tensor, N: int, lora_a: torch.Tensor, lora_b: torch.Tensor, needs) -> int:
    M, K = _sizes(x)
    r = lora_a.shape[0]
    sizes = (M * K * x.element_size(), r * K * lora_a.element_size(), N * r * lora_b.element_size(),
             N * x.element_size())
    return sum(n for n, need in zip(sizes, needs) if need)


# ----------------------------------------------------------------------------------------------- frozen layer
def frozen_forward_peak(scheme: str, block_size: int, x: torch.Tensor, N: int, has_bias: bool) -> int:
    """``quantized_linear_forward``: y (float32 for 16-bit x), the row loop, then the bias and the rounding."""
    M, K = _sizes(x)
    loop, workspace = row_loop_peak(scheme, block_size, M, N, K, x.dtype, dgrad=False)
    if not _low(x.dtype):
        return M * N * x.element_size() + loop
    y = 4 * M * N
    return max(y + loop, y + workspace + (4 * N if has_bias else 0), y + workspace + M * N * x.element_size())


def frozen_dgrad_peak(scheme: str, block_size: int, grad_y: torch.Tensor, K: int) -> int:
    """``quantized_base_dgrad``: dx zeros in the accumulation dtype, the row loop, then the rounding."""
    M, N = _sizes(grad_y)
    acc = _acc(grad_y.dtype)
    dx = M * K * _itemsize(acc)
    loop, workspace = row_loop_peak(scheme, block_size, M, N, K, grad_y.dtype, dgrad=True)
    return max(dx + loop, dx + workspace + _copy(M * K, acc, grad_y.dtype))


# ----------------------------------------------------------------------------------------------- fused gated MLP
def _rows_like(x: torch.Tensor, width: int) -> torch.Tensor:
    """A meta tensor of x's rows and dtype with ``width`` columns (h, dh: (M, I))."""
    return torch.empty((math.prod(x.shape[:-1]), width), dtype=x.dtype, device="meta")


def gated_forward_peak(x: torch.Tensor, schemes, blocks, adapters, dropouts) -> int:
    """``gated_mlp_forward`` on quantized W: gate, then up (gate's outputs and workspace kept), act(gate) and
    h = act(gate)⊙up, then down on h (the three workspaces live to the end of the op call)."""
    M, H = _sizes(x)
    inter, s, a = adapters[1].shape[0], x.element_size(), _itemsize(_acc(x.dtype))
    kept, phases = 0, []
    for i in range(2):                   # gate, then up, on x
        peak, workspace = qlora_forward_peak(schemes[i], blocks[i], x, inter, adapters[2 * i], adapters[2 * i + 1],
                                             False, dropouts[i])
        phases.append(kept + peak)
        kept += workspace + M * inter * s + M * adapters[2 * i].shape[0] * a    # Ws, gate (up) and u kept
    phases.append(kept + 2 * M * inter * s)                                     # act(gate) and h
    peak, _ = qlora_forward_peak(schemes[2], blocks[2], _rows_like(x, inter), H, adapters[4], adapters[5], False,
                                 dropouts[2])
    phases.append(kept + M * inter * s + peak)                                  # down on h
    return max(phases)


def _adapter_grads_peak(x: torch.Tensor, grad_numel: int, lora_a, lora_b, dropout: float, need_a: bool,
                        need_b: bool, need_dx: bool) -> tuple[list[int], int]:
    """``adapter_grads``: (its phases' live bytes beyond what the caller holds, what stays: dA, dB and dx's
    low-rank term D⊙(du A), made with x̃ by one ``dropout_pair``; g, du and x̃ are freed on return)."""
    M, K = _sizes(x)
    acc, r = _acc(x.dtype), lora_a.shape[0]
    a = _itemsize(acc)
    N = grad_numel // M
    g = _copy(grad_numel, x.dtype, acc)
    du = M * r * a
    phases = [g + _copy(N * r, lora_b.dtype, acc) + du]
    held, kept = g + du, 0
    if need_b:
        phase, db_out = _db_step(held, N, lora_b, acc)
        phases.append(phase)
        held, kept = held + db_out, kept + db_out
    low_rank = M * K * a if need_dx else 0
    if need_dx:
        phases.append(held + _copy(lora_a.numel(), lora_a.dtype, acc) + low_rank)
    tilde = M * K * x.element_size() if dropout > 0 and need_a else 0
    if dropout > 0:
        phases.append(held + tilde + _dropped_copy(low_rank, need_a))
    held, kept = held + low_rank, kept + low_rank
    if need_a:
        steps, da_out = _da_steps(held + tilde, x, lora_a)
        phases += steps
        kept += da_out
    return phases, kept


def gated_backward_peak(grad_y: torch.Tensor, x: torch.Tensor, schemes, blocks, adapters, dropouts, needs) -> int:
    """``gated_mlp_backward`` on quantized W: act(gate) and h, down's backward (dh), dh⊙up and dgate, dup,
    gate's and up's adapter gradients (each keeping its dropped-out low-rank term of dx), then dx: its float32
    accumulator, gate's and up's row loops (their workspaces kept) and the rounding."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = (bool(n) for n in needs)
    M, H = _sizes(x)
    inter, s = adapters[1].shape[0], x.element_size()
    acc = _acc(x.dtype)
    a = _itemsize(acc)
    mi = M * inter * s
    h = _rows_like(x, inter)
    down_needs = (True, need_ad, need_bd, False)
    peak, w_down = qlora_backward_peak(schemes[2], blocks[2], grad_y, h, adapters[4], adapters[5], dropouts[2],
                                       down_needs)
    phases = [2 * mi + peak]
    base = w_down + qlora_backward_outputs(h, H, adapters[4], adapters[5], down_needs) - mi   # dh counted below
    phases.append(base + 4 * mi)         # act(gate), dh, dh⊙up, dgate; then dup while dh, act(gate) live
    base += 2 * mi                       # dgate, dup
    for i, (need_a, need_b) in enumerate(((need_ag, need_bg), (need_au, need_bu))):
        steps, kept = _adapter_grads_peak(x, M * inter, adapters[2 * i], adapters[2 * i + 1], dropouts[i],
                                          need_a, need_b, need_dx)
        phases += [base + step for step in steps]
        base += kept                     # with dx wanted: the two low-rank terms, kept to the end
    if need_dx:
        base += M * H * a                # the accumulator; the low-rank terms are added in place
        phases.append(base)
        for i in range(2):
            loop, workspace = row_loop_peak(schemes[i], blocks[i], M, inter, H, x.dtype, dgrad=True)
            phases.append(base + loop)
            base += workspace
        phases.append(base + _copy(M * H, acc, x.dtype))
    return max(phases)


def gated_outputs(x: torch.Tensor, adapters, needs=None) -> int:
    """Bytes of the fused MLP's outputs: forward (needs None) y, gate, up and the u's; backward dx, dA's, dB's."""
    M, H = _sizes(x)
    inter, s = adapters[1].shape[0], x.element_size()
    if needs is None:
        u = sum(M * adapters[2 * i].shape[0] * _itemsize(_acc(x.dtype)) for i in range(3))
        return M * H * s + 2 * M * inter * s + u
    sizes = [M * H * s] + [t.numel() * t.element_size() for t in adapters]
    return sum(n for n, need in zip(sizes, needs) if need)


# ----------------------------------------------------------------------------------------------- grouped projections
def grouped_forward_peak(x: torch.Tensor, schemes, blocks, lora_as, lora_bs, has_bias, dropouts) -> int:
    """``grouped_forward`` on quantized W_i: the P LoRA linears' forwards one after the other, each y_i, u_i and
    workspace Ws_i kept (a projection's row source lives to the end of the op call)."""
    M = math.prod(x.shape[:-1])
    a = _itemsize(_acc(x.dtype))
    kept, phases = 0, []
    for scheme, block, lora_a, lora_b, bias, dropout in zip(schemes, blocks, lora_as, lora_bs, has_bias, dropouts):
        N = lora_b.shape[0]
        peak, workspace = qlora_forward_peak(scheme, block, x, N, lora_a, lora_b, bias, dropout)
        phases.append(kept + peak)
        kept += workspace + M * N * x.element_size() + M * lora_a.shape[0] * a
    return max(phases)


def _grouped_low_rank(held: int, x: torch.Tensor, lora_a: torch.Tensor, dropout: float, need_da: bool,
                      scratch: int) -> tuple[list[int], int]:
    """``_add_low_rank`` (dx += D⊙(du A), dA = duᵀx̃): (its phases' live bytes on top of ``held``, the bytes
    that stay: dA and, when it is made here, the (M, K) scratch). A copied to the accumulation dtype; p = 0:
    du A added by ``addmm_`` in place; p > 0: du A formed in the scratch (allocated by the first projection
    with dropout, ``scratch`` 0 until then, reused by the others), then x̃ made with the scratch masked in
    place (dA wanted) or a masked copy of it (dA not wanted), added into dx."""
    M, K = _sizes(x)
    acc = _acc(x.dtype)
    held += _copy(lora_a.numel(), lora_a.dtype, acc)
    kept = 0
    if dropout > 0 and not scratch:
        kept = M * K * _itemsize(acc)
        held += kept
    phases = [held]
    tilde = 0
    if dropout > 0:
        tilde = M * K * x.element_size() if need_da else 0
        phases.append(held + (tilde if need_da else M * K * _itemsize(acc)))
    if need_da:
        steps, da_out = _da_steps(held + tilde, x, lora_a)
        phases += steps
        kept += da_out
    return phases, kept


def grouped_backward_peak(grads, x: torch.Tensor, schemes, blocks, lora_as, lora_bs, has_bias, dropouts,
                          needs) -> int:
    """``grouped_backward`` on quantized W_i, per projection: g_i in the accumulation dtype, dB_i, dbias_i, the
    row loop summing g_i W_i into dx (zeros made by the first; Ws_i kept), du_i, then dx += D_i⊙(du_i A_i) and
    dA_i (``_grouped_low_rank``), or x̃_i and dA_i without dx; finally dx rounded to x's dtype. The previous
    projection's g_i, du_i and x̃_i stay alive until their names are rebound, after the next one's are made."""
    need_dx, need_da, need_db, need_dbias = (bool(n) for n in needs)
    M, K = _sizes(x)
    acc, s = _acc(x.dtype), x.element_size()
    a = _itemsize(acc)
    base, phases = 0, []
    g_held = du_held = tilde_held = scratch = 0
    projections = zip(grads, schemes, blocks, lora_as, lora_bs, has_bias, dropouts)
    for i, (g, scheme, block, lora_a, lora_b, bias, dropout) in enumerate(projections):
        N, r = g.shape[-1], lora_a.shape[0]
        g_acc = _copy(M * N, g.dtype, acc)
        phases.append(base + g_acc)
        base, g_held = base + g_acc - g_held, g_acc
        if need_db:
            phase, db_out = _db_step(base, N, lora_b, acc)
            phases.append(phase)
            base += db_out
        if need_dbias and bias:
            phases.append(base + N * a + _copy(N, acc, x.dtype))
            base += N * s
        if need_dx:
            if i == 0:
                base += M * K * a        # dx: the zeroed accumulator the first projection's row loop starts
            loop, workspace = row_loop_peak(scheme, block, M, N, K, g.dtype, dgrad=True)
            phases.append(base + loop)
            base += workspace
        if need_dx or need_da:
            du = M * r * a
            phases.append(base + _copy(N * r, lora_b.dtype, acc) + du)
            base, du_held = base + du - du_held, du
        if need_dx:
            steps, kept = _grouped_low_rank(base, x, lora_a, dropout, need_da, scratch)
            scratch = scratch or (M * K * a if dropout > 0 else 0)
        elif need_da:
            tilde = M * K * s if dropout > 0 else 0
            phases.append(base + tilde)
            base, tilde_held = base + tilde - tilde_held, tilde
            steps, kept = _da_steps(base, x, lora_a)
        else:
            steps, kept = [], 0
        phases += steps
        base += kept
    if need_dx:
        phases.append(base + _copy(M * K, acc, x.dtype))
    return max(phases)


def grouped_outputs(x: torch.Tensor, lora_as, lora_bs, has_bias, needs=None) -> int:
    """Bytes of the grouped op's outputs: forward (needs None) the y_i and u_i; backward dx, the dA_i, dB_i and
    the dbias_i of the projections with a bias."""
    M, K = _sizes(x)
    s = x.element_size()
    if needs is None:
        a = _itemsize(_acc(x.dtype))
        return sum(M * b.shape[0] * s + M * a_.shape[0] * a for a_, b in zip(lora_as, lora_bs))
    need_dx, need_da, need_db, need_dbias = (bool(n) for n in needs)
    return (M * K * s * need_dx + sum(t.numel() * t.element_size() for t in lora_as) * need_da
            + sum(t.numel() * t.element_size() for t in lora_bs) * need_db
            + sum(b.shape[0] * s for b, bias in zip(lora_bs, has_bias) if bias) * need_dbias)


# ----------------------------------------------------------------------------------------------- the op models
def _qlora_forward(args) -> int:
    x, _, scheme, N, block_size, lora_a, lora_b, bias, _, dropout = args[:10]
    peak, _ = qlora_forward_peak(scheme, block_size, x, N, lora_a, lora_b, bias is not None, dropout)
    M = math.prod(x.shape[:-1])
    return peak - M * N * x.element_size() - M * lora_a.shape[0] * _itemsize(_acc(x.dtype))


def _qlora_backward(args) -> int:
    grad_y, x, _, scheme, block_size, lora_a, lora_b, _, _, dropout = args[:10]
    needs = args[12]
    peak, _ = qlora_backward_peak(scheme, block_size, grad_y, x, lora_a, lora_b, dropout, needs)
    return max(0, peak - qlora_backward_outputs(x, grad_y.shape[-1], lora_a, lora_b, needs))


def _frozen_forward(args) -> int:
    x, _, scheme, N, block_size, bias = args[:6]
    return frozen_forward_peak(scheme, block_size, x, N, bias is not None) - math.prod(x.shape[:-1]) * N * \
        x.element_size()


def _frozen_dgrad(args) -> int:
    grad_y, _, scheme, K, block_size = args[:5]
    return frozen_dgrad_peak(scheme, block_size, grad_y, K) - math.prod(grad_y.shape[:-1]) * K * \
        grad_y.element_size()


def _qgated_forward(args) -> int:
    x, schemes, blocks, adapters, dropouts = args[0], args[4:7], args[7], args[8:14], args[15]
    return gated_forward_peak(x, schemes, blocks, adapters, dropouts) - gated_outputs(x, adapters)


def _qgated_backward(args) -> int:
    grad_y, x, schemes, blocks, adapters = args[0], args[1], args[5:8], args[8], args[9:15]
    dropouts, needs = args[21], args[24]
    peak = gated_backward_peak(grad_y, x, schemes, blocks, adapters, dropouts, needs)
    return max(0, peak - gated_outputs(x, adapters, needs))


def _qgrouped_forward(args) -> int:
    x, schemes, blocks, lora_as, lora_bs, has_bias, dropouts = args[0], args[3], args[4], args[5], args[6], \
        args[8], args[10]
    peak = grouped_forward_peak(x, schemes.split(","), blocks, lora_as, lora_bs, has_bias, dropouts)
    return peak - grouped_outputs(x, lora_as, lora_bs, has_bias)


def _qgrouped_backward(args) -> int:
    grads, x, schemes, blocks, lora_as, lora_bs = args[0], args[1], args[4], args[5], args[6], args[7]
    has_bias, dropouts, needs = args[9], args[11], args[13]
    peak = grouped_backward_peak(grads, x, schemes.split(","), blocks, lora_as, lora_bs, has_bias, dropouts, needs)
    return max(0, peak - grouped_outputs(x, lora_as, lora_bs, has_bias, needs))


WORKSPACE_MODELS = {"lowcost::qlora_linear": _qlora_forward, "lowcost::qlora_linear_backward": _qlora_backward,
                    "lowcost::quantized_linear": _frozen_forward, "lowcost::quantized_linear_dgrad": _frozen_dgrad,
                    "lowcost::qlora_gated_mlp": _qgated_forward, "lowcost::qlora_gated_mlp_backward": _qgated_backward,
                    "lowcost::qlora_grouped_linear": _qgrouped_forward,
                    "lowcost::qlora_grouped_linear_backward": _qgrouped_backward}
