"""Dequantizing a tile of a quantized weight inside a Triton GEMM (lowcost/reference/quant is the ground truth).

``dequant_tile(q, offs_n, offs_k, ...)`` returns the float32 tile W[offs_n, offs_k] (rows of W index N, columns
K; zeros outside (N, K)) decoded from the stored bytes, so the forward GEMM uses it as the (BLOCK_N, BLOCK_K)
tile of W (transposed for the dot) and the dgrad GEMM as the (BLOCK_K-over-N, BLOCK_N-over-K) tile it reads
along W's rows: the same decoder serves both access orders. FMT selects the format (constexpr):

    FMT  format   operands (p0, p1, p2, p3, p4)                            element (n, k)
    0    nf4      codes u8 (N, Kp/2), absmax f32 (N, Kp/B), NF4 table        NF4[nibble] · absmax[n, k/B]
    1    nf4-dq   codes, absmax_q u8 (N, Kp/B), NF4 table, absmax_scale f32, dynamic code f32 (256)
                  absmax = DYN[absmax_q] · absmax_scale[(n·Kp/B + k/B) / 256] + offset
    2    int8     qweight i8 (N, K), scale f32 (N,)                          q · scale[n]
    3    q8_0     data u8 (N, K/32·34)                                       int8 q · f16 d
    4    q4_0     data u8 (N, K/32·18)                                       f16 d · (nibble - 8)
    5    q4_1     data u8 (N, K/32·20)                                       f16 d · nibble + f16 m
    6    q4_k     data u8 (N, K/256·144)                     f16 d · sc[j/32] · nibble − f16 dmin · mn[j/32]
    7    q6_k     data u8 (N, K/256·210)                     f16 d · i8 sc[j/16] · (6-bit code − 32)

The NF4 nibble of element k is the high half of byte k/2 for even k, the low half for odd k; the GGUF 4-bit
blocks keep elements 0-15 of a block in the low nibbles of its 16 code bytes and 16-31 in the high ones. Row
strides (``stride_0``, ``stride_1``) are in elements of p0 / p1.

The k-quants hold 256 elements per block; j is the element's index in its block:
- Q4_K (d, dmin, 12 bytes of 6-bit scales/mins, 128 code bytes): element j is the low nibble of code byte
  32·(j/64) + j%32 when j%64 < 32, else its high nibble; sub-block j/32 has scale sc and min mn, packed as
  ``lowcost.reference.quant.gguf_blocks.q4_k_scales`` unpacks them (6 bits, the top two of 4-7 borrowed).
- Q6_K (128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d at byte 208): with h = j/128, w = j%128,
  the low 4 bits are byte 64h + w%64 (low nibble for w < 64, high otherwise), the top 2 bits are bits
  2·(w/32) of byte 128 + 32h + w%32.
"""
import triton
import triton.language as tl

NF4, NF4_DQ, INT8, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K = 0, 1, 2, 3, 4, 5, 6, 7
FORMAT_IDS = {"nf4": NF4, "nf4-dq": NF4_DQ, "int8": INT8, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1,
              "q4_k": Q4_K, "q6_k": Q6_K}


@triton.jit
def _f16_of_bytes(lo, hi):
    """float32 of the little-endian float16 whose low and high bytes are ``lo`` and ``hi`` (uint8 tiles)."""
    return (lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_at(ptr):
    """float32 of the little-endian float16 stored at the byte pointers ``ptr`` (any tile shape)."""
    return _f16_of_bytes(tl.load(ptr), tl.load(ptr + 1))


@triton.jit
def _f16_at_masked(ptr, ok):
    """``_f16_at`` where ``ok``, 0 elsewhere; ``ptr`` need not point anywhere valid outside ``ok`` (masked
    loads: no clamped pointer tile has to be built, see _q6_k_tile)."""
    return _f16_of_bytes(tl.load(ptr, mask=ok, other=0), tl.load(ptr + 1, mask=ok, other=0))


@triton.jit
def _nf4_tile(codes_ptr, table_ptr, rows, cols, ok, stride_0):
    """NF4 code values (not yet scaled) of the tile."""
    byte = tl.load(codes_ptr + rows * stride_0 + cols // 2, mask=ok, other=0).to(tl.int32)
    nibble = tl.where(cols % 2 == 0, byte >> 4, byte & 15)
    return tl.load(table_ptr + nibble)


@triton.jit
def _gguf_4bit(data_ptr, rows, cols, ok, stride_0, TYPE_SIZE: tl.constexpr, HEAD: tl.constexpr):
    """(base pointer of each element's block, its 4-bit code) for Q4_0 / Q4_1 (HEAD: bytes before the codes)."""
    block = data_ptr + rows * stride_0 + (cols // 32) * TYPE_SIZE
    j = cols % 32
    byte = tl.load(block + HEAD + (j % 16), mask=ok, other=0).to(tl.int32)
    return block, tl.where(j < 16, byte & 15, byte >> 4)


@triton.jit
def _q4_k_tile(block, j, ok):
    """Q4_K values of the elements j (index in the block) of the blocks at byte pointers ``block``."""
    byte = tl.load(block + 16 + (j // 64) * 32 + j % 32, mask=ok, other=0).to(tl.int32)
    code = tl.where(j % 64 < 32, byte & 15, byte >> 4).to(tl.float32)
    sub = j // 32
    low = sub % 4
    sc_byte = tl.load(block + 4 + low, mask=ok, other=0).to(tl.int32)    # scale of sub (sub < 4), top bits (≥ 4)
    mn_byte = tl.load(block + 8 + low, mask=ok, other=0).to(tl.int32)    # min likewise
    high = tl.load(block + 12 + low, mask=ok, other=0).to(tl.int32)      # low 4 bits of scale/min 4-7
    sc = tl.where(sub < 4, sc_byte & 63, (high & 15) | ((sc_byte >> 2) & 48)).to(tl.float32)
    mn = tl.where(sub < 4, mn_byte & 63, (high >> 4) | ((mn_byte >> 2) & 48)).to(tl.float32)
    return (_f16_at(block) * sc) * code - _f16_at(block + 2) * mn


@triton.jit
def _q6_k_tile(block, j, ok):
    """Q6_K values of the elements j (index in the block) of the blocks at byte pointers ``block``; every load is
    masked by ``ok`` (outside it ``block`` may point past the data, the value is then 0 and dropped by the caller).

    Masking d's two bytes instead of clamping the pointers (``tl.where(ok, block, p0)``, as the other GGUF formats
    do) takes the fused MLP's y GEMM (qmlp_down_y, 64x64x64 w4 s3, bf16) from 251 to 182 registers with Triton
    3.9.0 (168 with 3.6.0 either way): the clamped pointer tile, 64-bit per element, was kept live beside the
    decode. The values inside ``ok`` are the same bytes, so every result is bitwise unchanged.

    The same change on Q8_0, Q4_0, Q4_1 and Q4_K (issue #13, measured with ``tools/kernel_report.py --op
    qlora_linear --op qlora_gated_mlp --op qlora_grouped_linear``, bf16, sm_90a; results bitwise unchanged) was
    tried and not kept, each format costing a CTA/SM or tens of registers on one of the two Triton versions:
    Q8_0 qbwd_dx (p=0) 128 -> 153 with 3.9.0 (2 -> 1 CTAs/SM); Q4_0 qmlp_down_y 139 -> 168 with 3.6.0 and
    168 -> 174 with 3.9.0 (3 -> 2); Q4_1 qbwd_dx 136 -> 200 (p=0) and 128 -> 172 (p=0.05, 2 -> 1) with 3.9.0,
    qmlp_dh +17/+21 with 3.6.0; Q4_K qmlp_dh 80 -> 101 with 3.6.0 (3 -> 2 CTAs/SM), although with 3.9.0 its
    qfwd_y (190 -> 128) and qbwd_dx (222 -> 128, 233 -> 121) went from 1 to 2 CTAs/SM. So those formats keep the
    clamped pointer tile."""
    half = j // 128
    w = j % 128
    low = tl.load(block + 64 * half + w % 64, mask=ok, other=0).to(tl.int32)
    low = tl.where(w < 64, low & 15, low >> 4)
    high = (tl.load(block + 128 + 32 * half + w % 32, mask=ok, other=0).to(tl.int32) >> (2 * (w // 32))) & 3
    code = ((low | (high << 4)) - 32).to(tl.float32)
    sc = tl.load(block + 192 + j // 16, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return (_f16_at_masked(block + 208, ok) * sc) * code


@triton.jit
def dequant_tile(p0, p1, p2, p3, p4, offs_n, offs_k, N, K, NB, stride_0, stride_1, offset,
                 FMT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """float32 W[offs_n[:, None], offs_k[None, :]] of a quantized (N, K) weight; zeros outside it.
    NB: blocks per row (NF4 absmax columns), BLOCK_SIZE: the NF4 block (unused otherwise)."""
    rows = offs_n.to(tl.int64)[:, None]
    cols = offs_k.to(tl.int64)[None, :]
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if FMT == 0:
        value = _nf4_tile(p0, p2, rows, cols, ok, stride_0) * \
            tl.load(p1 + rows * stride_1 + cols // BLOCK_SIZE, mask=ok, other=0.0)
    elif FMT == 1:
        flat = rows * NB + cols // BLOCK_SIZE
        q8 = tl.load(p1 + rows * stride_1 + cols // BLOCK_SIZE, mask=ok, other=0).to(tl.int32)
        absmax = tl.load(p4 + q8) * tl.load(p3 + flat // 256, mask=ok, other=0.0) + offset
        value = _nf4_tile(p0, p2, rows, cols, ok, stride_0) * absmax
    elif FMT == 2:
        q = tl.load(p0 + rows * stride_0 + cols, mask=ok, other=0).to(tl.float32)
        value = q * tl.load(p1 + rows, mask=offs_n[:, None] < N, other=0.0)
    elif FMT == 3:
        block = p0 + rows * stride_0 + (cols // 32) * 34
        q = tl.load(block + 2 + cols % 32, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        value = q * tl.where(ok, _f16_at(tl.where(ok, block, p0)), 0.0)
    elif FMT == 4:
        block, code = _gguf_4bit(p0, rows, cols, ok, stride_0, 18, 2)
        value = tl.where(ok, _f16_at(tl.where(ok, block, p0)), 0.0) * (code - 8).to(tl.float32)
    elif FMT == 5:
        block, code = _gguf_4bit(p0, rows, cols, ok, stride_0, 20, 4)
        safe = tl.where(ok, block, p0)
        value = tl.where(ok, _f16_at(safe) * code.to(tl.float32) + _f16_at(safe + 2), 0.0)
    elif FMT == 6:
        block = tl.where(ok, p0 + rows * stride_0 + (cols // 256) * 144, p0)
        value = _q4_k_tile(block, cols % 256, ok)
    else:
        value = _q6_k_tile(p0 + rows * stride_0 + (cols // 256) * 210, cols % 256, ok)
    return tl.where(ok, value, 0.0)
