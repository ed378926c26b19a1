// Kernels of lora_up and lora_grad_pass (launched from up_grad.cu).
//
// lora_up: c = scale * u B^T + bias, (M, N) in the output dtype. A block computes a 64 x 64 tile of
// c (4 x 4 per thread) over r in chunks of 16 (u and B chunks staged in shared memory as float32),
// then adds the bias and rounds once; rows are written 4 elements at a time when N % 4 == 0.
//
// lora_grad_pass: one read of grad_y. A block owns BM = 64 rows and walks N in tiles of BN = 32:
//   g tile (float32, shared), B tile (float32, shared), the block's u rows staged once;
//   du rows of the block accumulate in registers across all N tiles (written once, no atomics);
//   the tile's dB = g^T u partial (BN x RT) and dbias partial are added to global memory with
//   float32 atomicAdd (so dB and dbias are not bitwise deterministic across runs; du is).
// Ranks above 64 use gridDim.y chunks of 64 columns, re-reading grad_y once per chunk.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace lowcost {
namespace cuda {

// --------------------------------------------------------------------------------------------
// lora_up
constexpr int kUpBM = 64;
constexpr int kUpBN = 64;
constexpr int kUpRK = 16;  // r chunk
constexpr int kUpT = 4;    // 4 x 4 outputs per thread

template <typename oT, typename bT>
__global__ void __launch_bounds__(kThreads)
    lora_up_kernel(const float* __restrict__ u, int64_t M, int64_t r, int64_t su0, int64_t su1,
                   const bT* __restrict__ b, int64_t N, int64_t sb0, int64_t sb1,
                   const oT* __restrict__ bias, int64_t sbias, float scale, bool out_vec,
                   oT* __restrict__ out) {
  __shared__ float us[kUpRK][kUpBM + 1];
  __shared__ float bs[kUpRK][kUpBN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % (kUpBN / kUpT);  // 16 column groups of 4
  const int ty = tid / (kUpBN / kUpT);  // 16 row groups of 4
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kUpBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpBN;

  float acc[kUpT][kUpT];
#pragma unroll
  for (int i = 0; i < kUpT; ++i)
#pragma unroll
    for (int c = 0; c < kUpT; ++c) acc[i][c] = 0.0f;

  for (int64_t j0 = 0; j0 < r; j0 += kUpRK) {
    for (int e = tid; e < kUpRK * kUpBM; e += kThreads) {
      const int row = e / kUpRK, jj = e % kUpRK;
      const int64_t m = m0 + row, j = j0 + jj;
      us[jj][row] = (m < M && j < r) ? u[m * su0 + j * su1] : 0.0f;
    }
    for (int e = tid; e < kUpRK * kUpBN; e += kThreads) {
      const int col = e / kUpRK, jj = e % kUpRK;
      const int64_t n = n0 + col, j = j0 + jj;
      bs[jj][col] = (n < N && j < r) ? to_float(b[n * sb0 + j * sb1]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kUpRK; ++jj) {
      float uv[kUpT], bv[kUpT];
#pragma unroll
      for (int i = 0; i < kUpT; ++i) uv[i] = us[jj][ty * kUpT + i];
#pragma unroll
      for (int c = 0; c < kUpT; ++c) bv[c] = bs[jj][tx * kUpT + c];
#pragma unroll
      for (int i = 0; i < kUpT; ++i)
#pragma unroll
        for (int c = 0; c < kUpT; ++c) acc[i][c] = fmaf(uv[i], bv[c], acc[i][c]);
    }
    __syncthreads();
  }

  const int64_t n = n0 + tx * kUpT;
  float bias_v[kUpT];
#pragma unroll
  for (int c = 0; c < kUpT; ++c) {
    bias_v[c] = (bias != nullptr && n + c < N) ? to_float(bias[(n + c) * sbias]) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < kUpT; ++i) {
    const int64_t m = m0 + ty * kUpT + i;
    if (m >= M || n >= N) continue;
    float v[kUpT];
#pragma unroll
    for (int c = 0; c < kUpT; ++c) v[c] = fmaf(scale, acc[i][c], bias_v[c]);
    oT* dst = out + m * N + n;
    if (out_vec) {  // N % 4 == 0, so n < N implies n + 3 < N, and dst is aligned
      store4(dst, v);
    } else {
#pragma unroll
      for (int c = 0; c < kUpT; ++c) {
        if (n + c < N) dst[c] = from_float<oT>(v[c]);
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// lora_grad_pass
constexpr int kGpBM = 64;  // rows of grad_y per block
constexpr int kGpBN = 32;  // N tile
constexpr int kGpTM = 4;   // du rows per thread

template <typename gT, typename bT, int RT>
__global__ void __launch_bounds__(kThreads)
    lora_grad_pass_kernel(const gT* __restrict__ g, int64_t M, int64_t N, int64_t sg0, int64_t sg1,
                          bool g_vec, const float* __restrict__ u, int64_t r, int64_t su0,
                          int64_t su1, const bT* __restrict__ b, int64_t sb0, int64_t sb1,
                          float scale, float* __restrict__ du, float* __restrict__ dB,
                          float* __restrict__ dbias) {
  constexpr int TN = RT / kColThreads;  // du columns per thread
  constexpr int TB = RT / 8;            // dB columns per thread (8 warps x 32 lanes = BN x 8)
  static_assert(kThreads == (kGpBM / kGpTM) * kColThreads, "du thread tile mismatch");
  static_assert(kThreads == kGpBN * 8, "dB thread tile mismatch");
  __shared__ float us[kGpBM][RT + 1];
  __shared__ float gs[kGpBN][kGpBM + 1];  // transposed g tile
  __shared__ float bs[kGpBN][RT + 1];

  const int tid = threadIdx.x;
  const int tc = tid % kColThreads, tr = tid / kColThreads;  // du mapping
  const int lane_n = tid % kGpBN, jq = tid / kGpBN;           // dB mapping
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGpBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RT;
  const bool do_bias = dbias != nullptr && blockIdx.y == 0;

  for (int e = tid; e < kGpBM * RT; e += kThreads) {
    const int row = e / RT, jj = e % RT;
    const int64_t m = m0 + row, j = j0 + jj;
    us[row][jj] = (m < M && j < r) ? u[m * su0 + j * su1] : 0.0f;
  }

  float acc_du[kGpTM][TN];
#pragma unroll
  for (int i = 0; i < kGpTM; ++i)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc_du[i][c] = 0.0f;

  for (int64_t n0 = 0; n0 < N; n0 += kGpBN) {
    // g tile: BM rows x BN columns = 512 groups of 4, 2 per thread; read once.
#pragma unroll
    for (int s = 0; s < (kGpBM * kGpBN / 4) / kThreads; ++s) {
      const int q = tid + s * kThreads;
      const int row = q / (kGpBN / 4);
      const int nq = (q % (kGpBN / 4)) * 4;
      const int64_t m = m0 + row, n = n0 + nq;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (m < M) {
        const gT* grow = g + m * sg0;
        if (g_vec && n + 3 < N) {
          load4(grow + n, v);
        } else {
#pragma unroll
          for (int t = 0; t < 4; ++t) v[t] = (n + t < N) ? to_float(grow[(n + t) * sg1]) : 0.0f;
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) gs[nq + t][row] = v[t];
    }
    for (int e = tid; e < kGpBN * RT; e += kThreads) {
      const int nn = e / RT, jj = e % RT;
      const int64_t n = n0 + nn, j = j0 + jj;
      bs[nn][jj] = (n < N && j < r) ? to_float(b[n * sb0 + j * sb1]) : 0.0f;
    }
    __syncthreads();

    // du rows += g_tile B_tile
#pragma unroll 8
    for (int nn = 0; nn < kGpBN; ++nn) {
      float gv[kGpTM], bv[TN];
#pragma unroll
      for (int i = 0; i < kGpTM; ++i) gv[i] = gs[nn][tr * kGpTM + i];
#pragma unroll
      for (int c = 0; c < TN; ++c) bv[c] = bs[nn][tc + c * kColThreads];
#pragma unroll
      for (int i = 0; i < kGpTM; ++i)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc_du[i][c] = fmaf(gv[i], bv[c], acc_du[i][c]);
    }

    // dB[n, :] += g_tile^T u_rows, dbias[n] += column sums
    float acc_b[TB];
#pragma unroll
    for (int c = 0; c < TB; ++c) acc_b[c] = 0.0f;
    float acc_bias = 0.0f;
#pragma unroll 8
    for (int row = 0; row < kGpBM; ++row) {
      const float gv = gs[lane_n][row];
      acc_bias += gv;
#pragma unroll
      for (int c = 0; c < TB; ++c) acc_b[c] = fmaf(gv, us[row][jq + 8 * c], acc_b[c]);
    }
    const int64_t n = n0 + lane_n;
    if (n < N) {
#pragma unroll
      for (int c = 0; c < TB; ++c) {
        const int64_t j = j0 + jq + 8 * c;
        if (j < r) atomicAdd(dB + n * r + j, scale * acc_b[c]);
      }
      if (do_bias && jq == 0) atomicAdd(dbias + n, acc_bias);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kGpTM; ++i) {
    const int64_t m = m0 + tr * kGpTM + i;
    if (m >= M) continue;
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t j = j0 + tc + c * kColThreads;
      if (j < r) du[m * r + j] = scale * acc_du[i][c];
    }
  }
}

inline LaunchGrid lora_up_grid(int64_t M, int64_t N) { return {ceil_div(M, kUpBM), ceil_div(N, kUpBN)}; }

inline LaunchGrid lora_grad_pass_grid(int64_t M, int64_t r, int RT) {
  return {ceil_div(M, kGpBM), std::max<int64_t>(1, ceil_div(r, RT))};
}

}  // namespace cuda
}  // namespace lowcost
