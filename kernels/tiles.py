"""Small Triton device helpers shared by the LoRA kernels: tile pointers, masks, dot operands, tile order.

Every offset is widened to int64 before it meets a stride, so tensors past 2**31 elements (or views whose
strides make an offset pass 2**31) are addressed correctly.
"""
import triton
import triton.language as tl


@triton.jit
def tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c):
    """Pointers of the tile rows ``offs_r`` x columns ``offs_c`` of a strided 2-D tensor (int64 offsets)."""
    return ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c


@triton.jit
def tile_mask(offs_r, offs_c, n_r, n_c):
    """In-bounds mask of the tile rows ``offs_r`` x columns ``offs_c`` of an (n_r, n_c) tensor."""
    return (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)


@triton.jit
def load_tile(ptr, offs_r, offs_c, stride_r, stride_c, n_r, n_c):
    """Masked load (zeros outside the (n_r, n_c) bounds) of one tile, in the tensor's dtype."""
    mask = tile_mask(offs_r, offs_c, n_r, n_c)
    return tl.load(tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c), mask=mask, other=0.0)


@triton.jit
def int64_step(block, stride):
    """block * stride as an int64 scalar: the pointer advance of one loop step, safe past 2**31."""
    return tl.full((), block, tl.int64) * stride


@triton.jit
def dot_operand(tile, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Casts a tile for ``tl.dot``: to DOT_DTYPE (the input dtype: fp16/bf16 tensor cores, or fp32).

    Rounding: an fp32 tile (x̃ = D ⊙ x, u, du, or an fp32 adapter) is rounded to fp16/bf16 here, one
    rounding per element before an fp32-accumulated dot. UPCAST (Triton interpreter only, where bf16
    arithmetic is broken) keeps every operand in fp32 instead, which skips that rounding.
    """
    if UPCAST:
        out = tile.to(tl.float32)
    else:
        out = tile.to(DOT_DTYPE)
    return out


@triton.jit
def gemm_loop(acc, a_ptrs, b_ptrs, a_step, b_step, a_rows_ok, b_cols_ok, depth,
              BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """acc += a @ b over ``depth``: a tiles (BM, BLOCK_D) and b tiles (BLOCK_D, BN) advanced by steps."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, depth, BLOCK_D):
        d_ok = offs_d < depth - d0
        a = tl.load(a_ptrs, mask=a_rows_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=d_ok[:, None] & b_cols_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(a, DOT_DTYPE, UPCAST), dot_operand(b, DOT_DTYPE, UPCAST), acc,
                     input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) tile of program ``pid``, walking GROUP row-tiles column by column (L2 reuse).

    Programs launched together then share the GROUP row-panels of the left operand and a few column
    panels of the right one, instead of sweeping one whole row of tiles each.
    """
    tiles_per_group = GROUP * n_cols
    first_row = (pid // tiles_per_group) * GROUP
    rows_here = tl.minimum(n_rows - first_row, GROUP)
    within = pid % tiles_per_group
    return first_row + within % rows_here, within // rows_here
