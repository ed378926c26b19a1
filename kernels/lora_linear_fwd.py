"""Forward Triton kernels of the fused LoRA linear (docs/lora_linear_spec.md); launchers in lora_linear.py.

    u = x̃ Aᵀ                  (M, r) float32       _lora_fwd_u_kernel   memory-bound pass over x
    y = x Wᵀ + s·u Bᵀ + bias   (M, N) x.dtype       _lora_fwd_y_kernel   persistent GEMM

x̃ = D ⊙ x never exists in memory: the u kernel regenerates D for each x tile it loads.

_lora_fwd_u_kernel, program (i, j): rows [i·BLOCK_M, (i+1)·BLOCK_M) and the j-th slice of K (k_split columns,
a multiple of BLOCK_K; the launcher splits K only when the row blocks alone would not cover every SM):
    acc[BLOCK_M, R_PAD] = 0                                  r padded to R_PAD = max(16, next_pow2(r))
    for k0 in slice j, step BLOCK_K:
        xt = x[rows, k0 : k0+BLOCK_K]                        TMA (or masked pointer) load, zeros outside
        if HAS_DROPOUT:
            xt = float32(xt) * D[rows, k0 : k0+BLOCK_K]      D from Philox(seed, m*K + k): keep_scale or 0
        acc += xt @ A[:, k0 : k0+BLOCK_K]ᵀ                   rows r..R_PAD of A read as zeros
    u_part[j, rows, :r] = acc                                summed over j in a fixed order (reduce.py),
                                                             which also writes su = s·u in x's dtype

_lora_fwd_y_kernel, num_programs programs (about one per SM), each walking output tiles
pid, pid + num_programs, ... in GROUP_M-grouped order:
    acc = 0
    for k0 in range(0, K, BLOCK_K):
        acc += x[rows, k-block] @ W[cols, k-block]ᵀ          TMA loads, software-pipelined (num_stages)
    for r0 in range(0, r, RANK_STEP):                        the low-rank term: r more K-steps of the SAME
        acc += su[rows, r-block] @ B[cols, r-block]ᵀ         accumulator ([x | s·u] [W | B]ᵀ), loaded by TMA
                                                             like x and W; code independent of r
    y[rows, cols] = acc + bias[cols]                         epilogue: bias and one store per tile

Dots take tiles in x's dtype (fp16/bf16 tensor cores; fp32 uses DOT_PRECISION "ieee" or "tf32") and
accumulate in fp32. In fp16/bf16 x̃, fp32 adapters and s·u are rounded to x's dtype before their dots (one
rounding each: x̃ per tile in tiles.dot_operand, adapters and su once by the launcher and reduce.py).
"""
import triton
import triton.language as tl

from .philox import dropout_multiplier
from .tiles import dot_operand, grouped_tile, load_2d, load_tile, round_to, store_2d, tile_ptrs


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_fwd_u_kernel(
    # tensors (x: descriptor when TMA, else pointer)
    x_src, a_ptr, u_part_ptr,
    # sizes
    M, K, R, k_split,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
    # dropout (seed halves and threshold as int32 bit patterns, keep_scale fp32)
    seed_lo, seed_hi, threshold, keep_scale,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, TMA: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """u_part[j] = x̃[rows, slice j] Aᵀ[slice j]: x (M, K), A (R, K) -> u_part (splits, M, R) float32."""
    off_m = tl.program_id(0) * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    k_lo = tl.program_id(1) * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = load_2d(x_src, off_m, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, TMA)
        if HAS_DROPOUT:
            d = dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
            xt = xt.to(tl.float32) * d
        at = load_tile(a_ptr, k0 + tl.arange(0, BLOCK_K), offs_r, stride_ak, stride_ar, K, R)  # Aᵀ tile
        acc = tl.dot(dot_operand(xt, DOT_DTYPE, UPCAST), dot_operand(at, DOT_DTYPE, UPCAST), acc,
                     input_precision=DOT_PRECISION)
    u_ptrs = tile_ptrs(u_part_ptr + tl.program_id(1).to(tl.int64) * stride_us, offs_m, offs_r, stride_um,
                       stride_ur)
    tl.store(u_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _lora_fwd_y_kernel(
    # tensors (descriptors when TMA, else pointers; bias always a pointer)
    x_src, w_src, su_src, b_src, bias_ptr, y_src,
    # sizes
    M, N, K, R, num_programs,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sum, stride_sur, stride_bn, stride_br,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, TMA: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = x Wᵀ + su Bᵀ + bias, persistent: x (M, K), W (N, K), su = s·u (M, R) and B (N, R) in x's dtype,
    bias (N,), y (M, N)."""
    n_rows = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_rows * n_cols, num_programs, flatten=True):
        pid_m, pid_n = grouped_tile(tile, n_rows, n_cols, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xt = load_2d(x_src, off_m, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, TMA)
            wt = load_2d(w_src, off_n, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, TMA)
            acc = tl.dot(dot_operand(xt, DOT_DTYPE, UPCAST), dot_operand(wt, DOT_DTYPE, UPCAST).T, acc,
                         input_precision=DOT_PRECISION)
        for r0 in range(0, R, RANK_STEP):  # the low-rank term as extra K-steps of the same accumulator
            ut = load_2d(su_src, off_m, r0, M, R, stride_sum, stride_sur, BLOCK_M, RANK_STEP, TMA)
            bt = load_2d(b_src, off_n, r0, N, R, stride_bn, stride_br, BLOCK_N, RANK_STEP, TMA)
            acc = tl.dot(dot_operand(ut, DOT_DTYPE, UPCAST), dot_operand(bt, DOT_DTYPE, UPCAST).T, acc,
                         input_precision=DOT_PRECISION)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        store_2d(y_src, round_to(acc, DOT_DTYPE, UPCAST), off_m, off_n, M, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, TMA)
