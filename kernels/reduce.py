"""Fixed-order sum of per-block partials: the deterministic half of the LoRA kernels' reductions.

    out[i, j]  = Σ_{p = 0 .. n_parts-1} part[p, i, j]      in that order, fp32, then one rounding to out's dtype
    out2[i, j] = scale2 · out[i, j] (before rounding)      optional second output (HAS_OUT2), e.g. s·u in x's
                                                           dtype next to u in fp32

``part`` is (n_parts, rows, cols) fp32 with unit stride along cols; ``out`` and ``out2`` are (rows, cols)
with unit column stride and any row stride (the padded low-rank buffers). EMULATE_RNE: interpreter only,
see tiles.round_to. Each program owns BLOCK
consecutive elements and adds the partials in index order, so the result does not depend on how programs
are scheduled: bitwise the same on every run, no atomics.
"""
import triton
import triton.language as tl

from .tiles import round_to


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, out2_ptr, n_parts, rows, cols, stride_part, stride_prow,
                            stride_orow, stride_o2row, scale2, HAS_OUT2: tl.constexpr, EMULATE_RNE: tl.constexpr,
                            BLOCK: tl.constexpr):
    """out = Σ_p part[p] (fp32 accumulate in index order p = 0, 1, ...); out2 = scale2 · out."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = offs // cols
    col = offs % cols
    ok = row < rows  # (rows or cols equal to 1 arrive as constants: the JIT specialises them)
    ptrs = part_ptr + row * stride_prow + col
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, n_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += stride_part
    tl.store(out_ptr + row * stride_orow + col, round_to(acc, out_ptr.dtype.element_ty, EMULATE_RNE), mask=ok)
    if HAS_OUT2:
        out2 = round_to(acc * scale2, out2_ptr.dtype.element_ty, EMULATE_RNE)
        tl.store(out2_ptr + row * stride_o2row + col, out2, mask=ok)
