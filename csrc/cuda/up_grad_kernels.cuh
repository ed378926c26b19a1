// Kernels of lora_up and lora_grad_pass (launched from up_grad.cu). Tiles, grids and shared-memory
// layouts come from launch_plan.h; operands and the mma from mma.cuh.
//
// lora_up: c = s u B^T + bias, (M, N) in the output dtype. A block computes a 64 x 128 tile: r in
// chunks of 32 (u and B chunks staged in shared memory), warp w owns rows 16 (w % 4) .. +16 and
// columns 64 (w / 4) .. +64 (8 accumulator fragments). The fp32 tile (scaled, bias added) is staged
// through shared memory and leaves in rows of 8 elements, rounded once, as 16-byte stores.
//
// lora_grad_pass: one read of g. Block (column segment, row segment, rank chunk) walks the 64 x 64
// tiles of its segment, column tiles outer and row tiles inner, through a 2-stage cp.async pipeline
// (g tile, the B rows of its columns, the u rows of its rows). Warp w = (wa, wb) = (w % 4, w / 4):
//   du rows 16 wa .. +16, ranks RT/2 wb .. +RT/2:   g_tile B_tile, added into the segment's du
//                                                   accumulator in shared memory (each element
//                                                   owned by one thread, so no race and no atomic);
//   dB rows (columns of g) 16 wa .. +16, same ranks: g_tile^T u_tile in registers across the row
//                                                   tiles; dbias (wb = 0) as g_tile^T times ones.
// When a column tile's row loop ends, its dB and dbias are written to the block's partial (row
// segment blockIdx.y); when the block ends, its du rows to the partial of column segment blockIdx.x.
// With one segment the partial is the output itself; otherwise sum_partials adds the partials in
// segment order, so dB, dbias and du are bitwise reproducible.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "tiles.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

// --------------------------------------------------------------------------------------------
// lora_up
template <typename oT, typename bT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_up_kernel(const float* __restrict__ u, int64_t M, int64_t r, int64_t su0, int64_t su1, bool u_vec,
                   const bT* __restrict__ b, int64_t N, int64_t sb0, int64_t sb1, bool b_vec,
                   const oT* __restrict__ bias, int64_t sbias, float scale, bool out_vec, oT* __restrict__ out) {
  constexpr bool kMma = kUseMma<oT>;
  constexpr UpLayout L = up_layout(sizeof(bT));
  constexpr int ULD = padded_ld(kUpRK, 4), BLD = padded_ld(kUpRK, sizeof(bT)), OLD = padded_ld(kUpBN, 4);
  LOWCOST_DYNAMIC_SMEM(smem);
  float* us = reinterpret_cast<float*>(smem);
  bT* bs = reinterpret_cast<bT*>(smem + L.b_tile);
  float* tile = reinterpret_cast<float*>(smem);  // after the r loop: the output tile
  const int warp = warp_id(), wm = warp % 4, wn = warp / 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kUpBM, n0 = static_cast<int64_t>(blockIdx.y) * kUpBN;

  FragC acc[8];
#pragma unroll
  for (int n = 0; n < 8; ++n) zero(acc[n]);
  for (int64_t j0 = 0; j0 < r; j0 += kUpRK) {
    __syncthreads();  // every warp is done with the previous chunk
    stage_tile<float, kUpBM, kUpRK>(us, u, m0, j0, M, r, su0, su1, u_vec);
    stage_tile<bT, kUpBN, kUpRK>(bs, b, n0, j0, N, r, sb0, sb1, b_vec);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int kk = 0; kk < kUpRK && j0 + kk < r; kk += 16) {
      const auto op_u = load_operand_a<kMma, ULD, 1>(us + wm * 16 * ULD + kk);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        mma(acc[n], op_u, load_operand_b<kMma, 1, BLD>(bs + (wn * 64 + n * 8) * BLD + kk));  // B(j, n) = B[n][j]
      }
    }
  }
  __syncthreads();  // the operand buffers become the output tile
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = wm * 16 + frag_c_row(e), col = wn * 64 + n * 8 + frag_c_col(e);
      const int64_t gn = n0 + col;
      const float add = (bias != nullptr && gn < N) ? to_float(bias[gn * sbias]) : 0.0f;
      tile[row * OLD + col] = fmaf(scale, acc[n].x[e], add);
    }
  __syncthreads();
  using G = RowGroups<kUpBM, kUpBN>;
#pragma unroll
  for (int s = 0; s < G::kPerThread; ++s) {
    const int row = G::row(s), col = G::col(s);
    const int64_t m = m0 + row, n = n0 + col;
    if (m < M && n < N) {
      float v[8];
      load_row8(tile + row * OLD + col, v);
      store_row8(out + m * N + n, v, N - n, out_vec);
    }
  }
}

// --------------------------------------------------------------------------------------------
// lora_grad_pass
// Writes a finished column tile's dB rows (scaled) and, for warps that computed it, its dbias; then
// clears the accumulators. n_base: the first dB row (column of g) of this warp's 16; j_base its first rank.
template <int RT>
__device__ __forceinline__ void flush_db_tile(FragC (&db)[RT / 16], FragC& dbias, bool do_bias, float* __restrict__ db_out,
                                              float* __restrict__ bias_out, int64_t n_base, int64_t j_base,
                                              int64_t N, int64_t r, float scale) {
#pragma unroll
  for (int n = 0; n < RT / 16; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t nn = n_base + frag_c_row(e), j = j_base + n * 8 + frag_c_col(e);
      if (nn < N && j < r) db_out[nn * r + j] = scale * db[n].x[e];
    }
  if (do_bias && frag_c_col(0) == 0) {  // every column of the ones product holds the row sum
    if (n_base + frag_c_row(0) < N) bias_out[n_base + frag_c_row(0)] = dbias.x[0];
    if (n_base + frag_c_row(2) < N) bias_out[n_base + frag_c_row(2)] = dbias.x[2];
  }
#pragma unroll
  for (int n = 0; n < RT / 16; ++n) zero(db[n]);
  zero(dbias);
}

// Writes rows [m0, m0 + rows) of the shared du accumulator (rows x RT), scaled, to du_out (M, r) columns
// j0 .. j0 + RT, in rows of 8 (16-byte stores when r % 4 == 0).
template <int RT>
__device__ __forceinline__ void write_du_rows(const float* du_acc, int64_t rows, int64_t m0, int64_t j0, int64_t M,
                                              int64_t r, float scale, float* __restrict__ du_out) {
  for (int q = threadIdx.x; q < rows * RT / 8; q += kThreads) {
    const int row = q / (RT / 8), col = q % (RT / 8) * 8;
    const int64_t m = m0 + row, j = j0 + col;
    if (m < M && j < r) {
      float v[8];
      load_row8(du_acc + row * RT + col, v);
#pragma unroll
      for (int t = 0; t < 8; ++t) v[t] *= scale;
      store_row8(du_out + m * r + j, v, r - j, r % 4 == 0);
    }
  }
}

template <typename gT, typename bT, int RT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_grad_pass_kernel(const gT* __restrict__ g, int64_t M, int64_t N, int64_t sg0, int64_t sg1, bool g_vec,
                          const float* __restrict__ u, int64_t r, int64_t su0, int64_t su1, bool u_vec,
                          const bT* __restrict__ b, int64_t sb0, int64_t sb1, bool b_vec, float scale,
                          float* __restrict__ du_parts, float* __restrict__ db_parts,
                          float* __restrict__ dbias_parts) {
  constexpr bool kMma = kUseMma<gT>;
  constexpr GradPassLayout L = grad_pass_layout(RT, sizeof(gT), sizeof(bT));
  constexpr int GLD = padded_ld(kGpBN, sizeof(gT)), BLD = padded_ld(RT, sizeof(bT)), ULD = padded_ld(RT, 4);
  constexpr int kHalf = RT / 2;  // ranks per warp column
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wa = warp % 4, wb = warp / 4;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RT;
  const int64_t col_tiles = ceil_div(N, kGpBN), row_tiles = ceil_div(M, kGpBM);
  const int64_t ct0 = range_begin(col_tiles, gridDim.x, blockIdx.x);
  const int64_t n_ct = range_begin(col_tiles, gridDim.x, blockIdx.x + 1) - ct0;
  const int64_t rt0 = range_begin(row_tiles, gridDim.y, blockIdx.y);
  const int64_t n_rt = range_begin(row_tiles, gridDim.y, blockIdx.y + 1) - rt0;
  const bool do_bias = dbias_parts != nullptr && blockIdx.z == 0 && wb == 0;  // warp-uniform
  auto stage = [&](int64_t i) { return smem + (i % kGpStages) * L.stage; };
  auto load = [&](int64_t i) {  // step i = (column tile ct0 + i / n_rt, row tile rt0 + i % n_rt)
    if (i < n_ct * n_rt) {
      const int64_t n0 = (ct0 + i / n_rt) * kGpBN, m0 = (rt0 + i % n_rt) * kGpBM;
      stage_tile<gT, kGpBM, kGpBN>(reinterpret_cast<gT*>(stage(i)), g, m0, n0, M, N, sg0, sg1, g_vec);
      stage_tile<bT, kGpBN, RT>(reinterpret_cast<bT*>(stage(i) + L.b_tile), b, n0, j0, N, r, sb0, sb1, b_vec);
      stage_tile<float, kGpBM, RT>(reinterpret_cast<float*>(stage(i) + L.u_tile), u, m0, j0, M, r, su0, su1, u_vec);
    }
    cp_async_commit();
  };

  float* du_acc = reinterpret_cast<float*>(smem + L.du_acc);  // (n_rt * 64) x RT, row-major
  for (int e = threadIdx.x; e < n_rt * kGpBM * RT; e += kThreads) du_acc[e] = 0.0f;
  FragC db[RT / 16], dbias;
#pragma unroll
  for (int n = 0; n < RT / 16; ++n) zero(db[n]);
  zero(dbias);

  load(0);
  for (int64_t i = 0; i < n_ct * n_rt; ++i) {
    cp_async_wait<0>();
    __syncthreads();  // step i has landed; every warp is done with step i - 1
    load(i + 1);
    const gT* gs = reinterpret_cast<const gT*>(stage(i));
    const bT* bs = reinterpret_cast<const bT*>(stage(i) + L.b_tile);
    const float* us = reinterpret_cast<const float*>(stage(i) + L.u_tile);
    // du rows += g_tile B_tile
    FragC du[RT / 16];
#pragma unroll
    for (int n = 0; n < RT / 16; ++n) zero(du[n]);
#pragma unroll
    for (int kk = 0; kk < kGpBN; kk += 16) {
      const auto op_g = load_operand_a<kMma, GLD, 1>(gs + wa * 16 * GLD + kk);
#pragma unroll
      for (int n = 0; n < RT / 16; ++n) {
        mma(du[n], op_g, load_operand_b<kMma, BLD, 1>(bs + kk * BLD + wb * kHalf + n * 8));
      }
    }
    float* acc_rows = du_acc + (i % n_rt) * kGpBM * RT;
#pragma unroll
    for (int n = 0; n < RT / 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_rows[(wa * 16 + frag_c_row(e)) * RT + wb * kHalf + n * 8 + frag_c_col(e)] += du[n].x[e];
      }
    // dB += g_tile^T u_tile; dbias += g_tile^T 1
#pragma unroll
    for (int kk = 0; kk < kGpBM; kk += 16) {
      const auto op_gt = load_operand_a<kMma, 1, GLD>(gs + kk * GLD + wa * 16);
#pragma unroll
      for (int n = 0; n < RT / 16; ++n) {
        mma(db[n], op_gt, load_operand_b<kMma, ULD, 1>(us + kk * ULD + wb * kHalf + n * 8));
      }
      if (do_bias) mma(dbias, op_gt, ones_operand_b<kMma>());
    }
    if (i % n_rt == n_rt - 1) {  // the column tile is complete: write its dB / dbias partial
      flush_db_tile<RT>(db, dbias, do_bias, db_parts + static_cast<int64_t>(blockIdx.y) * N * r,
                        do_bias ? dbias_parts + static_cast<int64_t>(blockIdx.y) * N : nullptr,
                        (ct0 + i / n_rt) * kGpBN + wa * 16, j0 + wb * kHalf, N, r, scale);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // du_acc is complete
  write_du_rows<RT>(du_acc, n_rt * kGpBM, rt0 * kGpBM, j0, M, r, scale,
                    du_parts + static_cast<int64_t>(blockIdx.x) * M * r);
}

}  // namespace cuda
}  // namespace lowcost
