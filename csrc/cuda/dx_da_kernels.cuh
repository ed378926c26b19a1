// Kernels of lora_dx_da and lora_dx_da_grouped (launched from dx_da.cu). lora_dx_da: dx_lora = D (.) (du A) in x.dtype (M, K) and
// dA = du^T (D (.) x), float32 (r, K), with the dropout mask generated once per element, used twice.
// Both are written as keep_scale * (mask (.) product): masking by zeroing is exact in any dtype.
//
// Block (strip, row segment) owns 64 columns of K (blockIdx.x) and a contiguous range of 64-row tiles
// (blockIdx.y; launch_plan.h picks enough segments for 2 blocks per SM). Its A strip (RT x 64) is
// staged once; per row tile, through a 3-stage cp.async pipeline:
//   x tile (64 x 64) and du tile (64 x RT, fp32) land in shared memory;
//   the mask zeroes dropped x elements (one Philox call per 4 elements); each thread keeps the keep
//   bits of its two groups of 8 elements in a register;
//   dx tile = du_tile A_strip: warp w owns rows 16 (w % 4) .. +16, columns 32 (w / 4) .. +32;
//   dA strip += du_tile^T x~_tile: warp w owns columns 8 w .. +8, all RT rows (registers across the
//   row tiles);
//   the dx tile is scaled and staged in shared memory as fp32, then every thread applies its keep
//   bits to its two groups of 8, rounds once and writes 16-byte stores.
// At the end the block writes its dA strip to the partial of its row segment (dA itself with one
// segment); sum_partials adds the partials in segment order.
// Ranks above 64 loop over chunks of 64 inside the block (the masked x tile is reused): the du and A
// chunks are staged synchronously and each chunk's dA is added to the block's own partial rows after
// every row tile (the launcher zeroes them first; no other block touches them, so no atomics).
//
// lora_dx_da_grouped: t = sum_i D_i (.) (du_i A_i) and dA_i = du_i^T (D_i (.) x) for P projections over one read
// of x (launch_plan.h): lora_dx_da's blocks and pipeline for the x tiles; per row tile, per projection i, its du and A
// chunks are staged synchronously, the staged x tile is copied through D_i into a second tile (a projection without
// dropout multiplies the staged tile), its dx fragments go through the fp32 staging tile and each thread adds its
// kept groups of 8 into its fp32 t registers in projection order (the first stores); its dA fragments are carried
// across the row tiles in shared memory (stored exactly, so the sums are those of lora_dx_da's registers) and
// written, times keep_scale_i, after the segment's last row tile. t is rounded once, after the last projection.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "tiles.cuh"

#include "../checks.h"

#include <cstdint>

namespace lowcost {
namespace cuda {

// Writes (or, with `accumulate`, adds) keep_scale * the warp's dA fragments: rows j_base + 16 t + ..,
// columns k_base + ...
template <int RT>
__device__ __forceinline__ void store_da(float* __restrict__ da, FragC (&acc)[RT / 16], int64_t j_base, int64_t r,
                                         int64_t k_base, int64_t K, float keep_scale, bool accumulate) {
#pragma unroll
  for (int t = 0; t < RT / 16; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j_base + t * 16 + frag_c_row(e), k = k_base + frag_c_col(e);
      if (j < r && k < K) {
        float* p = da + j * K + k;
        *p = (accumulate ? *p : 0.0f) + keep_scale * acc[t].x[e];
      }
    }
}

// The dx epilogue: the warp's fragments of the 64 x 64 tile (times keep_scale) go to the shared fp32
// tile; after a barrier every thread masks its two groups of 8 with its keep bits, rounds once and
// stores them (16-byte stores when `vec`).
// keep_scale * the warp's fragments of the 64 x 64 dx tile into the shared fp32 tile (rows 16 wa .., columns 32 wb ..).
__device__ __forceinline__ void stage_dx_fragments(const FragC (&acc)[4], float* dx_tile, int wa, int wb,
                                                   float keep_scale) {
  constexpr int OLD = padded_ld(kDxBK, 4);
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dx_tile[(wa * 16 + frag_c_row(e)) * OLD + wb * 32 + n * 8 + frag_c_col(e)] = keep_scale * acc[n].x[e];
    }
}

template <typename xT>
__device__ __forceinline__ void write_dx_tile(const FragC (&acc)[4], float* dx_tile, int wa, int wb, float keep_scale,
                                              uint32_t keep, int64_t m0, int64_t k0, int64_t M, int64_t K, bool vec,
                                              xT* __restrict__ dx) {
  constexpr int OLD = padded_ld(kDxBK, 4);
  using G = RowGroups<kDxBM, kDxBK>;
  stage_dx_fragments(acc, dx_tile, wa, wb, keep_scale);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < G::kPerThread; ++s) {
    const int row = G::row(s), col = G::col(s);
    const int64_t m = m0 + row, k = k0 + col;
    if (m < M && k < K) {
      float v[8];
      load_row8(dx_tile + row * OLD + col, v);
#pragma unroll
      for (int t = 0; t < 8; ++t) v[t] = ((keep >> (8 * s + t)) & 1u) ? v[t] : 0.0f;
      store_row8(dx + m * K + k, v, K - k, vec);
    }
  }
}

template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_dx_da_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1, bool x_vec,
                      const float* __restrict__ du, int64_t r, int64_t sd0, int64_t sd1, bool du_vec,
                      const aT* __restrict__ a, int64_t sa0, int64_t sa1, bool a_vec, DropoutParams d,
                      xT* __restrict__ dx, bool dx_vec, float* __restrict__ da_parts) {
  constexpr bool kMma = kUseMma<xT>;
  constexpr DxDaLayout L = dx_da_layout(RT, sizeof(xT), sizeof(aT));
  constexpr int XLD = padded_ld(kDxBK, sizeof(xT)), DLD = padded_ld(RT, 4), ALD = padded_ld(kDxBK, sizeof(aT));
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wa = warp % 4, wb = warp / 4;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDxBK;
  const int64_t row_tiles = ceil_div(M, kDxBM);
  const int64_t rt0 = range_begin(row_tiles, gridDim.y, blockIdx.y);
  const int64_t n_rt = range_begin(row_tiles, gridDim.y, blockIdx.y + 1) - rt0;
  const int64_t n_chunks = ceil_div(r, RT);
  float* da_out = da_parts + static_cast<int64_t>(blockIdx.y) * r * K;
  aT* a_strip = reinterpret_cast<aT*>(smem + L.a_strip);
  float* dx_tile = reinterpret_cast<float*>(smem + L.dx_stage);
  auto x_tile = [&](int64_t i) { return reinterpret_cast<xT*>(smem + (i % kDxStages) * L.stage); };
  auto du_tile = [&](int64_t i) { return reinterpret_cast<float*>(smem + (i % kDxStages) * L.stage + L.du_tile); };
  auto load = [&](int64_t i) {  // row tile rt0 + i (and, with one rank chunk, the A strip with tile 0)
    if (i < n_rt) {
      const int64_t m0 = (rt0 + i) * kDxBM;
      stage_tile<xT, kDxBM, kDxBK>(x_tile(i), x, m0, k0, M, K, sx0, sx1, x_vec);
      stage_tile<float, kDxBM, RT>(du_tile(i), du, m0, 0, M, r, sd0, sd1, du_vec);
      if (i == 0 && n_chunks == 1) stage_tile<aT, RT, kDxBK>(a_strip, a, 0, k0, r, K, sa0, sa1, a_vec);
    }
    cp_async_commit();
  };

  FragC da[RT / 16];
#pragma unroll
  for (int t = 0; t < RT / 16; ++t) zero(da[t]);
#pragma unroll
  for (int i = 0; i < kDxStages - 1; ++i) load(i);
  for (int64_t i = 0; i < n_rt; ++i) {
    cp_async_wait<kDxStages - 2>();
    __syncthreads();  // row tile i has landed; every warp is done with tile i - 1 and the dx tile
    load(i + kDxStages - 1);
    const int64_t m0 = (rt0 + i) * kDxBM;
    const uint32_t keep = d.enabled ? mask_tile<xT, kDxBM, kDxBK>(x_tile(i), m0, k0, K, d) : ~0u;
    if (d.enabled) __syncthreads();
    FragC acc[4];
#pragma unroll
    for (int n = 0; n < 4; ++n) zero(acc[n]);
    for (int64_t c = 0; c < n_chunks; ++c) {
      float* dus = du_tile(i);
      if (n_chunks > 1) {  // stage chunk c of A (and of du past chunk 0) synchronously
        __syncthreads();
        stage_tile<aT, RT, kDxBK>(a_strip, a, c * RT, k0, r, K, sa0, sa1, false);
        if (c > 0) stage_tile<float, kDxBM, RT>(dus, du, m0, c * RT, M, r, sd0, sd1, false);
        __syncthreads();
      }
      if (dx != nullptr) {  // dx tile += du_tile A_strip
#pragma unroll 1
        for (int kk = 0; kk < RT; kk += 16) {
          const auto op_du = load_operand_a<kMma, DLD, 1>(dus + wa * 16 * DLD + kk);
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            mma(acc[n], op_du, load_operand_b<kMma, ALD, 1>(a_strip + kk * ALD + wb * 32 + n * 8));
          }
        }
      }
#pragma unroll 1
      for (int kk = 0; kk < kDxBM; kk += 16) {  // dA strip += du_tile^T x~_tile
        const auto op_x = load_operand_b<kMma, XLD, 1>(x_tile(i) + kk * XLD + warp * 8);
#pragma unroll
        for (int t = 0; t < RT / 16; ++t) mma(da[t], load_operand_a<kMma, 1, DLD>(dus + kk * DLD + t * 16), op_x);
      }
      if (n_chunks > 1) {
        store_da<RT>(da_out, da, c * RT, r, k0 + warp * 8, K, d.keep_scale, true);
#pragma unroll
        for (int t = 0; t < RT / 16; ++t) zero(da[t]);
      }
    }
    if (dx != nullptr) write_dx_tile(acc, dx_tile, wa, wb, d.keep_scale, keep, m0, k0, M, K, dx_vec, dx);
  }
  cp_async_wait<0>();
  if (n_chunks == 1) store_da<RT>(da_out, da, 0, r, k0 + warp * 8, K, d.keep_scale, false);
}

// --------------------------------------------------------------------------------------------
// lora_dx_da_grouped
// The projections of one lora_dx_da_grouped call, passed by value: projection i's rows of the stacked adapters (= its
// columns of du, its rows of dA) start at row0[i]; its ceil(r_i / 16) dA accumulator fragments in shared memory start
// at fragment acc0[i].
struct DxDaGroup {
  int count = 0;
  int64_t rank[kMaxGroupedProjections] = {};
  int64_t row0[kMaxGroupedProjections] = {};
  int64_t acc0[kMaxGroupedProjections + 1] = {};
  DropoutParams d[kMaxGroupedProjections] = {};
};

template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_dx_da_grouped_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1, bool x_vec,
                              const float* __restrict__ du, int64_t sd0, int64_t sd1, const aT* __restrict__ a,
                              int64_t sa0, int64_t sa1, DxDaGroup g, int64_t R, xT* __restrict__ t, bool t_vec,
                              float* __restrict__ da_parts) {
  constexpr bool kMma = kUseMma<xT>;
  constexpr DxDaLayout L = dx_da_layout(RT, sizeof(xT), sizeof(aT));
  constexpr int XLD = padded_ld(kDxBK, sizeof(xT)), DLD = padded_ld(RT, 4), ALD = padded_ld(kDxBK, sizeof(aT));
  constexpr int OLD = padded_ld(kDxBK, 4);
  using G = RowGroups<kDxBM, kDxBK>;
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wa = warp % 4, wb = warp / 4;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDxBK;
  const int64_t row_tiles = ceil_div(M, kDxBM);
  const int64_t rt0 = range_begin(row_tiles, gridDim.y, blockIdx.y);
  const int64_t n_rt = range_begin(row_tiles, gridDim.y, blockIdx.y + 1) - rt0;
  float* da_out = da_parts + static_cast<int64_t>(blockIdx.y) * R * K;
  aT* a_strip = reinterpret_cast<aT*>(smem + L.a_strip);
  float* dx_tile = reinterpret_cast<float*>(smem + L.dx_stage);
  xT* masked = reinterpret_cast<xT*>(smem + dx_da_grouped_masked_tile(L));
  float* da_acc = reinterpret_cast<float*>(smem + dx_da_grouped_acc(L, sizeof(xT)));
  auto x_tile = [&](int64_t i) { return reinterpret_cast<xT*>(smem + (i % kDxStages) * L.stage); };
  auto du_tile = [&](int64_t i) { return reinterpret_cast<float*>(smem + (i % kDxStages) * L.stage + L.du_tile); };
  auto acc_slot = [&](int64_t f) { return da_acc + (f * kThreads + threadIdx.x) * 4; };  // this thread's 4 floats
  auto load = [&](int64_t i) {  // row tile rt0 + i of x
    if (i < n_rt) stage_tile<xT, kDxBM, kDxBK>(x_tile(i), x, (rt0 + i) * kDxBM, k0, M, K, sx0, sx1, x_vec);
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < kDxStages - 1; ++i) load(i);
  for (int64_t i = 0; i < n_rt; ++i) {
    cp_async_wait<kDxStages - 2>();
    __syncthreads();  // row tile i has landed; every warp is done with tile i - 1
    load(i + kDxStages - 1);
    const int64_t m0 = (rt0 + i) * kDxBM;
    float t_acc[G::kPerThread][8] = {};
    bool first = true;
    for (int p = 0; p < g.count; ++p) {  // block-uniform: the barriers below are reached by every thread
      const int64_t r = g.rank[p], row0 = g.row0[p];
      if (r == 0) continue;
      const DropoutParams& d = g.d[p];
      __syncthreads();  // every warp is done with the previous projection's masked tile, du, A and dx tiles
      const xT* xs = x_tile(i);
      uint32_t keep = ~0u;
      if (d.enabled) {
        keep = masked_copy_tile<xT, kDxBM, kDxBK>(x_tile(i), masked, m0, k0, K, d);
        xs = masked;
      }
      float* dus = du_tile(i);
      FragC acc[4];
#pragma unroll
      for (int n = 0; n < 4; ++n) zero(acc[n]);
      const int64_t n_chunks = ceil_div(r, RT), n_frags = g.acc0[p + 1] - g.acc0[p];  // ceil(r / 16) accumulators
      for (int64_t c = 0; c < n_chunks; ++c) {
        if (c > 0) __syncthreads();  // every warp is done with chunk c - 1
        stage_tile<aT, RT, kDxBK>(a_strip, a, row0 + c * RT, k0, row0 + r, K, sa0, sa1, false);
        stage_tile<float, kDxBM, RT>(dus, du, m0, row0 + c * RT, M, row0 + r, sd0, sd1, false);
        __syncthreads();
#pragma unroll 1
        for (int kk = 0; kk < RT; kk += 16) {  // dx tile += du_tile A_strip
          if (c * RT + kk >= r) break;
          const auto op_du = load_operand_a<kMma, DLD, 1>(dus + wa * 16 * DLD + kk);
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            mma(acc[n], op_du, load_operand_b<kMma, ALD, 1>(a_strip + kk * ALD + wb * 32 + n * 8));
          }
        }
        FragC da[RT / 16];  // the chunk's dA fragments, carried across row tiles in shared memory
#pragma unroll
        for (int q = 0; q < RT / 16; ++q) {
          const int64_t f = c * (RT / 16) + q;
          zero(da[q]);
          if (i > 0 && f < n_frags) {
#pragma unroll
            for (int e = 0; e < 4; ++e) da[q].x[e] = acc_slot(g.acc0[p] + f)[e];
          }
        }
#pragma unroll 1
        for (int kk = 0; kk < kDxBM; kk += 16) {  // dA strip += du_tile^T x~_tile
          const auto op_x = load_operand_b<kMma, XLD, 1>(xs + kk * XLD + warp * 8);
#pragma unroll
          for (int q = 0; q < RT / 16; ++q) {
            if (c * RT + q * 16 < r) mma(da[q], load_operand_a<kMma, 1, DLD>(dus + kk * DLD + q * 16), op_x);
          }
        }
        if (i + 1 < n_rt) {
#pragma unroll
          for (int q = 0; q < RT / 16; ++q) {
            const int64_t f = c * (RT / 16) + q;
            if (f < n_frags) {
#pragma unroll
              for (int e = 0; e < 4; ++e) acc_slot(g.acc0[p] + f)[e] = da[q].x[e];
            }
          }
        } else {
          store_da<RT>(da_out, da, row0 + c * RT, row0 + r, k0 + warp * 8, K, d.keep_scale, false);
        }
      }
      stage_dx_fragments(acc, dx_tile, wa, wb, d.keep_scale);
      __syncthreads();
#pragma unroll
      for (int s = 0; s < G::kPerThread; ++s) {
        float v[8];
        load_row8(dx_tile + G::row(s) * OLD + G::col(s), v);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float kept = ((keep >> (8 * s + e)) & 1u) ? v[e] : 0.0f;
          t_acc[s][e] = first ? kept : t_acc[s][e] + kept;
        }
      }
      first = false;
    }
#pragma unroll
    for (int s = 0; s < G::kPerThread; ++s) {
      const int64_t m = m0 + G::row(s), k = k0 + G::col(s);
      if (m < M && k < K) store_row8(t + m * K + k, t_acc[s], K - k, t_vec);
    }
  }
  cp_async_wait<0>();
}

}  // namespace cuda
}  // namespace lowcost
