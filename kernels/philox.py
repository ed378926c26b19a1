"""Philox4x32-10 and the LoRA dropout mask as Triton device functions (docs/lora_linear_spec.md).

Algorithm, for a (BLOCK_M, BLOCK_K) tile of the logical (M, K) matrix starting at column k0:

    i       = m * K + k                                  int64 logical index of element (m, k)
    counter = (lo32(i >> 2), hi32(i >> 2), 0, 0);  key = (lo32(seed), hi32(seed))
    word    = philox4x32_10(counter, key)[i & 3]
    keep    = word >= threshold                          unsigned compare, threshold = floor(p * 2**32)

One Philox call yields the words of four consecutive indices. When K % 4 == 0 (and k0 % 4 == 0, which holds
because BLOCK_K is a multiple of 4) the four elements sharing a counter lie in one row of the tile, so the
tile needs BLOCK_M * BLOCK_K / 4 Philox calls (``_keep_tile_vec4``). Otherwise each element runs its own
call and keeps one word (``_keep_tile_scalar``). Both give the same bits. The choice is the constexpr VEC4
(= K % 4 == 0, set by the launcher), not a runtime branch: a boolean mask merged from the two branches of a
runtime ``if`` made Triton 3.9 fail to compile ("shared-memory element type bit width must be a multiple of
8; got 1"), and a constexpr keeps the unused path out of the compiled code.

Scalar arguments: the launchers pass the seed halves and the threshold as int32 bit patterns
(``uint32_as_int32``) so that every launch has the same signature; the kernels bitcast them back.
"""
import struct

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)

MASK32 = 0xFFFFFFFF


def uint32_as_int32(value: int) -> int:
    """The int32 with the bit pattern of the uint32 ``value`` (a Python int in [0, 2**32))."""
    assert 0 <= value <= MASK32, f"not a uint32: {value}"
    return value - (1 << 32) if value >= (1 << 31) else value


def seed_words(seed: int) -> tuple[int, int]:
    """Philox key (lo32(seed), hi32(seed)) as int32 bit patterns, for a seed in [0, 2**63)."""
    assert 0 <= seed < 2**63, f"seed must be in [0, 2**63), got {seed}"
    return uint32_as_int32(seed & MASK32), uint32_as_int32((seed >> 32) & MASK32)


def dropout_threshold(p: float) -> int:
    """floor(p * 2**32): an element is dropped iff its Philox word is below it."""
    assert 0.0 <= p < 1.0, f"dropout must be in [0, 1), got {p}"
    return int(p * 4294967296.0)


def keep_scale(p: float) -> float:
    """float32(1 / (1 - p)) (round to nearest), the factor applied to kept elements."""
    return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 tensors (or scalars); returns the four output words."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _philox_counter(c, seed_lo, seed_hi):
    """Philox words of the int64 counters ``c`` with the key given as int32 bit patterns."""
    c0 = (c & 0xFFFFFFFF).to(tl.uint32)
    c1 = (c >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    return philox4x32_10(c0, c1, zero, zero, k0, k1)


@triton.jit
def _keep_tile_scalar(offs_m, offs_k, K, seed_lo, seed_hi, threshold):
    """Keep-mask of the tile rows ``offs_m`` x columns ``offs_k``, one Philox call per element."""
    i = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w0, w1, w2, w3 = _philox_counter(i >> 2, seed_lo, seed_hi)
    lane = i & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return word >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _keep_tile_vec4(offs_m, k0, K, seed_lo, seed_hi, threshold, BLOCK_K: tl.constexpr):
    """Keep-mask of rows ``offs_m`` x columns [k0, k0 + BLOCK_K) when K % 4 == 0 and k0 % 4 == 0."""
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    c = offs_m.to(tl.int64)[:, None] * (K // 4) + quads[None, :]
    w0, w1, w2, w3 = _philox_counter(c, seed_lo, seed_hi)
    # join stacks on a new minor dim: join(join(a, b), join(c, d)) flattens as a, c, b, d.
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    words = tl.reshape(words, (offs_m.shape[0], BLOCK_K))
    return words >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def dropout_keep_tile(offs_m, k0, K, seed_lo, seed_hi, threshold, BLOCK_K: tl.constexpr, VEC4: tl.constexpr):
    """Bool (len(offs_m), BLOCK_K) keep-mask of logical rows ``offs_m`` and columns [k0, k0 + BLOCK_K).

    VEC4 must equal K % 4 == 0. Columns past K (and rows past M) get values too; callers mask them out
    with their loads and stores.
    """
    if VEC4:
        keep = _keep_tile_vec4(offs_m, k0, K, seed_lo, seed_hi, threshold, BLOCK_K)
    else:
        keep = _keep_tile_scalar(offs_m, k0 + tl.arange(0, BLOCK_K), K, seed_lo, seed_hi, threshold)
    return keep


@triton.jit
def dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K: tl.constexpr,
                       VEC4: tl.constexpr):
    """Float32 (len(offs_m), BLOCK_K) tile of D: keep_scale where kept, 0 where dropped."""
    keep = dropout_keep_tile(offs_m, k0, K, seed_lo, seed_hi, threshold, BLOCK_K, VEC4)
    return tl.where(keep, keep_scale, 0.0)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _dropout_mask_kernel(
    # pointers
    out_ptr,
    # sizes
    M, K, row_offset,
    # strides
    stride_om,
    # dropout (int32 bit patterns)
    seed_lo, seed_hi, threshold,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, VEC4: tl.constexpr,
):
    """out (M, K) int8: 1 where logical element (row_offset + m, k) of an (·, K) matrix is kept."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep_tile(offs_m + row_offset, k0, K, seed_lo, seed_hi, threshold, BLOCK_K, VEC4)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
