// Device helpers shared by the lowcost CUDA kernels: element conversion, 4-wide loads and stores,
// dynamic shared memory, and launch utilities.
#pragma once

#include "../philox.h"
#include "launch_plan.h"

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

// The block's dynamic shared memory (its size is the launch's smem argument, from launch_plan.h).
#if defined(LOWCOST_CUDA_EMULATION)
#define LOWCOST_DYNAMIC_SMEM(name) unsigned char* name = ::lowcost_emu::dynamic_smem()
#else
#define LOWCOST_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

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

// True when the (M, K) matrix is one dense row-major block (flat index = memory offset) starting at
// an address aligned for 4-wide access.
template <typename T>
inline bool rows_are_flat_vectorizable(const T* base, int64_t M, int64_t K, int64_t s0, int64_t s1) {
  return (K == 1 || s1 == 1) && (M == 1 || s0 == K) && is_aligned4(base);
}

inline void check_grid(const LaunchGrid& grid, const char* op) {
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7FFFFFFF && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "lowcost::", op, ": problem too large for one launch (grid ", grid.x, " x ", grid.y, " x ", grid.z,
              " blocks)");
}

#ifndef LOWCOST_CUDA_EMULATION
inline dim3 to_dim3(const LaunchGrid& grid) {
  return dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z));
}
#endif

// Calls f(std::integral_constant<int, RT>) for the rank tile RT of launch_plan.h's rank_tile (16, 32
// or 64; ranks above 64 are processed in chunks of 64).
template <typename F>
void dispatch_rank_tile(int rt, F&& f) {
  if (rt == 16) {
    f(std::integral_constant<int, 16>{});
  } else if (rt == 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

}  // namespace cuda
}  // namespace lowcost
