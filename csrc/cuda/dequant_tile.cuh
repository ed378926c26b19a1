// Decoding a 64 x 64 tile of a quantized weight W (N, K) into shared memory, in the compute dtype, for the
// dequantizing GEMMs (dequant_gemm_kernels.cuh). The formats and their packed layouts are those of
// lowcost/reference/quant (the ground truth); each element is the float32 value the reference's
// dequantize_packed computes (same operations, same order, no fused multiply-add), rounded once to the
// compute dtype, so the tile equals the reference's dense weight in that dtype bit for bit:
//
//   format   stored                                                   element (n, k)
//   nf4      codes u8 (N, Kp/2), absmax f32 (N, Kp/B)                  NF4[nibble] * absmax[n, k/B]
//   nf4-dq   codes, absmax_q u8 (N, Kp/B), absmax_scale f32 (groups), absmax_offset f32
//            absmax = DYN[absmax_q[n, b]] * absmax_scale[(n Kp/B + b) / 256] + absmax_offset,  b = k/B
//   int8     qweight i8 (N, K), scale f32 (N,)                         q * scale[n]
//   q8_0     data u8 (N, K/32 * 34): blocks d f16 | q i8[32]             q * d
//   q4_0     data u8 (N, K/32 * 18): blocks d f16 | nibbles[16]          (q - 8) * d
//   q4_1     data u8 (N, K/32 * 20): blocks d f16 | m f16 | nibbles[16]  q * d + m
//   q4_k     data u8 (N, K/256 * 144): super-blocks d f16 | dmin f16 | scales/mins 6-bit x 8 in 12 B |
//            nibbles[128]                           sub-block s = j/32:  (d * sc_s) * q - (dmin * m_s)
//   q6_k     data u8 (N, K/256 * 210): super-blocks ql[128] | qh[64] | scales i8[16] | d f16
//                                                   group g = j/16:      (d * sc_g) * (q - 32)
//
// The NF4 nibble of element k is the high half of code byte k/2 for even k, the low half for odd k; Kp is
// K padded to a whole block (the padding codes are never read: elements with k >= K are 0 in the tile).
// The GGUF 4-bit blocks keep element j < 16 of a block in the low nibble of code byte j and element j >= 16
// in the high nibble of byte j - 16 (the GGUF file's own bytes; K is a whole number of 32-element blocks).
// The k-quants hold 256 elements a super-block (K is a whole number of them); j is the element's index in it:
//   Q4_K: the code is the low nibble of byte 16 + 32 (j/64) + j%32 when j%64 < 32, else its high nibble;
//         the 12 bytes from byte 4 hold sc_s, m_s as 6 bits each: s < 4: sc = b[s] & 63, m = b[s+4] & 63;
//         s >= 4: sc = (b[s+4] & 15) | (b[s-4] >> 6) << 4, m = (b[s+4] >> 4) | (b[s] >> 6) << 4.
//   Q6_K: with h = j/128, w = j%128, q = low | high << 4: low the low nibble of ql[64 h + w%64] for w < 64,
//         else its high nibble; high = (qh[32 h + w%32] >> 2 (w/32)) & 3.
#pragma once

#include "common.cuh"
#include "launch_plan.h"
#include "tiles.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

constexpr int kFmtNf4 = 0;
constexpr int kFmtNf4Dq = 1;
constexpr int kFmtInt8 = 2;
constexpr int kFmtQ8_0 = 3;
constexpr int kFmtQ4_0 = 4;
constexpr int kFmtQ4_1 = 5;
constexpr int kFmtQ4_K = 6;
constexpr int kFmtQ6_K = 7;

constexpr bool is_nf4(int fmt) { return fmt == kFmtNf4 || fmt == kFmtNf4Dq; }

// Device view of a quantized weight (pointers into the stored tensors; unused ones are null).
struct QuantTile {
  const uint8_t* codes = nullptr;        // nf4 codes, int8 qweight bytes, or GGUF block bytes
  int64_t code_stride = 0;               // bytes between rows of codes
  const float* absmax = nullptr;         // nf4: (N, Kp/B); int8: scale (N,)
  const uint8_t* absmax_q = nullptr;     // nf4-dq: (N, Kp/B)
  int64_t absmax_stride = 0;             // elements between rows of absmax / absmax_q
  const float* absmax_scale = nullptr;   // nf4-dq: one per 256 blocks of the flattened absmax
  const float* absmax_offset = nullptr;  // nf4-dq: one value
  const float* nf4_code = nullptr;       // 16 values
  const float* dyn_code = nullptr;       // nf4-dq: 256 values
  int64_t blocks_per_row = 0;            // Kp / B
  int64_t N = 0;
  int64_t K = 0;
  int block_size = 0;
};

// Products and sums rounded as written (no contraction into an FMA), as the float32 reference rounds them.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__device__ __forceinline__ float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// The little-endian float16 at p (a GGUF block's d or m), as float32 (exact).
__device__ __forceinline__ float f16_at(const uint8_t* p) {
  const uint16_t bits = static_cast<uint16_t>(p[0] | (p[1] << 8));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Copies the format's code books into shared memory: tables[0, 16) NF4, tables[16, 272) the dynamic map.
// The caller synchronises before the first decode.
template <int FMT>
__device__ __forceinline__ void load_code_tables(const QuantTile& q, float* tables) {
  if constexpr (is_nf4(FMT)) {
    const int n = FMT == kFmtNf4Dq ? kQgTableFloats : 16;
    for (int e = threadIdx.x; e < n; e += kThreads) tables[e] = e < 16 ? q.nf4_code[e] : q.dyn_code[e - 16];
  }
}

// The float32 absmax of NF4 block b of row n.
template <int FMT>
__device__ __forceinline__ float nf4_absmax(const QuantTile& q, const float* tables, int64_t n, int64_t b) {
  if constexpr (FMT == kFmtNf4) {
    return q.absmax[n * q.absmax_stride + b];
  } else {
    const int code = q.absmax_q[n * q.absmax_stride + b];
    const float scale = q.absmax_scale[(n * q.blocks_per_row + b) / 256];
    return add_rn(mul_rn(tables[16 + code], scale), *q.absmax_offset);
  }
}

// The 6-bit scale and min of sub-block s (0 .. 7) of a Q4_K super-block, from its 12 packed bytes b.
__device__ __forceinline__ void q4_k_scale_min(const uint8_t* b, int s, float& scale, float& min) {
  const int sc = s < 4 ? b[s] & 63 : (b[s + 4] & 15) | ((b[s - 4] >> 6) << 4);
  const int m = s < 4 ? b[s + 4] & 63 : (b[s + 4] >> 4) | ((b[s] >> 6) << 4);
  scale = static_cast<float>(sc);
  min = static_cast<float>(m);
}

// Q4_K: v = W[n, k .. k + 8), k < K a multiple of 8 (one sub-block of 32, one nibble half of 8 code bytes).
__device__ __forceinline__ void decode8_q4_k(const QuantTile& q, int64_t n, int64_t k, float (&v)[8]) {
  const uint8_t* block = q.codes + n * q.code_stride + (k / 256) * 144;
  const int j = static_cast<int>(k % 256);
  float sc, m;
  q4_k_scale_min(block + 4, j / 32, sc, m);
  const float scale = mul_rn(f16_at(block), sc), offset = mul_rn(f16_at(block + 2), m);
  const uint8_t* qs = block + 16 + (j / 64) * 32 + j % 32;
  const int shift = j % 64 < 32 ? 0 : 4;
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] = sub_rn(mul_rn(static_cast<float>((qs[t] >> shift) & 15), scale), offset);
}

// Q6_K: v = W[n, k .. k + 8), k < K a multiple of 8 (one scale group of 16, 8 consecutive ql and qh bytes).
__device__ __forceinline__ void decode8_q6_k(const QuantTile& q, int64_t n, int64_t k, float (&v)[8]) {
  const uint8_t* block = q.codes + n * q.code_stride + (k / 256) * 210;
  const int j = static_cast<int>(k % 256), h = j / 128, w = j % 128;
  const uint8_t* ql = block + 64 * h + w % 64;
  const uint8_t* qh = block + 128 + 32 * h + w % 32;
  const int low_shift = w < 64 ? 0 : 4, high_shift = 2 * (w / 32);
  const float scale = mul_rn(f16_at(block + 208), static_cast<float>(static_cast<int8_t>(block[192 + j / 16])));
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const int code = ((ql[t] >> low_shift) & 15) | (((qh[t] >> high_shift) & 3) << 4);
    v[t] = mul_rn(static_cast<float>(code - 32), scale);
  }
}

// v = W[n, k .. k + 8) in float32 (0 outside W); k is a multiple of 8, so the 8 elements share one block
// (NF4 block sizes are multiples of 8, GGUF blocks hold 32, the k-quants' sub-blocks 32 and 16; K is a whole
// number of GGUF blocks, so k < K puts all 8 inside W).
template <int FMT>
__device__ __forceinline__ void decode8(const QuantTile& q, const float* tables, int64_t n, int64_t k,
                                        float (&v)[8]) {
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] = 0.0f;
  if (n >= q.N || k >= q.K) return;
  if constexpr (FMT == kFmtInt8) {
    const int8_t* row = reinterpret_cast<const int8_t*>(q.codes + n * q.code_stride);
    const float scale = q.absmax[n];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (k + t < q.K) v[t] = mul_rn(static_cast<float>(row[k + t]), scale);
    }
  } else if constexpr (FMT == kFmtQ8_0) {
    const uint8_t* block = q.codes + n * q.code_stride + (k / 32) * 34;
    const float d = f16_at(block);
    const int8_t* qs = reinterpret_cast<const int8_t*>(block + 2 + k % 32);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (k + t < q.K) v[t] = mul_rn(static_cast<float>(qs[t]), d);
    }
  } else if constexpr (FMT == kFmtQ4_K) {
    decode8_q4_k(q, n, k, v);
  } else if constexpr (FMT == kFmtQ6_K) {
    decode8_q6_k(q, n, k, v);
  } else if constexpr (FMT == kFmtQ4_0 || FMT == kFmtQ4_1) {
    constexpr int kTypeSize = FMT == kFmtQ4_0 ? 18 : 20;
    const uint8_t* block = q.codes + n * q.code_stride + (k / 32) * kTypeSize;
    const float d = f16_at(block);
    const int j = static_cast<int>(k % 32);
    const uint8_t* qs = block + (kTypeSize - 16) + j % 16;
    const int shift = j < 16 ? 0 : 4;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (k + t < q.K) {
        const float code = static_cast<float>((qs[t] >> shift) & 15);
        if constexpr (FMT == kFmtQ4_0) {
          v[t] = mul_rn(code - 8.0f, d);
        } else {
          v[t] = add_rn(mul_rn(code, d), f16_at(block + 2));
        }
      }
    }
  } else {
    const float absmax = nf4_absmax<FMT>(q, tables, n, k / q.block_size);
    const uint8_t* bytes = q.codes + n * q.code_stride + k / 2;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (k + 2 * b < q.K) {
        const uint32_t byte = bytes[b];
        v[2 * b] = mul_rn(tables[byte >> 4], absmax);
        if (k + 2 * b + 1 < q.K) v[2 * b + 1] = mul_rn(tables[byte & 15u], absmax);
      }
    }
  }
}

// tile (64 x 64, leading dimension padded_ld(64)) = W[n0 .. n0 + 64, k0 .. k0 + 64) rounded to T, zeros
// outside W; every thread decodes RowGroups' groups of 8 consecutive columns.
template <typename T, int FMT>
__device__ __forceinline__ void decode_w_tile(T* tile, const QuantTile& q, const float* tables, int64_t n0,
                                              int64_t k0) {
  constexpr int LD = padded_ld(kQgBK, sizeof(T));
  using G = RowGroups<kQgBN, kQgBK>;
#pragma unroll
  for (int s = 0; s < G::kPerThread; ++s) {
    const int row = G::row(s), col = G::col(s);
    float v[8];
    decode8<FMT>(q, tables, n0 + row, k0 + col, v);
#pragma unroll
    for (int t = 0; t < 8; ++t) tile[row * LD + col + t] = from_float<T>(v[t]);
  }
}

}  // namespace cuda
}  // namespace lowcost
