// Device helpers shared by the lowcost CUDA kernels: element conversion, 4-wide loads and stores,
// the masked x-tile loader, and launch utilities.
#pragma once

#include "../philox.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#ifndef LOWCOST_CUDA_EMULATION  // csrc/tests/test_cuda_emulated.cpp runs these kernels on host threads
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>
#include <utility>

namespace lowcost {
namespace cuda {

constexpr int kThreads = 256;    // every kernel here runs 256-thread blocks
constexpr int kColThreads = 16;  // threads across the rank dimension in the register-tiled kernels

// A launch grid (x, y) in blocks, computed on the host.
struct LaunchGrid {
  int64_t x;
  int64_t y;
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// Four consecutive elements moved as one 16-byte (float) or 8-byte (half, bfloat16) access.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
  for (int t = 0; t < 4; ++t) out[t] = to_float(pack.v[t]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float in[4]) {
  Pack4<T> pack;
#pragma unroll
  for (int t = 0; t < 4; ++t) pack.v[t] = from_float<T>(in[t]);
  *reinterpret_cast<Pack4<T>*>(p) = pack;
}

template <typename T>
inline bool is_aligned4(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// True when rows of a (rows, cols) matrix with strides (s0, s1) can be read 4 elements at a time at
// column offsets that are multiples of 4.
template <typename T>
inline bool rows_vectorizable(const T* base, int64_t s0, int64_t s1) {
  return s1 == 1 && s0 % 4 == 0 && is_aligned4(base);
}

// True when the (M, K) matrix is one dense row-major block (flat index = memory offset) starting at
// an address aligned for 4-wide access.
template <typename T>
inline bool rows_are_flat_vectorizable(const T* base, int64_t M, int64_t K, int64_t s0, int64_t s1) {
  return (K == 1 || s1 == 1) && (M == 1 || s0 == K) && is_aligned4(base);
}

// Reads x[m, k .. k+3] (m < M; columns at or past K read as 0) as float32 and applies the dropout
// mask of logical elements m*K + k .. m*K + k + 3. Returns the keep bits (bit t = element k + t).
// `vec` selects one aligned 4-wide load (see rows_vectorizable).
template <typename xT>
__device__ __forceinline__ uint32_t load_masked4(const xT* __restrict__ x, int64_t m, int64_t k,
                                                 int64_t K, int64_t sx0, int64_t sx1, bool vec,
                                                 const DropoutParams& d, float v[4]) {
  const xT* row = x + m * sx0;
  if (vec && k + 3 < K) {
    load4(row + k, v);
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = (k + t < K) ? to_float(row[(k + t) * sx1]) : 0.0f;
  }
  const uint32_t bits = dropout_keep4(d, static_cast<uint64_t>(m * K + k));
#pragma unroll
  for (int t = 0; t < 4; ++t) v[t] = dropout_apply(d, (bits >> t) & 1u, v[t]);
  return bits;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_grid(const LaunchGrid& grid, const char* op) {
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7FFFFFFF && grid.y >= 1 && grid.y <= 65535, "lowcost::", op,
              ": problem too large for one launch (grid ", grid.x, " x ", grid.y, " blocks)");
}

#ifndef LOWCOST_CUDA_EMULATION
inline dim3 to_dim3(const LaunchGrid& grid) {
  return dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y));
}
#endif

// Calls f(std::integral_constant<int, RT>) with the register tile RT in {16, 32, 64} that covers r
// (ranks above 64 are processed in chunks of 64).
template <typename F>
void dispatch_rank_tile(int64_t r, F&& f) {
  if (r <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (r <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

}  // namespace cuda
}  // namespace lowcost
