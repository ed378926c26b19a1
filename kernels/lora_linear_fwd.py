"""Forward Triton kernels of the fused LoRA linear (docs/lora_linear_spec.md); launchers in lora_linear.py.

    u = x̃ Aᵀ                  (M, r) float32       _lora_fwd_u_kernel
    y = x Wᵀ + s·u Bᵀ + bias   (M, N) x.dtype       _lora_fwd_y_kernel

x̃ = D ⊙ x never exists in memory: the u kernel regenerates D for each x tile it loads.

_lora_fwd_u_kernel, one program per BLOCK_M rows:
    acc[BLOCK_M, R_PAD] = 0                                  r padded to R_PAD = max(16, next_pow2(r))
    for k0 in range(0, K, BLOCK_K):
        xt = x[rows, k0 : k0+BLOCK_K]                        strided load, zeros outside (M, K)
        if HAS_DROPOUT:
            xt = float32(xt) * D[rows, k0 : k0+BLOCK_K]      D from Philox(seed, m*K + k): keep_scale or 0
        acc += xt @ A[:, k0 : k0+BLOCK_K]ᵀ                   rows r..R_PAD of A read as zeros
    u[rows, :r] = acc

_lora_fwd_y_kernel, one program per (BLOCK_M, BLOCK_N) tile of y, tiles visited in GROUP_M super-rows:
    acc = 0
    for k0 in range(0, K, BLOCK_K):
        acc += x[rows, k-block] @ W[cols, k-block]ᵀ
    for r0 in range(0, r, RANK_STEP):                        the r-deep low-rank steps, same accumulator
        acc += (s · u[rows, r-block]) @ B[cols, r-block]ᵀ    (the code does not depend on r: one compile)
    acc += bias[cols]                                        if HAS_BIAS
    y[rows, cols] = acc                                      the only pass over y

Dots take tiles in x's dtype (fp16/bf16 tensor cores; fp32 uses DOT_PRECISION "ieee" or "tf32") and
accumulate in fp32. In fp16/bf16 this rounds x̃, an fp32 adapter tile and s·u to x's dtype before their
dots (one rounding each; see tiles.dot_operand).
"""
import triton
import triton.language as tl

from .philox import dropout_multiplier
from .tiles import dot_operand, gemm_loop, grouped_tile, int64_step, load_tile, tile_mask, tile_ptrs


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_fwd_u_kernel(
    # pointers
    x_ptr, a_ptr, u_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
    # dropout (seed halves and threshold as int32 bit patterns, keep_scale fp32)
    seed_lo, seed_hi, threshold, keep_scale,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """u = x̃ Aᵀ for BLOCK_M rows: x (M, K), A (R, K) -> u (M, R) float32."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    row_ok = offs_m < M
    r_ok = offs_r < R
    x_ptrs = tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk)
    at_ptrs = tile_ptrs(a_ptr, offs_k, offs_r, stride_ak, stride_ar)  # (BLOCK_K, R_PAD) tile of Aᵀ
    x_step = int64_step(BLOCK_K, stride_xk)
    a_step = int64_step(BLOCK_K, stride_ak)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            d = dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K)
            xt = xt.to(tl.float32) * d
        at = tl.load(at_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(xt, DT, UPCAST), dot_operand(at, DT, UPCAST), acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        at_ptrs += a_step
    tl.store(tile_ptrs(u_ptr, offs_m, offs_r, stride_um, stride_ur), acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_fwd_y_kernel(
    # pointers
    x_ptr, w_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_yn,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = x Wᵀ + s·u Bᵀ + bias for one (BLOCK_M, BLOCK_N) tile: W (N, K), u (M, R), B (N, R), y (M, N)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_loop(acc,
                    tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk),
                    tile_ptrs(w_ptr, offs_k, offs_n, stride_wk, stride_wn),  # (BLOCK_K, BLOCK_N) tile of Wᵀ
                    int64_step(BLOCK_K, stride_xk), int64_step(BLOCK_K, stride_wk),
                    row_ok, col_ok, K, BLOCK_K, DT, DOT_PRECISION, UPCAST)
    for r0 in range(0, R, RANK_STEP):  # the low-rank term, RANK_STEP ranks per step
        offs_j = r0 + tl.arange(0, RANK_STEP)
        uj = load_tile(u_ptr, offs_m, offs_j, stride_um, stride_ur, M, R) * scale
        bj = load_tile(b_ptr, offs_j, offs_n, stride_br, stride_bn, R, N)  # (RANK_STEP, BLOCK_N) tile of Bᵀ
        acc = tl.dot(dot_operand(uj, DT, UPCAST), dot_operand(bj, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_mask(offs_m, offs_n, M, N))
