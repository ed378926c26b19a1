"""Backward Triton kernels of the fused LoRA linear (docs/lora_linear_spec.md); launchers in lora_linear.py.

With g = dL/dy (M, N), s the scale, u = x̃ Aᵀ saved from the forward and y = x Wᵀ + s·(D⊙x) Aᵀ Bᵀ + bias:

    du    = s · g B        (M, r)   y depends on u through s·u Bᵀ
    dB    = s · gᵀ u       (N, r)   same term, differentiated in B
    dbias = Σ_m g          (N,)
    dA    = duᵀ x̃          (r, K)   u = x̃ Aᵀ
    dx    = g W + D ⊙ (du A)  (M, K)   x enters through x Wᵀ and through x̃ = D ⊙ x (chain rule multiplies by D)

_lora_bwd_g_kernel ("g-pass"), one program per BLOCK_M rows; each tile of g is read once:
    ut = s · u[rows, :]                                       (BLOCK_M, R_PAD) fp32, loaded once
    du_acc = 0
    for n0 in range(0, N, BLOCK_N):
        gt = g[rows, n-block]
        if need_du:    du_acc += gt @ B[n-block, :]
        if need_db:    atomic_add(dB32[n-block, :], gtᵀ @ ut)         fp32, summed over the M programs
        if need_dbias: atomic_add(dbias32[n-block], colsum(gt))
    if need_du: du[rows, :r] = s · du_acc                       fp32 (M, r), read by the dgrad kernel

_lora_bwd_dx_kernel ("dgrad"), one program per (BLOCK_M, BLOCK_K) tile of dx in GROUP_M super-rows:
    if NEED_DX: acc = Σ_n g[rows, n-block] @ W[n-block, cols]
    if HAS_DROPOUT: Dt = D[rows, cols]                         regenerated ONCE, used twice below
    if NEED_DA: xt = Dt ⊙ x[rows, cols]                        x̃ tile, in registers only
    lr = 0
    for r0 in range(0, r, RANK_STEP):                           (the code does not depend on r: one compile)
        dut = du[rows, r-block]                                 (BLOCK_M, RANK_STEP) fp32
        if NEED_DX: lr += dut @ A[r-block, cols]
        if NEED_DA: atomic_add(dA32[r-block, cols], dutᵀ @ xt)
    if NEED_DX: dx[rows, cols] = acc + Dt ⊙ lr

need_* (g-pass) are runtime int32 0/1 flags (uniform branches); the dgrad kernel's NEED_DX / NEED_DA are
constexprs, so the dA-only variant has no GEMM and the dx-only variant never loads x.
Atomic fp32 sums make dB, dbias and dA independent of tile order only up to fp32 rounding (not bitwise
deterministic across runs on a GPU). Dots round fp32 tiles (u, du, x̃, fp32 adapters) to x's dtype when x
is fp16/bf16; see tiles.dot_operand.
"""
import triton
import triton.language as tl

from .philox import dropout_multiplier
from .tiles import dot_operand, gemm_loop, grouped_tile, int64_step, load_tile, tile_mask, tile_ptrs


@triton.jit(do_not_specialize=["need_du", "need_db", "need_dbias"])
def _lora_bwd_g_kernel(
    # pointers
    g_ptr, b_ptr, u_ptr, du_ptr, db_ptr, dbias_ptr,
    # sizes
    M, N, R,
    # strides
    stride_gm, stride_gn, stride_bn, stride_br, stride_um, stride_ur, stride_dum, stride_dur,
    stride_dbn, stride_dbr,
    # scalars and runtime flags (int32 0/1)
    scale, need_du, need_db, need_dbias,
    # meta-parameters
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """g (M, N), B (N, R), u (M, R) fp32 -> du (M, R) fp32; adds into dB32 (N, R) and dbias32 (N,)."""
    DT: tl.constexpr = g_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    r_ok = offs_r < R
    ut = dot_operand(load_tile(u_ptr, offs_m, offs_r, stride_um, stride_ur, M, R) * scale, DT, UPCAST)
    g_ptrs = tile_ptrs(g_ptr, offs_m, offs_n, stride_gm, stride_gn)
    b_ptrs = tile_ptrs(b_ptr, offs_n, offs_r, stride_bn, stride_br)
    g_step = int64_step(BLOCK_N, stride_gn)
    b_step = int64_step(BLOCK_N, stride_bn)
    du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        gt = tl.load(g_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if need_du != 0:
            bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            du = tl.dot(dot_operand(gt, DT, UPCAST), dot_operand(bt, DT, UPCAST), du,
                        input_precision=DOT_PRECISION)
        if need_db != 0:
            db = tl.dot(tl.trans(dot_operand(gt, DT, UPCAST)), ut, input_precision=DOT_PRECISION)
            db_ptrs = tile_ptrs(db_ptr, n0 + offs_n, offs_r, stride_dbn, stride_dbr)
            tl.atomic_add(db_ptrs, db, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
        if need_dbias != 0:
            tl.atomic_add(dbias_ptr + n0 + offs_n, tl.sum(gt.to(tl.float32), axis=0), mask=n_ok, sem="relaxed")
        g_ptrs += g_step
        b_ptrs += b_step
    if need_du != 0:
        du_ptrs = tile_ptrs(du_ptr, offs_m, offs_r, stride_dum, stride_dur)
        tl.store(du_ptrs, du * scale, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_bwd_dx_kernel(
    # pointers
    g_ptr, w_ptr, du_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dum, stride_dur, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dar, stride_dak,
    # dropout (seed halves and threshold as int32 bit patterns, keep_scale fp32)
    seed_lo, seed_hi, threshold, keep_scale,
    # meta-parameters
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile: dx = g W + D ⊙ (du A) and dA32 += duᵀ x̃ (atomic fp32).

    g (M, N), W (N, K), du (M, R) fp32, A (R, K), x (M, K) -> dx (M, K), dA32 (R, K).
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    if NEED_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc = gemm_loop(acc,
                        tile_ptrs(g_ptr, offs_m, offs_n, stride_gm, stride_gn),
                        tile_ptrs(w_ptr, offs_n, offs_k, stride_wn, stride_wk),
                        int64_step(BLOCK_N, stride_gn), int64_step(BLOCK_N, stride_wn),
                        offs_m < M, offs_k < K, N, BLOCK_N, DT, DOT_PRECISION, UPCAST)
        lr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        d = dropout_multiplier(offs_m, pid_k * BLOCK_K, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K)
    if NEED_DA:
        xt = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            xt = xt.to(tl.float32) * d
        xt = dot_operand(xt, DT, UPCAST)
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        duj = dot_operand(load_tile(du_ptr, offs_m, offs_j, stride_dum, stride_dur, M, R), DT, UPCAST)
        if NEED_DX:
            aj = load_tile(a_ptr, offs_j, offs_k, stride_ar, stride_ak, R, K)
            lr = tl.dot(duj, dot_operand(aj, DT, UPCAST), lr, input_precision=DOT_PRECISION)
        if NEED_DA:
            da = tl.dot(tl.trans(duj), xt, input_precision=DOT_PRECISION)
            da_ptrs = tile_ptrs(da_ptr, offs_j, offs_k, stride_dar, stride_dak)
            tl.atomic_add(da_ptrs, da, mask=tile_mask(offs_j, offs_k, R, K), sem="relaxed")
    if NEED_DX:
        if HAS_DROPOUT:
            acc += d * lr
        else:
            acc += lr
        dx_ptrs = tile_ptrs(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile_mask(offs_m, offs_k, M, K))
