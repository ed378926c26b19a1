// Block-level tile helpers of the skinny kernels: staging a tile of a strided matrix into shared
// memory (16-byte cp.async chunks, or plain loads when the rows are not 16-byte aligned; contiguous rows or
// rows gathered by the caller), the dropout mask applied to a staged x tile (in place, or into a second tile), and
// rows of 8 leaving as 16-byte stores.
#pragma once

#include "launch_plan.h"
#include "mma.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

// Elements per 16-byte chunk.
template <typename T>
constexpr int kChunk = 16 / static_cast<int>(sizeof(T));

// True when every row of a (rows, cols) matrix with strides (s0, s1) can be read in 16-byte chunks
// starting at column 0 (contiguous rows, 16-byte aligned row starts).
template <typename T>
inline bool rows_vec16(const T* base, int64_t rows, int64_t s0, int64_t s1) {
  return s1 == 1 && (rows <= 1 || s0 % kChunk<T> == 0) && reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
}

// dst (ROWS x COLS, leading dimension padded_ld(COLS)) = rows source_row(0 .. ROWS-1) x columns
// [c0, c0 + COLS) of the (., n_cols) matrix src with strides (s0, s1); source_row(row) is the row of src
// that tile row `row` holds, or -1 for a row of zeros; columns past n_cols are 0. With `vec` (rows_vec16, c0 a
// multiple of kChunk) every thread issues cp.async chunks (the caller commits and waits); otherwise the copy is
// synchronous.
template <typename T, int ROWS, int COLS, typename SourceRow>
__device__ __forceinline__ void stage_tile_rows(T* dst, const T* src, SourceRow source_row, int64_t c0,
                                                int64_t n_cols, int64_t s0, int64_t s1, bool vec) {
  constexpr int LD = padded_ld(COLS, sizeof(T));
  constexpr int E = kChunk<T>;
  static_assert(COLS % E == 0, "tile width must be a whole number of 16-byte chunks");
  if (vec) {
#pragma unroll 1
    for (int q = threadIdx.x; q < ROWS * COLS / E; q += kThreads) {
      const int row = q / (COLS / E), col = (q % (COLS / E)) * E;
      const int64_t gr = source_row(row), gc = c0 + col;
      const int64_t left = n_cols - gc;
      const int valid = (gr >= 0 && left > 0) ? static_cast<int>(left < E ? left : E) : 0;
      cp_async_16(dst + row * LD + col, valid > 0 ? src + gr * s0 + gc : src, valid * static_cast<int>(sizeof(T)));
    }
  } else {
#pragma unroll 1
    for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
      const int row = e / COLS, col = e % COLS;
      const int64_t gr = source_row(row), gc = c0 + col;
      dst[row * LD + col] = (gr >= 0 && gc < n_cols) ? src[gr * s0 + gc * s1] : T(0.0f);
    }
  }
}

// dst = rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of the (n_rows, n_cols) matrix src (stage_tile_rows);
// elements outside the matrix are 0.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int64_t r0, int64_t c0, int64_t n_rows,
                                           int64_t n_cols, int64_t s0, int64_t s1, bool vec) {
  stage_tile_rows<T, ROWS, COLS>(
      dst, src, [=](int row) { return r0 + row < n_rows ? r0 + row : int64_t{-1}; }, c0, n_cols, s0, s1, vec);
}

// Groups of 8 consecutive columns of a ROWS x COLS tile, handed out to threads: group q =
// threadIdx.x + s * kThreads for s < kGroups8 / kThreads.
template <int ROWS, int COLS>
struct RowGroups {
  static constexpr int kPerThread = ROWS * COLS / 8 / kThreads;
  static_assert(kPerThread >= 1 && kPerThread <= 4 && ROWS * COLS % (8 * kThreads) == 0, "group split");
  __device__ static int row(int s) { return (static_cast<int>(threadIdx.x) + s * kThreads) / (COLS / 8); }
  __device__ static int col(int s) { return (static_cast<int>(threadIdx.x) + s * kThreads) % (COLS / 8) * 8; }
};

// dst = D (.) src (mask values only: keep_scale is the caller's) for a staged x tile src whose element (0, 0) is
// x[r0, c0] of the logical (M, K) matrix (one Philox call per 4 elements); dst may be src (Copy false: only the
// dropped elements are written, as zeros) or another tile of the same layout (Copy true: every element is
// written). Returns this thread's keep bits: group s of RowGroups in bits 8s .. 8s + 7. Elements outside the
// matrix are 0 in src and stay 0.
template <typename T, int ROWS, int COLS, bool Copy>
__device__ __forceinline__ uint32_t apply_tile_mask(const T* src, T* dst, int64_t r0, int64_t c0, int64_t K,
                                                    const DropoutParams& d) {
  using G = RowGroups<ROWS, COLS>;
  constexpr int LD = padded_ld(COLS, sizeof(T));
  uint32_t all_bits = 0;
#pragma unroll
  for (int s = 0; s < G::kPerThread; ++s) {
    const int row = G::row(s), col = G::col(s);
    const uint32_t bits = dropout_keep8(d, static_cast<uint64_t>((r0 + row) * K + c0 + col));
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int e = row * LD + col + t;
      if (!((bits >> t) & 1u)) {
        dst[e] = T(0.0f);
      } else if (Copy) {
        dst[e] = src[e];
      }
    }
    all_bits |= bits << (8 * s);
  }
  return all_bits;
}

// Zeroes the dropped elements of a staged x tile in place (apply_tile_mask); returns the thread's keep bits.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ uint32_t mask_tile(T* tile, int64_t r0, int64_t c0, int64_t K, const DropoutParams& d) {
  return apply_tile_mask<T, ROWS, COLS, false>(tile, tile, r0, c0, K, d);
}

// dst = D (.) src for a staged x tile, src unchanged (apply_tile_mask): one staged tile, several masks. Returns the
// thread's keep bits.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ uint32_t masked_copy_tile(const T* src, T* dst, int64_t r0, int64_t c0, int64_t K,
                                                     const DropoutParams& d) {
  return apply_tile_mask<T, ROWS, COLS, true>(src, dst, r0, c0, K, d);
}

template <typename T>
struct alignas(16) Vec16 {
  T v[kChunk<T>];
};

// p[0 .. n_valid) = v rounded to T: 16-byte stores when `vec` (p 16-byte aligned) and all 8 are
// valid, element stores otherwise.
template <typename T>
__device__ __forceinline__ void store_row8(T* p, const float (&v)[8], int64_t n_valid, bool vec) {
  if (vec && n_valid >= 8) {
#pragma unroll
    for (int c = 0; c < 8 / kChunk<T>; ++c) {
      Vec16<T> pack;
#pragma unroll
      for (int e = 0; e < kChunk<T>; ++e) pack.v[e] = from_float<T>(v[c * kChunk<T> + e]);
      *reinterpret_cast<Vec16<T>*>(p + c * kChunk<T>) = pack;
    }
  } else {
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t < n_valid) p[t] = from_float<T>(v[t]);
    }
  }
}

// Reads 8 consecutive floats of a shared fp32 tile (16-byte aligned).
__device__ __forceinline__ void load_row8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

}  // namespace cuda
}  // namespace lowcost
