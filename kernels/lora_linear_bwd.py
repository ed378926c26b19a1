"""Backward Triton kernels of the fused LoRA linear (docs/lora_linear_spec.md); launchers in lora_linear.py.

With g = dL/dy (M, N), s the scale, u = x̃ Aᵀ saved from the forward and y = x Wᵀ + s·(D⊙x) Aᵀ Bᵀ + bias:

    du    = s · g B        (M, r)   y depends on u through s·u Bᵀ
    dB    = s · gᵀ u       (N, r)   same term, differentiated in B
    dbias = Σ_m g          (N,)
    dA    = duᵀ x̃          (r, K)   u = x̃ Aᵀ
    dx    = g W + D ⊙ (du A)  (M, K)   x enters through x Wᵀ and through x̃ = D ⊙ x (chain rule multiplies by D)

Three kernels and a fixed-order reduction (reduce.py); no atomics anywhere, so every gradient is bitwise
the same from run to run:

_lora_bwd_g_kernel ("g-pass", memory-bound, reads g once): program (c, j) owns the column block c
(BLOCK_N columns of g) and the row chunk j (rows_per_chunk rows, walked BLOCK_M at a time):
    bt = B[cols, :]                                            loaded once
    for each BLOCK_M rows of chunk j:
        gt = g[rows, cols]                                     TMA (or masked pointer) load
        if LOWRANK:    du_part[c, rows, :] = s · gt @ bt       this column block's share of du
                       db_acc += gtᵀ @ u[rows, :]              (BLOCK_N, R_PAD) fp32 in registers
        if NEED_DBIAS: dbias_acc += colsum(gt)
    db_part[j, cols, :] = s · db_acc;  dbias_part[j, cols] = dbias_acc
  du = Σ_c du_part[c] (stored in x's dtype: every use of du is a dot that rounds it to that dtype),
  dB = Σ_j db_part[j], dbias = Σ_j dbias_part[j], each summed in index order.

_lora_bwd_dx_kernel ("dgrad", persistent GEMM like the forward's, output tiles of dx (M, K)):
    acc = Σ_n g[rows, n-block] @ W[n-block, cols]              TMA loads, reduction over N
    if LOWRANK: acc += du[rows, :] @ A[:, cols]                p = 0: r more K-steps of the same accumulator
                                                               (du and A in x's dtype, TMA-loaded)
    dx[rows, cols] = acc                                       epilogue: one store per tile
  With dropout the low-rank term is D ⊙ (du A), not a product of two matrices, so it cannot join the
  accumulator; it is added by the x-pass instead (the dgrad GEMM stays a plain GEMM: same registers).

_lora_bwd_x_kernel ("x-pass", memory-bound): program (c, j) owns the column block c (BLOCK_K columns of
x) and the row chunk j:
    at = A[:, cols]                                            loaded once (DX_LOWRANK)
    for each BLOCK_M rows of chunk j:
        dut = du[rows, :];  Dt = D[rows, cols] (HAS_DROPOUT)   mask regenerated once, used twice
        xt = x[rows, cols]                                     with NORM: the RMSNorm output rebuilt from the
                                                               norm input tile, rstd[rows] and norm_w[cols]
                                                               (norm_tile.py), so no (M, K) normed tensor
        da_acc += dutᵀ @ (Dt ⊙ xt)                             (R_PAD, BLOCK_K) fp32 in registers
        if DX_LOWRANK: dx[rows, cols] += Dt ⊙ (dut @ at)       read-modify-write of the dgrad GEMM's tile
    da_part[j, :, cols] = da_acc;  dA = Σ_j da_part[j]

The flags are constexprs (no runtime branch around a load). To keep the number of compiled variants small,
du and dB come together (LOWRANK) and the x-pass always computes dA; the launcher drops what was not asked
for (a rare case: adapters frozen on one side).

Dots round fp32 tiles (u, du, x̃, fp32 adapters) to x's dtype when x is fp16/bf16; see tiles.dot_operand.
With dropout, dx is rounded twice (the GEMM's store, then the x-pass's); see docs/lora_linear_spec.md.
"""
import triton
import triton.language as tl

from .norm_tile import normed_tile
from .philox import dropout_multiplier
from .tiles import dot_operand, grouped_tile, load_2d, load_tile, round_to, store_2d, tile_ptrs


@triton.jit
def _lora_bwd_g_kernel(
    # tensors (g: descriptor when TMA, else pointer)
    g_src, b_ptr, u_ptr, du_part_ptr, db_part_ptr, dbias_part_ptr,
    # sizes
    M, N, R, rows_per_chunk,
    # strides
    stride_gm, stride_gn, stride_bn, stride_br, stride_um, stride_ur, stride_dus, stride_dum,
    stride_dbs, stride_dbn, stride_dbias_s,
    # scalars
    scale,
    # meta-parameters
    LOWRANK: tl.constexpr, NEED_DBIAS: tl.constexpr, TMA: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """g (M, N), B (N, R), u (M, R) fp32 -> du_part (col blocks, M, R), db_part (chunks, N, R) and
    dbias_part (chunks, N), all fp32 and contiguous in their last dimension."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_n = pid_c * BLOCK_N
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    if LOWRANK:
        bt = dot_operand(load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, N, R), DOT_DTYPE, UPCAST)
    db_acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_lo = pid_s * rows_per_chunk
    for m0 in range(m_lo, tl.minimum(M, m_lo + rows_per_chunk), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        gt = load_2d(g_src, m0, off_n, M, N, stride_gm, stride_gn, BLOCK_M, BLOCK_N, TMA)
        if LOWRANK:
            du = tl.dot(dot_operand(gt, DOT_DTYPE, UPCAST), bt, input_precision=DOT_PRECISION) * scale
            du_ptrs = tile_ptrs(du_part_ptr + pid_c.to(tl.int64) * stride_dus, offs_m, offs_r, stride_dum, 1)
            tl.store(du_ptrs, du, mask=(offs_m[:, None] < M) & r_ok[None, :])
            ut = load_tile(u_ptr, offs_m, offs_r, stride_um, stride_ur, M, R)
            db_acc = tl.dot(tl.trans(dot_operand(gt, DOT_DTYPE, UPCAST)), dot_operand(ut, DOT_DTYPE, UPCAST),
                            db_acc, input_precision=DOT_PRECISION)
        if NEED_DBIAS:
            dbias_acc += tl.sum(gt.to(tl.float32), axis=0)
    n_ok = offs_n < N
    if LOWRANK:
        db_ptrs = tile_ptrs(db_part_ptr + pid_s.to(tl.int64) * stride_dbs, offs_n, offs_r, stride_dbn, 1)
        tl.store(db_ptrs, db_acc * scale, mask=n_ok[:, None] & r_ok[None, :])
    if NEED_DBIAS:
        tl.store(dbias_part_ptr + pid_s.to(tl.int64) * stride_dbias_s + offs_n, dbias_acc, mask=n_ok)


@triton.jit
def _lora_bwd_dx_kernel(
    # tensors (descriptors when TMA, else pointers)
    g_src, w_src, du_src, a_src, dx_src,
    # sizes
    M, N, K, R, num_programs,
    # strides
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dum, stride_dur, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    # meta-parameters
    LOWRANK: tl.constexpr, TMA: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dx = g W (+ du A if LOWRANK), persistent. GEMM naming: the output dx (M, K) is tiled BLOCK_M x
    BLOCK_N (BLOCK_N runs over K), and the reduction over N steps by BLOCK_K.

    g (M, N), W (N, K), du (M, R) and A (R, K) in x's dtype -> dx (M, K).
    """
    n_rows = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(K, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_rows * n_cols, num_programs, flatten=True):
        pid_m, pid_k = grouped_tile(tile, n_rows, n_cols, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            gt = load_2d(g_src, off_m, n0, M, N, stride_gm, stride_gn, BLOCK_M, BLOCK_K, TMA)
            wt = load_2d(w_src, n0, off_k, N, K, stride_wn, stride_wk, BLOCK_K, BLOCK_N, TMA)
            acc = tl.dot(dot_operand(gt, DOT_DTYPE, UPCAST), dot_operand(wt, DOT_DTYPE, UPCAST), acc,
                         input_precision=DOT_PRECISION)
        if LOWRANK:  # p = 0: dx = [g | du] [W ; A], r more K-steps of the same accumulator
            for r0 in range(0, R, RANK_STEP):
                duj = load_2d(du_src, off_m, r0, M, R, stride_dum, stride_dur, BLOCK_M, RANK_STEP, TMA)
                aj = load_2d(a_src, r0, off_k, R, K, stride_ar, stride_ak, RANK_STEP, BLOCK_N, TMA)
                acc = tl.dot(dot_operand(duj, DOT_DTYPE, UPCAST), dot_operand(aj, DOT_DTYPE, UPCAST), acc,
                             input_precision=DOT_PRECISION)
        store_2d(dx_src, round_to(acc, DOT_DTYPE, UPCAST), off_m, off_k, M, K, stride_dxm, stride_dxk, BLOCK_M, BLOCK_N, TMA)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_bwd_x_kernel(
    # tensors (x, dx: descriptors when TMA, else pointers; rstd, norm_w: the norm's, read when NORM)
    x_src, du_ptr, a_ptr, dx_src, da_part_ptr, rstd_ptr, norm_w_ptr,
    # sizes
    M, K, R, rows_per_chunk,
    # strides
    stride_xm, stride_xk, stride_dum, stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
    stride_das, stride_dar, stride_rstd, stride_norm_w,
    # dropout (seed halves and threshold as int32 bit patterns, keep_scale fp32)
    seed_lo, seed_hi, threshold, keep_scale,
    # meta-parameters
    DX_LOWRANK: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, NORM: tl.constexpr,
    TMA: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """x (M, K), du (M, R) and A (R, K) in x's dtype -> da_part (chunks, R, K) fp32; dx (M, K) += D ⊙ (du A).

    NORM (1 "llama", 2 "gemma" RMSNorm; 0 none): x_src is the norm's input (its own dtype), and each x tile
    is rebuilt from it, rstd (M,) fp32 and norm_w (K,) in the load (norm_tile.normed_tile), bit for bit the
    normed tensor in x's dtype (DOT_DTYPE) that the op would otherwise read."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_k = pid_c * BLOCK_K
    offs_k = off_k + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    if DX_LOWRANK:
        at = dot_operand(load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, R, K), DOT_DTYPE, UPCAST)
    da_acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    m_lo = pid_s * rows_per_chunk
    for m0 in range(m_lo, tl.minimum(M, m_lo + rows_per_chunk), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dut = dot_operand(load_tile(du_ptr, offs_m, offs_r, stride_dum, stride_dur, M, R), DOT_DTYPE, UPCAST)
        if HAS_DROPOUT:
            d = dropout_multiplier(offs_m, off_k, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
        xt = load_2d(x_src, m0, off_k, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, TMA)
        if NORM != 0:
            xt = normed_tile(xt, rstd_ptr, norm_w_ptr, offs_m, offs_k, M, K, stride_rstd, stride_norm_w, NORM,
                             DOT_DTYPE, UPCAST)
        if HAS_DROPOUT:
            xt = xt.to(tl.float32) * d
        da_acc = tl.dot(tl.trans(dut), dot_operand(xt, DOT_DTYPE, UPCAST), da_acc, input_precision=DOT_PRECISION)
        if DX_LOWRANK:
            lr = tl.dot(dut, at, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                lr = lr * d
            dxt = load_2d(dx_src, m0, off_k, M, K, stride_dxm, stride_dxk, BLOCK_M, BLOCK_K, TMA)
            store_2d(dx_src, round_to(dxt.to(tl.float32) + lr, DOT_DTYPE, UPCAST), m0, off_k, M, K, stride_dxm, stride_dxk,
                     BLOCK_M, BLOCK_K, TMA)
    da_ptrs = tile_ptrs(da_part_ptr + pid_s.to(tl.int64) * stride_das, offs_r, offs_k, stride_dar, 1)
    tl.store(da_ptrs, da_acc, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))
