// Kernels of gated_act_mul and gated_act_mul_backward (launched from gated_act.cu; math in csrc/gated_act.h,
// shared with the CPU kernels).
//
// Elementwise and memory-bound: a grid-stride loop, one thread per group of 4 consecutive elements of the
// logical (M, I) matrix (launch_plan.h's gated_act_blocks). When every input is one dense row-major block
// aligned for 4-wide access (flat_vec) a group moves as one 8-byte (half, bfloat16) or 16-byte (float) load
// per input and one store per output; otherwise (strided inputs, the last partial group) element by element
// through the strides. Outputs are contiguous (M, I). Arithmetic in float32, one rounding per output.
#pragma once

#include "../gated_act.h"
#include "common.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

// (m, k) of flat index i of an (M, I) matrix, advanced one element at a time by next().
struct RowCol {
  int64_t m, k, I;

  __device__ __forceinline__ RowCol(int64_t i, int64_t cols) : m(i / cols), k(i - (i / cols) * cols), I(cols) {}
  __device__ __forceinline__ void next() {
    if (++k == I) {
      k = 0;
      ++m;
    }
  }
};

// The grid-stride walk over groups of 4 consecutive elements: vec(i0) for a whole group of a flat_vec layout,
// else elem(i, m, k) for each element i = i0 .. i0 + 3 that exists, (m, k) its row and column.
template <typename Vec, typename Elem>
__device__ __forceinline__ void for_each_group4(int64_t M, int64_t I, bool flat_vec, Vec&& vec, Elem&& elem) {
  const int64_t numel = M * I;
  const int64_t n_quads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_quads; q += stride) {
    const int64_t i0 = q * 4;
    if (flat_vec && i0 + 3 < numel) {
      vec(i0);
      continue;
    }
    RowCol at(i0, I);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (i0 + t < numel) elem(i0 + t, at.m, at.k);
      at.next();
    }
  }
}

// h = act(gate) (.) up.
template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gated_act_mul_kernel(const T* __restrict__ gate, int64_t sg0, int64_t sg1, const T* __restrict__ up,
                         int64_t su0, int64_t su1, int64_t M, int64_t I, bool flat_vec, T* __restrict__ h) {
  for_each_group4(
      M, I, flat_vec,
      [&](int64_t i0) {
        float g[4], u[4], out[4];
        load4(gate + i0, g);
        load4(up + i0, u);
#pragma unroll
        for (int t = 0; t < 4; ++t) out[t] = gated_act_mul_value<ACT>(g[t], u[t]);
        store4(h + i0, out);
      },
      [&](int64_t i, int64_t m, int64_t k) {
        const float g = to_float(gate[m * sg0 + k * sg1]), u = to_float(up[m * su0 + k * su1]);
        h[i] = from_float<T>(gated_act_mul_value<ACT>(g, u));
      });
}

// d_gate = (dh (.) up) (.) act'(gate), d_up = dh (.) act(gate).
template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gated_act_mul_backward_kernel(const T* __restrict__ dh, int64_t sd0, int64_t sd1, const T* __restrict__ gate,
                                  int64_t sg0, int64_t sg1, const T* __restrict__ up, int64_t su0, int64_t su1,
                                  int64_t M, int64_t I, bool flat_vec, T* __restrict__ d_gate, T* __restrict__ d_up) {
  for_each_group4(
      M, I, flat_vec,
      [&](int64_t i0) {
        float dy[4], g[4], u[4], dg[4], du[4];
        load4(dh + i0, dy);
        load4(gate + i0, g);
        load4(up + i0, u);
#pragma unroll
        for (int t = 0; t < 4; ++t) gated_act_mul_grads<ACT>(dy[t], g[t], u[t], dg[t], du[t]);
        store4(d_gate + i0, dg);
        store4(d_up + i0, du);
      },
      [&](int64_t i, int64_t m, int64_t k) {
        float dg = 0.0f, du = 0.0f;
        gated_act_mul_grads<ACT>(to_float(dh[m * sd0 + k * sd1]), to_float(gate[m * sg0 + k * sg1]),
                                 to_float(up[m * su0 + k * su1]), dg, du);
        d_gate[i] = from_float<T>(dg);
        d_up[i] = from_float<T>(du);
      });
}

}  // namespace cuda
}  // namespace lowcost
