// Kernel of lora_dx_da (launched from dx_da.cu): dx_lora = D (.) (du A) in x.dtype (M, K) and
// dA = du^T (D (.) x), float32 (r, K), with the dropout mask generated once per element, used twice.
//
// A block owns a strip of BK = 32 columns of K and walks row tiles of BM = 64 rows
// (rt = blockIdx.y, blockIdx.y + gridDim.y, ...; gridDim.y is chosen to fill the GPU):
//   x~ tile and its keep flags staged once (x read once, one Philox call per 4 elements);
//   du tile staged; dx tile = du_tile A_strip (8 rows per thread, r reduced from shared memory),
//   masked, rounded once and stored (a warp writes 32 consecutive elements of a row);
//   dA strip += du_tile^T x~_tile, held in registers across the block's row tiles and added to
//   global memory with one float32 atomicAdd per element at the end (dA is zeroed first).
// Ranks above 64 loop over chunks of 64 inside the block (the x~ tile is reused); their dA partials
// are flushed with atomicAdd after every row tile.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace lowcost {
namespace cuda {

constexpr int kDxBM = 64;    // rows per row tile
constexpr int kDxBK = 32;    // columns per block strip (one warp's width)
constexpr int kDxRows = 8;   // dx rows per thread: 8 warps x 8 rows = BM
constexpr int kDxWarps = kThreads / 32;

template <int RT>
__device__ __forceinline__ void flush_dA(float* __restrict__ dA, float (&acc)[RT / kDxWarps],
                                         int64_t j0, int64_t r, int64_t k, int64_t K, int jq) {
  if (k < K) {
#pragma unroll
    for (int c = 0; c < RT / kDxWarps; ++c) {
      const int64_t j = j0 + jq + kDxWarps * c;
      if (j < r) atomicAdd(dA + j * K + k, acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < RT / kDxWarps; ++c) acc[c] = 0.0f;
}

template <typename xT, typename aT, int RT>
__global__ void __launch_bounds__(kThreads)
    lora_dx_da_kernel(const xT* __restrict__ x, int64_t M, int64_t K, int64_t sx0, int64_t sx1,
                      bool x_vec, const float* __restrict__ du, int64_t r, int64_t sd0,
                      int64_t sd1, const aT* __restrict__ a, int64_t sa0, int64_t sa1,
                      DropoutParams d, xT* __restrict__ dx, float* __restrict__ dA) {
  constexpr int TA = RT / kDxWarps;  // dA rows (of r) per thread
  static_assert(kDxWarps * kDxRows == kDxBM, "dx thread tile mismatch");
  __shared__ float as[RT][kDxBK + 1];   // A strip chunk: as[j][kk]
  __shared__ float dus[kDxBM][RT + 1];  // du tile chunk
  __shared__ float xs[kDxBM][kDxBK + 1];  // x~ tile
  __shared__ unsigned char keep_s[kDxBM][kDxBK];

  const int tid = threadIdx.x;
  const int lane = tid % 32;   // column of the strip for dx and dA
  const int warp = tid / 32;   // dx: rows warp*8 .. +7; dA: rows jq = warp, warp + 8, ...
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDxBK;
  const int64_t k = k0 + lane;
  const int64_t n_row_tiles = (M + kDxBM - 1) / kDxBM;
  const int n_chunks = static_cast<int>((r + RT - 1) / RT);

  auto load_a_chunk = [&](int64_t j0) {
    for (int e = tid; e < RT * kDxBK; e += kThreads) {
      const int j = e / kDxBK, kk = e % kDxBK;
      const int64_t jj = j0 + j, kc = k0 + kk;
      as[j][kk] = (jj < r && kc < K) ? to_float(a[jj * sa0 + kc * sa1]) : 0.0f;
    }
  };

  float acc_a[TA];
#pragma unroll
  for (int c = 0; c < TA; ++c) acc_a[c] = 0.0f;
  if (n_chunks == 1) load_a_chunk(0);

  for (int64_t rt = blockIdx.y; rt < n_row_tiles; rt += gridDim.y) {
    const int64_t m0 = rt * kDxBM;
    __syncthreads();  // the previous row tile's readers are done with xs / keep_s / dus / as
    // x~ tile: BM rows x BK columns = 512 groups of 4, 2 per thread.
#pragma unroll
    for (int s = 0; s < (kDxBM * kDxBK / 4) / kThreads; ++s) {
      const int q = tid + s * kThreads;
      const int row = q / (kDxBK / 4);
      const int kq = (q % (kDxBK / 4)) * 4;
      const int64_t m = m0 + row;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t bits = 0;
      if (m < M) bits = load_masked4(x, m, k0 + kq, K, sx0, sx1, x_vec, d, v);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        xs[row][kq + t] = v[t];
        keep_s[row][kq + t] = static_cast<unsigned char>((bits >> t) & 1u);
      }
    }

    float acc_dx[kDxRows];
#pragma unroll
    for (int i = 0; i < kDxRows; ++i) acc_dx[i] = 0.0f;

    for (int chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t j0 = static_cast<int64_t>(chunk) * RT;
      if (chunk > 0) __syncthreads();  // readers of the previous chunk are done
      if (n_chunks > 1) load_a_chunk(j0);
      for (int e = tid; e < kDxBM * RT; e += kThreads) {
        const int row = e / RT, jj = e % RT;
        const int64_t m = m0 + row, j = j0 + jj;
        dus[row][jj] = (m < M && j < r) ? du[m * sd0 + j * sd1] : 0.0f;
      }
      __syncthreads();

      if (dx != nullptr) {
#pragma unroll
        for (int i = 0; i < kDxRows; ++i) {
          const int row = warp * kDxRows + i;
          float s = acc_dx[i];
#pragma unroll 16
          for (int jj = 0; jj < RT; ++jj) s = fmaf(dus[row][jj], as[jj][lane], s);
          acc_dx[i] = s;
        }
      }
#pragma unroll 8
      for (int row = 0; row < kDxBM; ++row) {
        const float xv = xs[row][lane];
#pragma unroll
        for (int c = 0; c < TA; ++c) acc_a[c] = fmaf(dus[row][warp + kDxWarps * c], xv, acc_a[c]);
      }
      if (n_chunks > 1) flush_dA<RT>(dA, acc_a, j0, r, k, K, warp);
    }

    if (dx != nullptr && k < K) {
#pragma unroll
      for (int i = 0; i < kDxRows; ++i) {
        const int row = warp * kDxRows + i;
        const int64_t m = m0 + row;
        if (m < M) dx[m * K + k] = from_float<xT>(dropout_apply(d, keep_s[row][lane] != 0, acc_dx[i]));
      }
    }
  }
  if (n_chunks == 1) flush_dA<RT>(dA, acc_a, 0, r, k, K, warp);
}

// Column strips on x; row segments on y, enough blocks for about 4 per SM.
inline LaunchGrid lora_dx_da_grid(int64_t M, int64_t K, int64_t sm_count) {
  const int64_t strips = ceil_div(K, kDxBK);
  const int64_t row_tiles = ceil_div(M, kDxBM);
  const int64_t segments = std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(sm_count * 4, strips), row_tiles, int64_t{65535}}));
  return {strips, segments};
}

}  // namespace cuda
}  // namespace lowcost
