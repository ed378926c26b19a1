// Kernels of philox_dropout, lora_down and lora_down_grouped (launched from dropout_down.cu).
//
// lora_down: u = (D (.) x) A^T = keep_scale * (mask (.) x) A^T, a skinny GEMM bound by reading x once.
// Block (row tile, K split, rank chunk) owns 64 rows of x, a contiguous range of 64-wide K tiles
// (launch_plan.h: enough splits for 2 blocks per SM) and RT columns of u (RT in {16, 32, 64}; larger
// ranks use grid.z chunks, re-reading x once per chunk). Per K tile, through a 3-stage cp.async pipeline:
//   x tile (64 x 64) and A tile (RT x 64) land in shared memory (16-byte chunks);
//   the mask zeroes dropped x elements in place (one Philox call per 4 elements; keep_scale is
//   applied once to u at the end, so masking is exact in any dtype);
//   warp w multiplies rows 16 (w % 4) .. +16 by k slices 2 (w / 4), +1 on the tensor cores
//   (mma.cuh; FMAs for fp32), accumulating RT / 8 fragments.
// The two k-halves are added in a fixed order (half 0 + half 1) through shared memory and the block
// writes its fp32 partial of u: u itself with one split, else split blockIdx.y of the (splits, M, r)
// workspace that sum_partials reduces.
//
// lora_down_grouped: the same blocks, tiles, pipeline, warp roles and reduction over the stacked adapters
// [A_0; A_1; ...], with one read of x for all P projections: a block's RT columns are 8-wide fragments of one or
// more projections (launch_plan.h), its A tile gathers their rows, and per K tile each projection with dropout
// copies the staged x tile through its own mask (mask values, as lora_down's in-place masking writes) into a second
// tile before the MMAs of its fragments. Every fragment thus sees the values and the order of K terms of its
// projection's lora_down, and its keep_scale multiplies at the end as there.
#pragma once

#include "../checks.h"
#include "common.cuh"
#include "mma.cuh"
#include "tiles.cuh"

#include <algorithm>
#include <cstdint>

namespace lowcost {
namespace cuda {

// --------------------------------------------------------------------------------------------
// philox_dropout: one thread per group of 4 consecutive output elements (one Philox call each).
template <typename xT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
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
// The two K halves of lora_down's warps (wk = 0, 1: each multiplies half of every K tile). Once the stages are
// free, warps wk = 1 park their NF accumulator fragments in the stage memory (each lane its own 4·NF floats), and
// after a barrier warps wk = 0 add them to theirs: acc = acc_0 + acc_1, one add per element.
__device__ __forceinline__ float* k_half_slot(unsigned char* smem, int wm, int nf) {
  return reinterpret_cast<float*>(smem) + (wm * 32 + lane_id()) * nf * 4;
}

template <int NF>
__device__ __forceinline__ void park_k_half(const FragC (&acc)[NF], unsigned char* smem, int wm) {
  float* slot = k_half_slot(smem, wm, NF);
#pragma unroll
  for (int n = 0; n < NF; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) slot[n * 4 + e] = acc[n].x[e];
}

template <int NF>
__device__ __forceinline__ void add_k_half(FragC (&acc)[NF], unsigned char* smem, int wm) {
  const float* slot = k_half_slot(smem, wm, NF);
#pragma unroll
  for (int n = 0; n < NF; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n].x[e] += slot[n * 4 + e];
}

// --------------------------------------------------------------------------------------------
// lora_down
template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_down_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1, bool x_vec,
                     const aT* __restrict__ a, int64_t r, int64_t sa0, int64_t sa1, bool a_vec,
                     DropoutParams d, float* __restrict__ u_parts) {
  constexpr bool kMma = kUseMma<xT>;
  constexpr DownLayout L = down_layout(RT, sizeof(xT), sizeof(aT));
  constexpr int XLD = padded_ld(kDownBK, sizeof(xT));
  constexpr int ALD = padded_ld(kDownBK, sizeof(aT));
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wm = warp % 4, wk = warp / 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDownBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RT;
  const int64_t k_tiles = ceil_div(K, kDownBK);
  const int64_t t0 = range_begin(k_tiles, gridDim.y, blockIdx.y);
  const int64_t n_tiles = range_begin(k_tiles, gridDim.y, blockIdx.y + 1) - t0;
  auto x_tile = [&](int64_t i) { return reinterpret_cast<xT*>(smem + (i % kDownStages) * L.stage); };
  auto a_tile = [&](int64_t i) { return reinterpret_cast<aT*>(smem + (i % kDownStages) * L.stage + L.x_tile); };
  auto load = [&](int64_t i) {  // this block's K tile i into stage i % kDownStages (one commit group)
    if (i < n_tiles) {
      const int64_t k0 = (t0 + i) * kDownBK;
      stage_tile<xT, kDownBM, kDownBK>(x_tile(i), x, m0, k0, M, K, sx0, sx1, x_vec);
      stage_tile<aT, RT, kDownBK>(a_tile(i), a, j0, k0, r, K, sa0, sa1, a_vec);
    }
    cp_async_commit();
  };

  FragC acc[RT / 8];
#pragma unroll
  for (int n = 0; n < RT / 8; ++n) zero(acc[n]);
#pragma unroll
  for (int i = 0; i < kDownStages - 1; ++i) load(i);
  for (int64_t i = 0; i < n_tiles; ++i) {
    cp_async_wait<kDownStages - 2>();
    __syncthreads();  // tile i has landed for every thread; every warp is done with tile i - 1
    load(i + kDownStages - 1);  // into the stage tile i - 1 used
    if (d.enabled) {
      mask_tile<xT, kDownBM, kDownBK>(x_tile(i), m0, (t0 + i) * kDownBK, K, d);
      __syncthreads();
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int kc = (2 * wk + kk) * 16;
      const auto op_x = load_operand_a<kMma, XLD, 1>(x_tile(i) + wm * 16 * XLD + kc);
#pragma unroll
      for (int n = 0; n < RT / 8; ++n) {
        mma(acc[n], op_x, load_operand_b<kMma, 1, ALD>(a_tile(i) + n * 8 * ALD + kc));  // B(k, j) = A[j][k]
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the k-half 1 fragments go through them

  if (wk == 1) park_k_half(acc, smem, wm);
  __syncthreads();
  if (wk == 0) {
    add_k_half(acc, smem, wm);
    float* out = u_parts + static_cast<int64_t>(blockIdx.y) * M * r;
#pragma unroll
    for (int n = 0; n < RT / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + wm * 16 + frag_c_row(e), j = j0 + n * 8 + frag_c_col(e);
        if (m < M && j < r) out[m * r + j] = d.keep_scale * acc[n].x[e];
      }
  }
}

// --------------------------------------------------------------------------------------------
// lora_down_grouped
// The projections of one lora_down_grouped call, passed by value: projection i's rows of the stacked adapters (= its
// columns of u) start at row0[i], its r_i = rank[i] columns take fragments frag0[i] .. frag0[i + 1] - 1 of 8.
struct DownGroup {
  int count = 0;
  int64_t rank[kMaxGroupedProjections] = {};
  int64_t row0[kMaxGroupedProjections] = {};
  int64_t frag0[kMaxGroupedProjections + 1] = {};
  DropoutParams d[kMaxGroupedProjections] = {};
};

// The projection that fragment f belongs to, or -1 past the last fragment.
__device__ __forceinline__ int grouped_projection(const DownGroup& g, int64_t f) {
  for (int i = 0; i < g.count; ++i) {
    if (f < g.frag0[i + 1]) return i;  // a projection of rank 0 has no fragment: frag0[i] == frag0[i + 1]
  }
  return -1;
}

// The row of the stacked adapters that column t (< 8) of fragment f multiplies with, or -1 (a zero row) where
// the fragment runs past its projection's rank.
__device__ __forceinline__ int64_t grouped_a_row(const DownGroup& g, int64_t f, int t) {
  const int i = grouped_projection(g, f);
  if (i < 0) return -1;
  const int64_t j = (f - g.frag0[i]) * 8 + t;
  return j < g.rank[i] ? g.row0[i] + j : -1;
}

template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_down_grouped_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1, bool x_vec,
                             const aT* __restrict__ a, int64_t sa0, int64_t sa1, bool a_vec, DownGroup g, int64_t R,
                             float* __restrict__ u_parts) {
  constexpr bool kMma = kUseMma<xT>;
  constexpr int NF = RT / 8;
  constexpr DownLayout L = down_grouped_layout(RT, sizeof(xT), sizeof(aT));
  constexpr int XLD = padded_ld(kDownBK, sizeof(xT));
  constexpr int ALD = padded_ld(kDownBK, sizeof(aT));
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wm = warp % 4, wk = warp / 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDownBM;
  const int64_t f0 = static_cast<int64_t>(blockIdx.z) * NF;  // the chunk's first fragment
  const int64_t k_tiles = ceil_div(K, kDownBK);
  const int64_t t0 = range_begin(k_tiles, gridDim.y, blockIdx.y);
  const int64_t n_tiles = range_begin(k_tiles, gridDim.y, blockIdx.y + 1) - t0;
  int proj[NF];  // the projection of each of the chunk's fragments (-1 past the last)
#pragma unroll
  for (int n = 0; n < NF; ++n) proj[n] = grouped_projection(g, f0 + n);
  int p_last = proj[0];
#pragma unroll
  for (int n = 1; n < NF; ++n) p_last = proj[n] > p_last ? proj[n] : p_last;
  xT* masked = reinterpret_cast<xT*>(smem + down_grouped_masked_tile(L));
  auto x_tile = [&](int64_t i) { return reinterpret_cast<xT*>(smem + (i % kDownStages) * L.stage); };
  auto a_tile = [&](int64_t i) { return reinterpret_cast<aT*>(smem + (i % kDownStages) * L.stage + L.x_tile); };
  auto load = [&](int64_t i) {  // this block's K tile i into stage i % kDownStages (one commit group)
    if (i < n_tiles) {
      const int64_t k0 = (t0 + i) * kDownBK;
      stage_tile<xT, kDownBM, kDownBK>(x_tile(i), x, m0, k0, M, K, sx0, sx1, x_vec);
      stage_tile_rows<aT, RT, kDownBK>(
          a_tile(i), a, [&](int row) { return grouped_a_row(g, f0 + row / 8, row % 8); }, k0, K, sa0, sa1, a_vec);
    }
    cp_async_commit();
  };

  FragC acc[NF];
#pragma unroll
  for (int n = 0; n < NF; ++n) zero(acc[n]);
#pragma unroll
  for (int i = 0; i < kDownStages - 1; ++i) load(i);
  for (int64_t i = 0; i < n_tiles; ++i) {
    cp_async_wait<kDownStages - 2>();
    __syncthreads();  // tile i has landed for every thread; every warp is done with tile i - 1 and the masked tile
    load(i + kDownStages - 1);  // into the stage tile i - 1 used
    bool masked_in_use = false;
    for (int p = proj[0]; p <= p_last; ++p) {  // block-uniform: the barriers below are reached by every thread
      if (g.frag0[p] == g.frag0[p + 1]) continue;  // rank 0
      const xT* xs = x_tile(i);
      if (g.d[p].enabled) {
        if (masked_in_use) __syncthreads();  // every warp is done with the previous projection's masked tile
        masked_copy_tile<xT, kDownBM, kDownBK>(x_tile(i), masked, m0, (t0 + i) * kDownBK, K, g.d[p]);
        __syncthreads();
        xs = masked;
        masked_in_use = true;
      }
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const int kc = (2 * wk + kk) * 16;
        const auto op_x = load_operand_a<kMma, XLD, 1>(xs + wm * 16 * XLD + kc);
#pragma unroll
        for (int n = 0; n < NF; ++n) {
          if (proj[n] == p) mma(acc[n], op_x, load_operand_b<kMma, 1, ALD>(a_tile(i) + n * 8 * ALD + kc));
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the k-half 1 fragments go through them

  if (wk == 1) park_k_half(acc, smem, wm);
  __syncthreads();
  if (wk == 0) {
    add_k_half(acc, smem, wm);
    float* out = u_parts + static_cast<int64_t>(blockIdx.y) * M * R;
#pragma unroll
    for (int n = 0; n < NF; ++n) {
      const int p = proj[n];
      if (p < 0) continue;
      const int64_t j0 = (f0 + n - g.frag0[p]) * 8;  // the fragment's first column within projection p
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + wm * 16 + frag_c_row(e), j = j0 + frag_c_col(e);
        if (m < M && j < g.rank[p]) out[m * R + g.row0[p] + j] = g.d[p].keep_scale * acc[n].x[e];
      }
    }
  }
}

}  // namespace cuda
}  // namespace lowcost
