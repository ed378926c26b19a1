"""Triton kernels of the fused LoRA gated MLP (``lowcost.reference.lora_gated_mlp`` has the math).

The product h = act(gate) ⊙ up (M, I) is never stored: the down projection's kernels rebuild each h tile
from the gate and up tiles they load, in forward and in backward.

    forward:  gate, u_g = lora_linear_fwd(x, W_g, A_g, B_g)        the LoRA-linear Triton kernels
              up,   u_u = lora_linear_fwd(x, W_u, A_u, B_u)
              u_d = (D_d⊙h) A_dᵀ                                     _gated_down_u_kernel   (h in registers)
              y   = h W_dᵀ + s_d·u_d B_dᵀ                           _gated_down_y_kernel   (h in the A-operand tile)
    backward: du_d = s_d·g B_d,  dB_d = s_d·gᵀu_d                    two (M, H) × r GEMMs (torch)
              dh = g W_d + D_d⊙(du_d A_d);  dgate = dh⊙up⊙act'(gate);  dup = dh⊙act(gate)
                                                                     _gated_dh_kernel: one pass, the mask
                                                                     rebuilt per tile, dh never stored
              dA_d = du_dᵀ(D_d⊙h)                                    _gated_da_kernel (memory-bound: h and the
                                                                     mask rebuilt per tile) writes per-chunk
                                                                     fp32 partials; reduce.py sums them in order
              gate and up: lora_linear_bwd(dgate, x, …), lora_linear_bwd(dup, x, …);  dx = dx_g + dx_u
                                                                     (with ``norm``, x is an RMSNorm's input and
                                                                     their x-passes rebuild the op's input in
                                                                     their loads: kernels/norm_tile.py)

No atomics anywhere (as the LoRA-linear kernels, issue #9): every output element has one writer, and dA_d
is a fixed-order sum, so backward is bitwise the same from run to run.

_gated_down_y_kernel, one program per (BLOCK_M, BLOCK_N) tile of y (N = H), reduction over I:
    for k0 in range(0, I, BLOCK_K):
        ht = act(gate[rows, k-block]) ⊙ up[rows, k-block]          fp32, rounded once to the dot dtype
        acc += ht @ W_d[cols, k-block]ᵀ
    acc += Σ_r (s·u_d[rows, r-block]) @ B_d[cols, r-block]ᵀ;  y[rows, cols] = acc

_gated_dh_kernel, one program per (BLOCK_M, BLOCK_K) tile of (M, I), reduction over H:
    acc = Σ_n g[rows, n-block] @ W_d[n-block, cols];  lr = Σ_r du_d[rows, r] A_d[r, cols];  Dt = D_d[rows, cols]
    dh = acc + Dt ⊙ lr;  dgate[rows, cols] = dh ⊙ up ⊙ act'(gate);  dup[rows, cols] = dh ⊙ act(gate)

_gated_da_kernel, program (c, j): column block c of I, row chunk j (grid ≈ 2 programs per SM):
    for each BLOCK_M rows of chunk j:  da_acc += du_d[rows, :]ᵀ @ (Dt ⊙ act(gate) ⊙ up)[rows, cols]
    da_part[j, :, cols] = da_acc;  dA_d = Σ_j da_part[j]

Launches are planned (``plan_*``: one ``Launch`` each, as lora_linear_plan.py does) before they run, so the
kernel report (tools/kernel_report.py) compiles exactly what the launchers launch.

ACT: 0 = SiLU, 1 = GELU (tanh approximation), 2 = GELU (erf); tanh is written with exp.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_linear import lora_linear_bwd, lora_linear_fwd
from .lora_linear_plan import (BlockConfig, Launch, chunk_length, dot_meta, dropout_args, plan_reduce, rank_pad,
                               sm_count, split_count)
from .philox import dropout_multiplier
from .tiles import dot_operand, grouped_tile, load_tile, tile_mask, tile_ptrs

Tensor = torch.Tensor
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
RANK_STEP = 16
MAX_RANK = 128
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # constexpr: a jit function reads only constexpr globals
GELU_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in float32 for a float32 tile g."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        t = _tanh(SQRT_2_OVER_PI * (g + GELU_C * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT: tl.constexpr):
    """h = act(gate) ⊙ up for rows ``offs_m`` x columns ``offs_k`` (float32; zeros outside (M, K))."""
    g = load_tile(gate_ptr, offs_m, offs_k, stride_gm, stride_gk, M, K).to(tl.float32)
    p = load_tile(up_ptr, offs_m, offs_k, stride_pm, stride_pk, M, K).to(tl.float32)
    a, _ = act_and_grad(g, ACT)
    return a * p


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _gated_down_u_kernel(
    gate_ptr, up_ptr, a_ptr, u_ptr,
    M, K, R,
    stride_gm, stride_gk, stride_pm, stride_pk, stride_ar, stride_ak, stride_um, stride_ur,
    seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """u_d = (D⊙h) A_dᵀ for BLOCK_M rows: h = act(gate) ⊙ up (M, K=I), A_d (R, K) -> u_d (M, R) float32."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT)
        if HAS_DROPOUT:
            ht = ht * dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
        at = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R)        # (BLOCK_K, R_PAD) tile of Aᵀ
        acc = tl.dot(dot_operand(ht, DT, UPCAST), dot_operand(at, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    tl.store(tile_ptrs(u_ptr, offs_m, offs_r, stride_um, stride_ur), acc, mask=tile_mask(offs_m, offs_r, M, R))


@triton.jit
def _gated_down_y_kernel(
    gate_ptr, up_ptr, w_ptr, u_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_gm, stride_gk, stride_pm, stride_pk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_yn,
    scale,
    ACT: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = h W_dᵀ + s·u_d B_dᵀ for one (BLOCK_M, BLOCK_N) tile; h rebuilt from gate and up per K step."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT)
        wt = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)       # (BLOCK_K, BLOCK_N) tile of Wᵀ
        acc = tl.dot(dot_operand(ht, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    finish_y(acc, u_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br,
             stride_ym, stride_yn, scale, DT, RANK_STEP, DOT_PRECISION, UPCAST)


@triton.jit
def finish_y(acc, u_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br,
             stride_ym, stride_yn, scale, DT: tl.constexpr, RANK_STEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    """y[rows, cols] = acc + Σ_r (s·u_d[rows, r-block]) @ B_d[cols, r-block]ᵀ, with acc = (h W_dᵀ)[rows, cols]
    (fp32) from the caller's loop over I: the tail both down-projection GEMMs (dense and quantized W_d) share."""
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        uj = load_tile(u_ptr, offs_m, offs_j, stride_um, stride_ur, M, R) * scale
        bj = load_tile(b_ptr, offs_j, offs_n, stride_br, stride_bn, R, N)
        acc = tl.dot(dot_operand(uj, DT, UPCAST), dot_operand(bj, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    tl.store(tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn), acc.to(y_ptr.dtype.element_ty),
             mask=tile_mask(offs_m, offs_n, M, N))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _gated_dh_kernel(
    g_ptr, w_ptr, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dum, stride_dur, stride_ar, stride_ak,
    stride_xm, stride_xk,
    seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of (M, K=I): dgate and dup (gate/up's strides). dA_d is not computed
    here (``_gated_da_kernel``), so every output element is written by exactly one program: no atomics."""
    DT: tl.constexpr = g_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gt = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        wt = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K)
        acc = tl.dot(dot_operand(gt, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    finish_dh(acc, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, offs_m, offs_k, pid_k * BLOCK_K, M, K, R,
              stride_dum, stride_dur, stride_ar, stride_ak, stride_xm, stride_xk, seed_lo, seed_hi, threshold,
              keep_scale, DT, ACT, HAS_DROPOUT, MASK_VEC4, RANK_STEP, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST)


@triton.jit
def finish_dh(acc, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, offs_m, offs_k, k0, M, K, R,
              stride_dum, stride_dur, stride_ar, stride_ak, stride_xm, stride_xk, seed_lo, seed_hi, threshold,
              keep_scale, DT: tl.constexpr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr,
              RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """dh = acc + D_d ⊙ (du_d A_d) on the tile (acc = (g W_d)[rows, cols] fp32 from the caller's loop over H,
    columns from k0), then dgate = dh ⊙ up ⊙ act'(gate) and dup = dh ⊙ act(gate) stored: the tail both dh
    kernels (dense and quantized W_d) share."""
    lr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        dut = load_tile(du_ptr, offs_m, offs_j, stride_dum, stride_dur, M, R)
        at = load_tile(a_ptr, offs_j, offs_k, stride_ar, stride_ak, R, K)
        lr = tl.dot(dot_operand(dut, DT, UPCAST), dot_operand(at, DT, UPCAST), lr, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        lr = lr * dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
    dh = acc + lr
    gate = load_tile(gate_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K).to(tl.float32)
    up = load_tile(up_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K).to(tl.float32)
    a, da = act_and_grad(gate, ACT)
    mask = tile_mask(offs_m, offs_k, M, K)
    tl.store(tile_ptrs(dgate_ptr, offs_m, offs_k, stride_xm, stride_xk), (dh * up * da).to(DT), mask=mask)
    tl.store(tile_ptrs(dup_ptr, offs_m, offs_k, stride_xm, stride_xk), (dh * a).to(DT), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _gated_da_kernel(
    gate_ptr, up_ptr, du_ptr, da_part_ptr,
    M, K, R, rows_per_chunk,
    stride_xm, stride_xk, stride_dum, stride_dur, stride_das, stride_dar,
    seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """da_part[j, :, cols] = Σ_{rows of chunk j} du_d[rows]ᵀ (D_d ⊙ h)[rows, cols] (fp32), h = act(gate) ⊙ up
    rebuilt per tile. Program (c, j): column block c of I, row chunk j; the caller sums the chunks in order."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_k = pid_c * BLOCK_K
    offs_k = off_k + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    da_acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    m_lo = pid_s * rows_per_chunk
    for m0 in range(m_lo, tl.minimum(M, m_lo + rows_per_chunk), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_xm, stride_xk, stride_xm, stride_xk, M, K, ACT)
        if HAS_DROPOUT:
            ht = ht * dropout_multiplier(offs_m, off_k, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
        dut = dot_operand(load_tile(du_ptr, offs_m, offs_r, stride_dum, stride_dur, M, R), DT, UPCAST)
        da_acc = tl.dot(tl.trans(dut), dot_operand(ht, DT, UPCAST), da_acc, input_precision=DOT_PRECISION)
    da_ptrs = tile_ptrs(da_part_ptr + pid_s.to(tl.int64) * stride_das, offs_r, offs_k, stride_dar, 1)
    tl.store(da_ptrs, da_acc, mask=tile_mask(offs_r, offs_k, R, K))


# ------------------------------------------------------------------------------------------------ plans
def _blocks(dtype: torch.dtype) -> dict:
    """Fixed tile sizes (untuned without a GPU): fp32 halves the reduction step and the dA pass's columns."""
    f32 = dtype == torch.float32
    step = 32 if f32 else 64
    return {"u": BlockConfig("u", 32, 0, step, 4, 2),
            "y": BlockConfig("y", 64, 64, step, 4, 3),
            "dh": BlockConfig("dh", 64, step, 64, 4, 3),
            "da": BlockConfig("da", 32, 0, 64 if f32 else 128, 8, 3)}


def _meta(dtype: torch.dtype, act: str) -> dict:
    meta = dot_meta(dtype)
    return {"ACT": ACT_CODES[act], "DOT_PRECISION": meta["DOT_PRECISION"], "UPCAST": meta["UPCAST"]}


def _dropout_meta(p: float, K: int) -> dict:
    return {"HAS_DROPOUT": p > 0, "MASK_VEC4": p > 0 and K % 4 == 0}


def plan_down_u(gate, up, a_down, u, dropout, seed, act) -> Launch:
    """u_d (M, r) fp32 = (D_d ⊙ h) A_dᵀ, one program per BLOCK_M rows."""
    (M, inter), r = gate.shape, a_down.shape[0]
    cfg, sg = _blocks(gate.dtype)["u"], gate.stride()
    args = {"gate_ptr": gate, "up_ptr": up, "a_ptr": a_down, "u_ptr": u, "M": M, "K": inter, "R": r,
            **_strides(("stride_gm", "stride_gk", "stride_pm", "stride_pk"), sg + up.stride()),
            **_strides(("stride_ar", "stride_ak", "stride_um", "stride_ur"), a_down.stride() + u.stride()),
            **dropout_args(dropout, seed)}
    meta = {**_meta(gate.dtype, act), **_dropout_meta(dropout, inter), "R_PAD": rank_pad(r),
            "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k}
    return Launch(_gated_down_u_kernel, (triton.cdiv(M, cfg.block_m),), args, meta, cfg.num_warps, cfg.num_stages,
                  "mlp_down_u")


def plan_down_y(gate, up, w_down, u, b_down, y, scale, act) -> Launch:
    """y (M, H) = h W_dᵀ + s_d·u_d B_dᵀ, one program per (BLOCK_M, BLOCK_N) tile, grouped order."""
    (M, inter), H, r = gate.shape, w_down.shape[0], b_down.shape[1]
    cfg = _blocks(gate.dtype)["y"]
    names = ("stride_gm", "stride_gk", "stride_pm", "stride_pk", "stride_wn", "stride_wk", "stride_um",
             "stride_ur", "stride_bn", "stride_br", "stride_ym", "stride_yn")
    args = {"gate_ptr": gate, "up_ptr": up, "w_ptr": w_down, "u_ptr": u, "b_ptr": b_down, "y_ptr": y,
            "M": M, "N": H, "K": inter, "R": r,
            **_strides(names, gate.stride() + up.stride() + w_down.stride() + u.stride() + b_down.stride()
                       + y.stride()), "scale": float(scale)}
    meta = {**_meta(gate.dtype, act), "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(H, cfg.block_n),)
    return Launch(_gated_down_y_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "mlp_down_y", role="gemm")


def plan_dh(grad_y, w_down, du, a_down, gate, up, dgate, dup, dropout, seed, act) -> Launch:
    """dgate, dup (M, I) from dh = g W_d + D_d ⊙ (du A_d), one program per (BLOCK_M, BLOCK_K) tile."""
    (M, inter), H, r = gate.shape, w_down.shape[0], a_down.shape[0]
    cfg = _blocks(gate.dtype)["dh"]
    assert dgate.stride() == dup.stride() == gate.stride() == up.stride()
    names = ("stride_gm", "stride_gn", "stride_wn", "stride_wk", "stride_dum", "stride_dur", "stride_ar",
             "stride_ak", "stride_xm", "stride_xk")
    args = {"g_ptr": grad_y, "w_ptr": w_down, "du_ptr": du, "a_ptr": a_down, "gate_ptr": gate, "up_ptr": up,
            "dgate_ptr": dgate, "dup_ptr": dup, "M": M, "N": H, "K": inter, "R": r,
            **_strides(names, grad_y.stride() + w_down.stride() + du.stride() + a_down.stride() + gate.stride()),
            **dropout_args(dropout, seed)}
    meta = {**_meta(gate.dtype, act), **_dropout_meta(dropout, inter), "RANK_STEP": RANK_STEP,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(inter, cfg.block_k),)
    return Launch(_gated_dh_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "mlp_dh", role="gemm")


def da_chunks(M: int, inter: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows per chunk) of the dA pass: about PROGRAMS_PER_SM programs per SM."""
    cfg = _blocks(dtype)["da"]
    cols = triton.cdiv(inter, cfg.block_k)
    rows = chunk_length(M, cfg.block_m, split_count(triton.cdiv(M, cfg.block_m), cols, num_sms))
    return cols, triton.cdiv(M, rows), rows


def plan_da(gate, up, du, da_part, rows_per_chunk, dropout, seed, act) -> Launch:
    """da_part[j] (r, I) fp32 = du[chunk j]ᵀ (D_d ⊙ h)[chunk j]."""
    (M, inter), r = gate.shape, du.shape[1]
    cfg = _blocks(gate.dtype)["da"]
    names = ("stride_xm", "stride_xk", "stride_dum", "stride_dur", "stride_das", "stride_dar")
    args = {"gate_ptr": gate, "up_ptr": up, "du_ptr": du, "da_part_ptr": da_part, "M": M, "K": inter, "R": r,
            "rows_per_chunk": rows_per_chunk, **_strides(names, gate.stride() + du.stride() + da_part.stride()[:2]),
            **dropout_args(dropout, seed)}
    meta = {**_meta(gate.dtype, act), **_dropout_meta(dropout, inter), "R_PAD": rank_pad(r),
            "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k}
    grid = (triton.cdiv(inter, cfg.block_k), triton.cdiv(M, rows_per_chunk))
    return Launch(_gated_da_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "mlp_da")


def _strides(names, values) -> dict:
    assert len(names) == len(values)
    return dict(zip(names, values))


def plan_down_forward(gate, up, w_down, a_down, b_down, scale, dropout, seed, act) -> tuple[list, Tensor, Tensor]:
    """(launches, y (M, H) in gate's dtype, u_d (M, r) float32); M > 0. gate and up share strides."""
    (M, inter), (H, r) = gate.shape, b_down.shape
    assert gate.stride() == up.stride() and r <= MAX_RANK
    y = torch.empty((M, H), dtype=gate.dtype, device=gate.device)
    u = torch.empty((M, r), dtype=torch.float32, device=gate.device)
    return [plan_down_u(gate, up, a_down, u, dropout, seed, act),
            plan_down_y(gate, up, w_down, u, b_down, y, scale, act)], y, u


def plan_down_backward(grad_y, gate, up, w_down, a_down, du, dropout, seed, act, need_da, num_sms):
    """(launches, (dgate, dup, dA_d in a_down's dtype or None)); M > 0 and I > 0. du (M, r) float32."""
    (M, inter), r = gate.shape, a_down.shape[0]
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    launches = [plan_dh(grad_y, w_down, du, a_down, gate, up, dgate, dup, dropout, seed, act)]
    da = None
    if need_da:
        _, chunks, rows_per_chunk = da_chunks(M, inter, gate.dtype, num_sms)
        da_part = torch.empty((chunks, r, inter), dtype=torch.float32, device=gate.device)
        da = torch.empty((r, inter), dtype=a_down.dtype, device=gate.device)
        launches += [plan_da(gate, up, du, da_part, rows_per_chunk, dropout, seed, act),
                     plan_reduce(da_part, da, num_sms, "mlp_dA")]
    return launches, (dgate, dup, da)


# ------------------------------------------------------------------------------------------------ launchers
def down_forward(gate: Tensor, up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor, scale: float,
                 dropout: float, seed: int, act: str) -> tuple[Tensor, Tensor]:
    """(y (M, H) in gate's dtype, u_d (M, r) float32) from gate, up (M, I) (same strides) without storing h."""
    if gate.shape[0] == 0:
        return (torch.empty((0, w_down.shape[0]), dtype=gate.dtype, device=gate.device),
                torch.empty((0, a_down.shape[0]), dtype=torch.float32, device=gate.device))
    launches, y, u = plan_down_forward(gate, up, w_down, a_down, b_down, scale, dropout, seed, act)
    for launch in launches:
        launch.run()
    return y, u


def down_backward(grad_y: Tensor, gate: Tensor, up: Tensor, w_down: Tensor, a_down: Tensor, du: Tensor,
                  dropout: float, seed: int, act: str, need_da: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dgate, dup (M, I) in gate's dtype, dA_d (r, I) in a_down's dtype or None); du = s_d·g B_d (M, r) float32.
    Bitwise reproducible: dA_d is a fixed-order sum of per-chunk partials."""
    (M, inter), r = gate.shape, a_down.shape[0]
    if M == 0 or inter == 0:
        da = torch.zeros((r, inter), dtype=a_down.dtype, device=gate.device) if need_da else None
        return torch.empty_like(gate), torch.empty_like(up), da
    launches, grads = plan_down_backward(grad_y, gate, up, w_down, a_down, du, dropout, seed, act, need_da,
                                         sm_count(gate.device))
    for launch in launches:
        launch.run()
    return grads


def gated_mlp_fwd(x: Tensor, gate_p, up_p, down_p, act: str) -> tuple[Tensor, ...]:
    """gate_p/up_p/down_p: (W, A, B, scale, dropout, seed). Returns (y, gate, up, u_g, u_u, u_d)."""
    gate, u_g = lora_linear_fwd(x, gate_p[0], gate_p[1], gate_p[2], None, *gate_p[3:])
    up, u_u = lora_linear_fwd(x, up_p[0], up_p[1], up_p[2], None, *up_p[3:])
    y, u_d = down_forward(gate, up, down_p[0], down_p[1], down_p[2], *down_p[3:], act)
    return y, gate, up, u_g, u_u, u_d


def gated_mlp_bwd(grad_y: Tensor, x: Tensor, gate_p, up_p, down_p, gate: Tensor, up: Tensor, u_g: Tensor,
                  u_u: Tensor, u_d: Tensor, act: str, needs, norm=None) -> tuple[Optional[Tensor], ...]:
    """(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d) as ``lowcost.reference.gated_mlp_backward`` defines them.
    ``norm`` = (rstd (M,) fp32, w (K,), form): x is an RMSNorm's input and the op's input its output (in
    grad_y's dtype), rebuilt by the gate and up x-passes in their loads (``lora_linear_bwd``'s ``norm``)."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    w_d, a_d, b_d, s_d, p_d, seed_d = down_p
    g32 = grad_y.float()
    du = (g32 @ b_d.float()).mul_(s_d)
    db_d = (g32.t() @ u_d).mul_(s_d).to(b_d.dtype) if need_bd else None
    dgate, dup, da_d = down_backward(grad_y, gate, up, w_d, a_d, du, p_d, seed_d, act, need_ad)
    dx_g, da_g, db_g, _ = lora_linear_bwd(dgate, x, gate_p[0], gate_p[1], gate_p[2], u_g, *gate_p[3:],
                                          (need_dx, need_ag, need_bg, False), norm)
    dx_u, da_u, db_u, _ = lora_linear_bwd(dup, x, up_p[0], up_p[1], up_p[2], u_u, *up_p[3:],
                                          (need_dx, need_au, need_bu, False), norm)
    dx = dx_g.add_(dx_u) if need_dx else None
    return dx, da_g, db_g, da_u, db_u, da_d, db_d
