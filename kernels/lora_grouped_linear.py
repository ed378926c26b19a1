"""Triton kernels of the grouped LoRA projections (``lowcost.reference.lora_grouped_linear`` has the math).

P ≤ MAX_PROJECTIONS projections (q/k/v, gate/up) read one x (M, K); projection i has W_i (N_i, K), A_i (r_i, K),
B_i (N_i, r_i), scale s_i and its own dropout mask D_i (Philox(seed_i), the unfused LoRA linear's stream).

    forward:  u_i = (D_i⊙x) A_iᵀ, su_i = s_i·u_i  for every i     _grouped_u_kernel: ONE pass over x, each x
                                                                   tile masked per projection in registers
              y_i = x W_iᵀ + su_i B_iᵀ + b_i                       the LoRA-linear forward GEMM, per projection
    backward: du_i = s_i·g_i B_i, dB_i, db_i                       the LoRA-linear g-pass, per projection
              dx = Σ_i g_i W_i + Σ_i D_i⊙(du_i A_i)                _grouped_dx_kernel: every projection's terms
                                                                   summed in the tile's fp32 accumulator, one
                                                                   store; no per-projection dx
              dA_i = du_iᵀ (D_i⊙x) for every i                     _grouped_da_kernel: ONE pass over x (fp32
                                                                   per-chunk partials, summed in order by
                                                                   reduce.py)

Dropout is one constexpr for the group (HAS_DROPOUT: any p_i > 0); a projection with p_i = 0 in such a group
gets threshold 0 and keep-scale 1, an all-kept mask, so its tiles are exactly unmasked (``_dropout_slots``).
No atomics: every output element has one writer and every sum has a fixed order, so results are bitwise
reproducible. A projection slot the group does not use (P < 3) is compiled out (the constexpr P).

_grouped_u_kernel, one program per BLOCK_M rows:
    for k0 in range(0, K, BLOCK_K):
        xt = x[rows, k-block]                                       loaded once for all projections
        acc_i += (D_i[rows, k-block] ⊙ xt) @ A_i[:, k-block]ᵀ      i < P, mask regenerated per projection
    u_i[rows] = acc_i;  su_i[rows] = round(s_i·acc_i)              su_i in x's dtype for the y GEMM

_grouped_dx_kernel, one program per (BLOCK_M, BLOCK_N) tile of dx (BLOCK_N columns of K):
    acc = 0
    for i < P:  acc += Σ_n g_i[rows, n-block] @ W_i[n-block, cols]
                acc += D_i[rows, cols] ⊙ Σ_r du_i[rows, r-block] @ A_i[r-block, cols]
    dx[rows, cols] = acc

_grouped_da_kernel, program (c, j): column block c of K, row chunk j:
    for each BLOCK_M rows of chunk j:  xt = x[rows, cols] (once);  da_i += du_i[rows]ᵀ @ (D_i ⊙ xt)   i < P
    da_part_i[j, :, cols] = da_i
  With NORM (1 "llama", 2 "gemma"), x is an RMSNorm's input and xt the norm's output rebuilt in the load from
  the x tile, rstd[rows] and w[cols] (norm_tile.py, bit for bit): no (M, K) normed tensor in backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .lora_linear import _check_norm, _plan_g_pass
from .lora_linear_plan import (BlockConfig, Launch, chunk_length, dot_meta, dropout_args, interpreting, lowrank_buffer,
                               lowrank_operand, plan_fwd_y, plan_reduce, rank_pad, sm_count, split_count)
from .norm_tile import NORM_MODES, normed_tile
from .philox import dropout_multiplier
from .tiles import dot_operand, grouped_tile, load_tile, round_to, tile_mask, tile_ptrs

Tensor = torch.Tensor
MAX_PROJECTIONS = 3
MAX_RANK = 128
RANK_STEP = 16
SLOTS = range(MAX_PROJECTIONS)


# ------------------------------------------------------------------------------------------------ device code
@triton.jit
def _masked(xt, offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT: tl.constexpr,
            MASK_VEC4: tl.constexpr, BLOCK_K: tl.constexpr):
    """D ⊙ xt (float32) for the tile rows ``offs_m`` x columns [k0, k0 + BLOCK_K), or xt without dropout."""
    if HAS_DROPOUT:
        out = xt.to(tl.float32) * dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K,
                                                     MASK_VEC4)
    else:
        out = xt
    return out


@triton.jit
def _u_step(acc, xt, a_ptr, offs_m, k0, K, R, stride_ar, seed_lo, seed_hi, threshold, keep_scale,
            HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
            DT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += (D ⊙ xt) @ A[:, k-block]ᵀ, acc (BLOCK_M, R_PAD) fp32."""
    xm = _masked(xt, offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, MASK_VEC4, BLOCK_K)
    at = load_tile(a_ptr, k0 + tl.arange(0, BLOCK_K), tl.arange(0, R_PAD), 1, stride_ar, K, R)   # Aᵀ tile
    return tl.dot(dot_operand(xm, DT, UPCAST), dot_operand(at, DT, UPCAST), acc, input_precision=DOT_PRECISION)


@triton.jit
def _u_store(acc, u_ptr, su_ptr, offs_m, M, R, stride_um, stride_sm, scale, R_PAD: tl.constexpr,
             EMULATE_RNE: tl.constexpr):
    """u[rows] = acc (fp32) and su[rows] = s·acc rounded to su's dtype."""
    offs_r = tl.arange(0, R_PAD)
    mask = tile_mask(offs_m, offs_r, M, R)
    tl.store(tile_ptrs(u_ptr, offs_m, offs_r, stride_um, 1), acc, mask=mask)
    tl.store(tile_ptrs(su_ptr, offs_m, offs_r, stride_sm, 1), round_to(acc * scale, su_ptr.dtype.element_ty,
                                                                       EMULATE_RNE), mask=mask)


@triton.jit(do_not_specialize=["seed_lo0", "seed_hi0", "threshold0", "seed_lo1", "seed_hi1", "threshold1",
                               "seed_lo2", "seed_hi2", "threshold2"])
def _grouped_u_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, u0_ptr, u1_ptr, u2_ptr, su0_ptr, su1_ptr, su2_ptr,
    M, K, R0, R1, R2,
    stride_xm, stride_xk, stride_a0, stride_a1, stride_a2, stride_u0, stride_u1, stride_u2,
    stride_su0, stride_su1, stride_su2, scale0, scale1, scale2,
    seed_lo0, seed_hi0, threshold0, keep_scale0, seed_lo1, seed_hi1, threshold1, keep_scale1,
    seed_lo2, seed_hi2, threshold2, keep_scale2,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """u_i = (D_i ⊙ x) A_iᵀ (M, R_i) fp32 and su_i = s_i·u_i in x's dtype, i < P, from one pass over x (M, K)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc0 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = load_tile(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), stride_xm, stride_xk, M, K)
        acc0 = _u_step(acc0, xt, a0_ptr, offs_m, k0, K, R0, stride_a0, seed_lo0, seed_hi0, threshold0, keep_scale0,
                       HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
        if P > 1:
            acc1 = _u_step(acc1, xt, a1_ptr, offs_m, k0, K, R1, stride_a1, seed_lo1, seed_hi1, threshold1,
                           keep_scale1, HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
        if P > 2:
            acc2 = _u_step(acc2, xt, a2_ptr, offs_m, k0, K, R2, stride_a2, seed_lo2, seed_hi2, threshold2,
                           keep_scale2, HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    _u_store(acc0, u0_ptr, su0_ptr, offs_m, M, R0, stride_u0, stride_su0, scale0, R_PAD, EMULATE_RNE)
    if P > 1:
        _u_store(acc1, u1_ptr, su1_ptr, offs_m, M, R1, stride_u1, stride_su1, scale1, R_PAD, EMULATE_RNE)
    if P > 2:
        _u_store(acc2, u2_ptr, su2_ptr, offs_m, M, R2, stride_u2, stride_su2, scale2, R_PAD, EMULATE_RNE)


@triton.jit
def _dx_terms(acc, g_ptr, w_ptr, du_ptr, a_ptr, offs_m, offs_k, k0, M, N, K, R, stride_gm, stride_gn, stride_wn,
              stride_wk, stride_du, stride_a, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT: tl.constexpr,
              MASK_VEC4: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + g W[:, cols] + D ⊙ (du A[:, cols]) for one projection (reduction over N in BLOCK_K steps)."""
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        gt = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        wt = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K)
        acc = tl.dot(dot_operand(gt, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    lr = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        duj = load_tile(du_ptr, offs_m, offs_j, stride_du, 1, M, R)
        aj = load_tile(a_ptr, offs_j, offs_k, stride_a, 1, R, K)
        lr = tl.dot(dot_operand(duj, DT, UPCAST), dot_operand(aj, DT, UPCAST), lr, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        lr = lr * dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_N, MASK_VEC4)
    return acc + lr


@triton.jit(do_not_specialize=["seed_lo0", "seed_hi0", "threshold0", "seed_lo1", "seed_hi1", "threshold1",
                               "seed_lo2", "seed_hi2", "threshold2"])
def _grouped_dx_kernel(
    g0_ptr, g1_ptr, g2_ptr, w0_ptr, w1_ptr, w2_ptr, du0_ptr, du1_ptr, du2_ptr, a0_ptr, a1_ptr, a2_ptr, dx_ptr,
    M, K, N0, N1, N2, R0, R1, R2,
    stride_g0m, stride_g0n, stride_g1m, stride_g1n, stride_g2m, stride_g2n, stride_w0n, stride_w0k,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_du0, stride_du1, stride_du2, stride_a0, stride_a1,
    stride_a2, stride_dxm, stride_dxk,
    seed_lo0, seed_hi0, threshold0, keep_scale0, seed_lo1, seed_hi1, threshold1, keep_scale1,
    seed_lo2, seed_hi2, threshold2, keep_scale2,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr,
    RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """dx = Σ_{i<P} g_i W_i + D_i ⊙ (du_i A_i) for one (BLOCK_M, BLOCK_N) tile of dx (M, K); one store."""
    DT: tl.constexpr = g0_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_N
    offs_k = k0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dx_terms(acc, g0_ptr, w0_ptr, du0_ptr, a0_ptr, offs_m, offs_k, k0, M, N0, K, R0, stride_g0m, stride_g0n,
                    stride_w0n, stride_w0k, stride_du0, stride_a0, seed_lo0, seed_hi0, threshold0, keep_scale0,
                    HAS_DROPOUT, MASK_VEC4, RANK_STEP, BLOCK_N, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    if P > 1:
        acc = _dx_terms(acc, g1_ptr, w1_ptr, du1_ptr, a1_ptr, offs_m, offs_k, k0, M, N1, K, R1, stride_g1m,
                        stride_g1n, stride_w1n, stride_w1k, stride_du1, stride_a1, seed_lo1, seed_hi1, threshold1,
                        keep_scale1, HAS_DROPOUT, MASK_VEC4, RANK_STEP, BLOCK_N, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    if P > 2:
        acc = _dx_terms(acc, g2_ptr, w2_ptr, du2_ptr, a2_ptr, offs_m, offs_k, k0, M, N2, K, R2, stride_g2m,
                        stride_g2n, stride_w2n, stride_w2k, stride_du2, stride_a2, seed_lo2, seed_hi2, threshold2,
                        keep_scale2, HAS_DROPOUT, MASK_VEC4, RANK_STEP, BLOCK_N, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    tl.store(tile_ptrs(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk), round_to(acc, DT, EMULATE_RNE),
             mask=tile_mask(offs_m, offs_k, M, K))


@triton.jit
def _da_step(da_acc, xt, du_ptr, offs_m, off_k, M, K, R, stride_du, seed_lo, seed_hi, threshold, keep_scale,
             HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
             DT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """da_acc += du[rows]ᵀ @ (D ⊙ xt), da_acc (R_PAD, BLOCK_K) fp32."""
    xm = _masked(xt, offs_m, off_k, K, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT, MASK_VEC4, BLOCK_K)
    dut = dot_operand(load_tile(du_ptr, offs_m, tl.arange(0, R_PAD), stride_du, 1, M, R), DT, UPCAST)
    return tl.dot(tl.trans(dut), dot_operand(xm, DT, UPCAST), da_acc, input_precision=DOT_PRECISION)


@triton.jit
def _da_store(da_acc, da_part_ptr, pid_s, offs_k, K, R, stride_das, stride_dar, R_PAD: tl.constexpr):
    offs_r = tl.arange(0, R_PAD)
    ptrs = tile_ptrs(da_part_ptr + pid_s.to(tl.int64) * stride_das, offs_r, offs_k, stride_dar, 1)
    tl.store(ptrs, da_acc, mask=tile_mask(offs_r, offs_k, R, K))


@triton.jit(do_not_specialize=["seed_lo0", "seed_hi0", "threshold0", "seed_lo1", "seed_hi1", "threshold1",
                               "seed_lo2", "seed_hi2", "threshold2"])
def _grouped_da_kernel(
    x_ptr, du0_ptr, du1_ptr, du2_ptr, da0_ptr, da1_ptr, da2_ptr, rstd_ptr, norm_w_ptr,
    M, K, R0, R1, R2, rows_per_chunk,
    stride_xm, stride_xk, stride_du0, stride_du1, stride_du2, stride_das0, stride_dar0, stride_das1, stride_dar1,
    stride_das2, stride_dar2, stride_rstd, stride_norm_w,
    seed_lo0, seed_hi0, threshold0, keep_scale0, seed_lo1, seed_hi1, threshold1, keep_scale1,
    seed_lo2, seed_hi2, threshold2, keep_scale2,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, NORM: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """da_part_i[j, :, cols] = Σ_{rows of chunk j} du_i[rows]ᵀ (D_i ⊙ x)[rows, cols] (fp32), i < P, x read once.
    The op's input dtype is du's; with NORM, x is an RMSNorm's input and each tile is rebuilt (normed_tile)."""
    DT: tl.constexpr = du0_ptr.dtype.element_ty
    pid_s = tl.program_id(1)
    off_k = tl.program_id(0) * BLOCK_K
    offs_k = off_k + tl.arange(0, BLOCK_K)
    da0 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    da1 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    da2 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    m_lo = pid_s * rows_per_chunk
    for m0 in range(m_lo, tl.minimum(M, m_lo + rows_per_chunk), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        xt = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if NORM != 0:
            xt = normed_tile(xt, rstd_ptr, norm_w_ptr, offs_m, offs_k, M, K, stride_rstd, stride_norm_w, NORM, DT,
                             UPCAST)
        da0 = _da_step(da0, xt, du0_ptr, offs_m, off_k, M, K, R0, stride_du0, seed_lo0, seed_hi0, threshold0,
                       keep_scale0, HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
        if P > 1:
            da1 = _da_step(da1, xt, du1_ptr, offs_m, off_k, M, K, R1, stride_du1, seed_lo1, seed_hi1, threshold1,
                           keep_scale1, HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
        if P > 2:
            da2 = _da_step(da2, xt, du2_ptr, offs_m, off_k, M, K, R2, stride_du2, seed_lo2, seed_hi2, threshold2,
                           keep_scale2, HAS_DROPOUT, MASK_VEC4, R_PAD, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    _da_store(da0, da0_ptr, pid_s, offs_k, K, R0, stride_das0, stride_dar0, R_PAD)
    if P > 1:
        _da_store(da1, da1_ptr, pid_s, offs_k, K, R1, stride_das1, stride_dar1, R_PAD)
    if P > 2:
        _da_store(da2, da2_ptr, pid_s, offs_k, K, R2, stride_das2, stride_dar2, R_PAD)


# ------------------------------------------------------------------------------------------------ plans
def _blocks(dtype: torch.dtype, dropout: bool = False) -> dict:
    """Fixed tile sizes (untuned without a GPU): fp32 halves the reduction steps and the dA pass's columns;
    ``dropout``: the group's HAS_DROPOUT (the u pass's rows depend on it).

    From the registers compiled for sm_90a (benchmarks/results/kernel_report.md, Triton 3.6.0 and 3.9.0):
    the dx GEMM runs 8 warps (two warpgroups share the 64x64 wgmma tile), which halves its registers per thread
    (p=0.05: 214 -> 126, 2 CTAs of 8 warps per SM instead of 2 of 4; p=0: 134 -> 76, 3 of 8 instead of 3 of 4);
    with dropout the u pass takes 16 rows per program, not 32 (three projections' Philox words for half the
    rows: 158 -> 124 registers, 4 CTAs of 4 warps per SM instead of 3; 8 warps on 32 rows reached 128 registers
    but spilled 16 bytes with Triton 3.9.0; without dropout 32 rows keep 64 registers and 8 CTAs). Neither
    changes a result: a row's u is the same K steps, warps only distribute a tile's elements, and dx's reduction
    step (BLOCK_K) and the dA pass's config (hence its row chunks) stay."""
    f32 = dtype == torch.float32
    return {"u": BlockConfig("u", 16 if dropout else 32, 0, 32 if f32 else 64, 4, 2),
            "dx": BlockConfig("dx", 64, 64, 32 if f32 else 64, 8, 3),
            "da": BlockConfig("da", 32, 0, 32 if f32 else 64, 8, 2)}


def _slots(names: Sequence[str], per_projection: Sequence[Sequence]) -> dict:
    """{name + str(i): value} for every slot i < MAX_PROJECTIONS; an unused slot repeats projection 0's values
    (the kernel compiles it out: constexpr P)."""
    out = {}
    for i in SLOTS:
        values = per_projection[i] if i < len(per_projection) else per_projection[0]
        for name, value in zip(names, values):
            out[name.format(i)] = value
    return out


def _dropout_slots(projections) -> tuple[dict, dict]:
    """(runtime seed / threshold / keep-scale args per slot, the HAS_DROPOUT constexpr). One constexpr for the
    group: when any projection has dropout, every projection's tile is masked, and one with p = 0 gets
    threshold 0 (every Philox word is >= 0: all kept) and keep_scale 1.0, so its tile is x exactly. That
    keeps the compiled variants at two per P instead of 2^P."""
    args = _slots(("seed_lo{}", "seed_hi{}", "threshold{}", "keep_scale{}"),
                  [tuple(dropout_args(p.dropout, p.seed).values()) for p in projections])
    return args, {"HAS_DROPOUT": any(p.dropout > 0 for p in projections)}


def _common_meta(x: Tensor, projections, dtype: Optional[torch.dtype] = None) -> dict:
    """P, MASK_VEC4 and the dot settings of the op's input dtype (``dtype``, default x's)."""
    meta = dot_meta(x.dtype if dtype is None else dtype)
    return {"P": len(projections), "MASK_VEC4": x.shape[1] % 4 == 0, "DOT_PRECISION": meta["DOT_PRECISION"],
            "UPCAST": meta["UPCAST"]}


def plan_u(x, lora_as, us, sus, projections) -> Launch:
    """u_i (M, r_i) fp32 and su_i = s_i·u_i (x's dtype) for every projection, one program per BLOCK_M rows."""
    M, K = x.shape
    drop_args, drops = _dropout_slots(projections)
    cfg = _blocks(x.dtype, drops["HAS_DROPOUT"])["u"]
    args = {"x_ptr": x, **_slots(("a{}_ptr", "u{}_ptr", "su{}_ptr"), list(zip(lora_as, us, sus))), "M": M, "K": K,
            **_slots(("R{}",), [(a.shape[0],) for a in lora_as]), "stride_xm": x.stride(0), "stride_xk": x.stride(1),
            **_slots(("stride_a{}", "stride_u{}", "stride_su{}"),
                     [(a.stride(0), u.stride(0), su.stride(0)) for a, u, su in zip(lora_as, us, sus)]),
            **_slots(("scale{}",), [(float(p.scale),) for p in projections]), **drop_args}
    meta = {**_common_meta(x, projections), **drops, "R_PAD": rank_pad(max(a.shape[0] for a in lora_as)),
            "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "EMULATE_RNE": interpreting()}
    return Launch(_grouped_u_kernel, (triton.cdiv(M, cfg.block_m),), args, meta, cfg.num_warps, cfg.num_stages,
                  "grouped_u")


def plan_dx(grads, weights, dus, lora_as, dx, projections) -> Launch:
    """dx (M, K) = Σ_i g_i W_i + D_i ⊙ (du_i A_i), one program per (BLOCK_M, BLOCK_N) tile, grouped order."""
    M, K = dx.shape
    cfg = _blocks(dx.dtype)["dx"]
    drop_args, drops = _dropout_slots(projections)
    args = {**_slots(("g{}_ptr", "w{}_ptr", "du{}_ptr", "a{}_ptr"), list(zip(grads, weights, dus, lora_as))),
            "dx_ptr": dx, "M": M, "K": K, **_slots(("N{}", "R{}"), [(w.shape[0], a.shape[0])
                                                                    for w, a in zip(weights, lora_as)]),
            **_slots(("stride_g{}m", "stride_g{}n", "stride_w{}n", "stride_w{}k"),
                     [g.stride() + w.stride() for g, w in zip(grads, weights)]),
            **_slots(("stride_du{}", "stride_a{}"), [(du.stride(0), a.stride(0)) for du, a in zip(dus, lora_as)]),
            "stride_dxm": dx.stride(0), "stride_dxk": dx.stride(1), **drop_args}
    meta = {**_common_meta(dx, projections), **drops, "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "EMULATE_RNE": interpreting()}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(K, cfg.block_n),)
    return Launch(_grouped_dx_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "grouped_dx", role="gemm")


def da_chunks(M: int, K: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows per chunk) of the dA pass: about PROGRAMS_PER_SM programs per SM."""
    cfg = _blocks(dtype)["da"]
    cols = triton.cdiv(K, cfg.block_k)
    rows = chunk_length(M, cfg.block_m, split_count(triton.cdiv(M, cfg.block_m), cols, num_sms))
    return cols, triton.cdiv(M, rows), rows


def plan_da(x, dus, da_parts, rows_per_chunk, projections, norm=None) -> Launch:
    """da_part_i[j] (r_i, K) fp32 = du_i[chunk j]ᵀ (D_i ⊙ x)[chunk j] for every projection, x read once. Tiles
    and dots in du's dtype (the op's input dtype); ``norm`` = (rstd (M,) fp32, w (K,), "llama" | "gemma"): x is
    then the RMSNorm's input and the op's input is rebuilt from it in the loads."""
    M, K = x.shape
    dtype = dus[0].dtype
    cfg = _blocks(dtype)["da"]
    drop_args, drops = _dropout_slots(projections)
    rstd, norm_w, form = norm if norm is not None else (x, x, "")
    args = {"x_ptr": x, **_slots(("du{}_ptr", "da{}_ptr"), list(zip(dus, da_parts))), "rstd_ptr": rstd,
            "norm_w_ptr": norm_w, "M": M, "K": K,
            **_slots(("R{}",), [(du.shape[1],) for du in dus]), "rows_per_chunk": rows_per_chunk,
            "stride_xm": x.stride(0), "stride_xk": x.stride(1), **_slots(("stride_du{}",), [(du.stride(0),) for du in dus]),
            **_slots(("stride_das{}", "stride_dar{}"), [part.stride()[:2] for part in da_parts]),
            "stride_rstd": rstd.stride(0) if norm is not None else 0,
            "stride_norm_w": norm_w.stride(0) if norm is not None else 0, **drop_args}
    meta = {**_common_meta(x, projections, dtype), **drops, "NORM": NORM_MODES[form],
            "R_PAD": rank_pad(max(du.shape[1] for du in dus)), "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k}
    grid = (triton.cdiv(K, cfg.block_k), triton.cdiv(M, rows_per_chunk))
    return Launch(_grouped_da_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "grouped_da")


def plan_u_pass(x, projections) -> tuple[object, list, list]:
    """(the grouped u pass's launch, [u_i (M, r_i) fp32], [s_i u_i in the low-rank operand's buffer]): one read
    of x for every projection's u_i, each with its own mask."""
    M = x.shape[0]
    lora_as = [lowrank_operand(p.lora_a, x.dtype) for p in projections]
    us = [torch.empty((M, a.shape[0]), dtype=torch.float32, device=x.device) for a in lora_as]
    sus = [lowrank_buffer(M, a.shape[0], x.dtype, x.device) for a in lora_as]
    return plan_u(x, lora_as, us, sus, projections), us, sus


def plan_forward(x, projections, num_sms) -> tuple[list, list, list]:
    """(launches, [y_i (M, N_i) x.dtype], [u_i (M, r_i) fp32]); M > 0 and K > 0."""
    u_launch, us, sus = plan_u_pass(x, projections)
    ys = [torch.empty((x.shape[0], p.weight.shape[0]), dtype=x.dtype, device=x.device) for p in projections]
    launches = [u_launch]
    for p, su, y in zip(projections, sus, ys):
        if y.shape[1] > 0:
            launches.append(plan_fwd_y(x, p.weight, su, lowrank_operand(p.lora_b, x.dtype), p.bias, y, num_sms))
    return launches, ys, us


def plan_g_passes(launches: list, grads, x, projections, us, needs, num_sms) -> tuple[list, list, list]:
    """Each projection's g-pass, appended to ``launches``: ([du_i], [dB_i or None], [dbias_i or None])."""
    need_dx, need_da, need_db, need_dbias = needs
    lowrank = need_dx or need_da or need_db
    dus, dbs, dbiases = [], [], []
    for g, p, u in zip(grads, projections, us):
        du, db, dbias = _plan_g_pass(launches, g, lowrank_operand(p.lora_b, g.dtype), u, p.scale, lowrank,
                                     need_dbias and p.bias is not None, p.lora_b.dtype, num_sms)
        dus.append(du)
        dbs.append(db if need_db else None)
        dbiases.append(dbias)
    return dus, dbs, dbiases


def plan_da_pass(launches: list, x, dus, projections, num_sms, norm=None) -> list:
    """[dA_i] of ``projections`` from one read of x: the grouped dA pass into fp32 chunk partials, then each
    partial's fixed-order reduction (appended to ``launches``). ``norm``: see plan_da."""
    M, K = x.shape
    _, chunks, rows_per_chunk = da_chunks(M, K, dus[0].dtype, num_sms)
    parts = [torch.empty((chunks, p.lora_a.shape[0], K), dtype=torch.float32, device=x.device) for p in projections]
    das = [torch.empty(p.lora_a.shape, dtype=p.lora_a.dtype, device=x.device) for p in projections]
    launches.append(plan_da(x, dus, parts, rows_per_chunk, projections, norm))
    launches += [plan_reduce(part, da, num_sms, "grouped_dA") for part, da in zip(parts, das)]
    return das


def plan_backward(grads, x, projections, us, needs, num_sms, norm=None) -> tuple[list, tuple]:
    """(launches, (dx, [dA_i], [dB_i], [dbias_i])) with None where not needed; M > 0 and K > 0. The g-pass
    launches come first: the dx and dA launches read the du_i they write. The op's input dtype is the grads'
    (x's, unless ``norm`` makes x an RMSNorm's input: see grouped_bwd)."""
    need_dx, need_da = needs[0], needs[1]
    (M, K), dtype = x.shape, grads[0].dtype
    lora_as = [lowrank_operand(p.lora_a, dtype) for p in projections]
    launches = []
    dus, dbs, dbiases = plan_g_passes(launches, grads, x, projections, us, needs, num_sms)
    dx = torch.empty((M, K), dtype=dtype, device=x.device) if need_dx else None
    if need_dx:
        launches.append(plan_dx(grads, [p.weight for p in projections], dus, lora_as, dx, projections))
    das = plan_da_pass(launches, x, dus, projections, num_sms, norm) if need_da else [None] * len(projections)
    return launches, (dx, das, dbs, dbiases)


# ------------------------------------------------------------------------------------------------ launchers
def _check(x: Tensor, projections, dtype: Optional[torch.dtype] = None) -> None:
    """The launchers' assumptions (the op validates user input and runs M = 0 or K = 0 on torch: no tiles);
    ``dtype``: the op's input dtype when x is an RMSNorm's input (default x's)."""
    dtype = x.dtype if dtype is None else dtype
    assert x.dim() == 2 and 1 <= len(projections) <= MAX_PROJECTIONS, f"x {tuple(x.shape)}, P={len(projections)}"
    assert x.shape[0] > 0 and x.shape[1] > 0, "M > 0 and K > 0"
    for p in projections:
        assert p.weight.dtype == dtype and p.weight.shape[1] == x.shape[1], "W_i (N_i, K) in x's dtype"
        assert 1 <= p.lora_a.shape[0] <= MAX_RANK, f"rank {p.lora_a.shape[0]} outside [1, {MAX_RANK}]"
        assert p.weight.device == x.device and (x.device.type == "cuda" or interpreting()), "CUDA or interpreter"


def grouped_fwd(x: Tensor, projections) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i (M, N_i) in x's dtype], [u_i (M, r_i) float32]) for x (M, K); projections: GroupedProjection."""
    _check(x, projections)
    launches, ys, us = plan_forward(x, projections, sm_count(x.device))
    for launch in launches:
        launch.run()
    return ys, us


def grouped_bwd(grads: Sequence[Tensor], x: Tensor, projections, us: Sequence[Tensor],
                needs: tuple, norm=None) -> tuple[Optional[Tensor], list, list, list]:
    """(dx, [dA_i], [dB_i], [dbias_i]) as ``lowcost.reference.lora_grouped_linear.grouped_backward`` defines
    them; bitwise reproducible (fixed-order sums, no atomics). ``norm`` = (rstd (M,) fp32, w (K,), form): the
    op's input was that RMSNorm's output of x (or autocast's copy of it in the grads' dtype), rebuilt in the dA
    pass's loads (kernels/norm_tile.py) as in ``lora_linear_bwd``."""
    dtype = grads[0].dtype if norm is not None else x.dtype
    _check(x, projections, dtype)
    if norm is not None:
        _check_norm(x, norm, dtype)
    assert all(g.dtype == dtype and g.shape[0] == x.shape[0] for g in grads), "grads (M, N_i) in x's dtype"
    launches, grads_out = plan_backward(grads, x, projections, us, needs, sm_count(x.device), norm)
    for launch in launches:
        launch.run()
    return grads_out
