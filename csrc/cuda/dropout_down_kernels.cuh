// Kernels of philox_dropout and lora_down (launched from dropout_down.cu).
//
// lora_down computes u = (D (.) x) A^T, a skinny GEMM (r is small) that is bound by reading x.
// One block owns BM = 64 rows of x and RT output columns of u (RT in {16, 32, 64}; ranks above 64
// use gridDim.y chunks of 64, re-reading x once per chunk). It walks K in tiles of BK = 32:
//   stage the x~ tile (BK x BM, float32, mask and keep_scale applied while loading x once, 4 elements
//   per thread-load and one Philox call per 4 elements), stage the A tile (BK x RT, float32),
//   then every thread accumulates a 4 x (RT/16) register tile of u.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace lowcost {
namespace cuda {

// --------------------------------------------------------------------------------------------
// philox_dropout: one thread per group of 4 consecutive output elements (one Philox call each).
template <typename xT>
__global__ void __launch_bounds__(kThreads)
    philox_dropout_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1,
                          bool flat_vec, DropoutParams d, xT* __restrict__ out) {
  const int64_t numel = M * K;
  const int64_t n_quads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_quads;
       q += stride) {
    const int64_t i0 = q * 4;
    const uint32_t bits = dropout_keep4(d, static_cast<uint64_t>(i0));
    if (flat_vec && i0 + 3 < numel) {
      float v[4];
      load4(x + i0, v);
#pragma unroll
      for (int t = 0; t < 4; ++t) v[t] = dropout_apply(d, (bits >> t) & 1u, v[t]);
      store4(out + i0, v);
    } else {
      int64_t m = i0 / K;
      int64_t k = i0 - m * K;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (i0 + t < numel) {
          const float v = to_float(x[m * sx0 + k * sx1]);
          out[i0 + t] = from_float<xT>(dropout_apply(d, (bits >> t) & 1u, v));
        }
        if (++k == K) {
          k = 0;
          ++m;
        }
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// lora_down
constexpr int kDownBM = 64;   // rows of x per block
constexpr int kDownBK = 32;   // K tile
constexpr int kDownTM = 4;    // rows per thread

template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads)
    lora_down_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1,
                     bool x_vec, const aT* __restrict__ a, int64_t r, int64_t sa0, int64_t sa1,
                     DropoutParams d, float* __restrict__ u) {
  constexpr int TN = RT / kColThreads;                      // u columns per thread
  static_assert(kThreads == (kDownBM / kDownTM) * kColThreads, "thread tile mismatch");
  __shared__ float xs[kDownBK][kDownBM + 1];                // x~ tile, transposed
  __shared__ float as[kDownBK][RT + 1];                     // A tile, transposed

  const int tid = threadIdx.x;
  const int tc = tid % kColThreads;
  const int tr = tid / kColThreads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDownBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RT;

  float acc[kDownTM][TN];
#pragma unroll
  for (int i = 0; i < kDownTM; ++i)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc[i][c] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kDownBK) {
    // x tile: BM rows x BK columns = 512 groups of 4 columns, 2 per thread.
#pragma unroll
    for (int s = 0; s < (kDownBM * kDownBK / 4) / kThreads; ++s) {
      const int q = tid + s * kThreads;
      const int row = q / (kDownBK / 4);
      const int kq = (q % (kDownBK / 4)) * 4;
      const int64_t m = m0 + row;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (m < M) load_masked4(x, m, k0 + kq, K, sx0, sx1, x_vec, d, v);
#pragma unroll
      for (int t = 0; t < 4; ++t) xs[kq + t][row] = v[t];
    }
    // A tile: RT x BK, consecutive threads read consecutive k of one row of A.
    for (int e = tid; e < RT * kDownBK; e += kThreads) {
      const int j = e / kDownBK;
      const int kk = e % kDownBK;
      const int64_t jj = j0 + j;
      const int64_t k = k0 + kk;
      as[kk][j] = (jj < r && k < K) ? to_float(a[jj * sa0 + k * sa1]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kDownBK; ++kk) {
      float xv[kDownTM], av[TN];
#pragma unroll
      for (int i = 0; i < kDownTM; ++i) xv[i] = xs[kk][tr * kDownTM + i];
#pragma unroll
      for (int c = 0; c < TN; ++c) av[c] = as[kk][tc + c * kColThreads];
#pragma unroll
      for (int i = 0; i < kDownTM; ++i)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc[i][c] = fmaf(xv[i], av[c], acc[i][c]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kDownTM; ++i) {
    const int64_t m = m0 + tr * kDownTM + i;
    if (m >= M) continue;
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t j = j0 + tc + c * kColThreads;
      if (j < r) u[m * r + j] = acc[i][c];
    }
  }
}

// Launch shapes, shared by the launchers and the host emulation test.
inline int64_t philox_dropout_blocks(int64_t numel, int64_t sm_count) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(ceil_div(numel, 4), kThreads), sm_count * 16));
}

inline LaunchGrid lora_down_grid(int64_t M, int64_t r, int RT) {
  return {ceil_div(M, kDownBM), std::max<int64_t>(1, ceil_div(r, RT))};
}

}  // namespace cuda
}  // namespace lowcost
