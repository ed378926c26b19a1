"""Small Triton device helpers shared by the LoRA kernels: tile loads and stores (TMA or pointers), dot
operands, tile order.

Two ways to move a tile, chosen per launch by the constexpr TMA:
- TMA=True: ``src`` is a host-side tensor descriptor (triton.tools.tensor_descriptor.TensorDescriptor)
  whose block shape is the tile; the hardware copies the tile and fills what lies outside the tensor with
  zeros (stores outside are dropped). Needs a 16-byte aligned base, 16-byte aligned strides and a last
  stride of 1; the launchers check that and fall back to pointers otherwise.
- TMA=False: ``src`` is a pointer; masked loads and stores with the given strides. Every offset is widened
  to int64 before it meets a stride, so tensors past 2**31 elements (or views whose strides make an offset
  pass 2**31) are addressed correctly.
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
    """Masked pointer load (zeros outside the (n_r, n_c) bounds) of one tile, in the tensor's dtype."""
    mask = tile_mask(offs_r, offs_c, n_r, n_c)
    return tl.load(tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c), mask=mask, other=0.0)


@triton.jit
def load_2d(src, off_r, off_c, n_r, n_c, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
            TMA: tl.constexpr):
    """(BLOCK_R, BLOCK_C) tile at (off_r, off_c) of an (n_r, n_c) tensor, zeros outside it."""
    if TMA:
        tile = src.load([off_r, off_c])
    else:
        tile = load_tile(src, off_r + tl.arange(0, BLOCK_R), off_c + tl.arange(0, BLOCK_C), stride_r, stride_c,
                         n_r, n_c)
    return tile


@triton.jit
def store_2d(dst, tile, off_r, off_c, n_r, n_c, stride_r, stride_c, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """Stores the part of ``tile`` (already in dst's dtype) that lies inside the (n_r, n_c) tensor."""
    if TMA:
        dst.store([off_r, off_c], tile)
    else:
        offs_r = off_r + tl.arange(0, BLOCK_R)
        offs_c = off_c + tl.arange(0, BLOCK_C)
        tl.store(tile_ptrs(dst, offs_r, offs_c, stride_r, stride_c), tile, mask=tile_mask(offs_r, offs_c, n_r, n_c))


@triton.jit
def dot_operand(tile, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Casts a tile for ``tl.dot``: to DOT_DTYPE (x's dtype: fp16/bf16 tensor cores, or fp32).

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
def round_to(t, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """An fp32 tile rounded to DTYPE (an output's dtype), to nearest even as a GPU rounds.

    EMULATE_RNE (Triton interpreter only): the interpreter converts fp32 to bf16 by truncation, so there
    the rounding is done on the bits (add half an ulp, ties to even, keep the high 16 bits), which gives
    exactly what the GPU's cvt.rn.bf16.f32 gives. Other dtypes convert correctly in the interpreter.
    """
    if EMULATE_RNE and DTYPE == tl.bfloat16:
        bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = t.to(DTYPE)
    return out


@triton.jit
def grouped_tile(tile, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) of output tile number ``tile``, walking GROUP row-tiles column by column (L2 reuse).

    Tiles computed at the same time then share the GROUP row-panels of the left operand and a few column
    panels of the right one, instead of sweeping one whole row of tiles each.
    """
    tiles_per_group = GROUP * n_cols
    first_row = (tile // tiles_per_group) * GROUP
    rows_here = tl.minimum(n_rows - first_row, GROUP)
    within = tile % tiles_per_group
    return first_row + within % rows_here, within // rows_here
