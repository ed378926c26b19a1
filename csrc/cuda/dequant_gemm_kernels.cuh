// Kernel of dequant_gemm and dequant_gemm_dgrad (launched from dequant_gemm.cu): the frozen base GEMMs of
// the LoRA linear on a quantized weight W (N, K), never materialising a dense W:
//   forward  (DGRAD false): out (M, N) = c + x (M, K) deq(W)^T      reduction over K
//   dgrad    (DGRAD true):  out (M, K) = c + g (M, N) deq(W)        reduction over N
// c (optional, any strides: the LoRA term lora_up / lora_dx_da wrote, or a broadcast bias) is added to the
// fp32 accumulator in the epilogue and the sum is rounded once to the activation dtype, as cuBLAS's GEMM
// with beta = 1 does for the dense weight.
//
// Block (blockIdx.x, blockIdx.y) owns output columns 64 x .. +64 and rows 64 y .. +64 (launch_plan.h) and
// walks the reduction in steps of 64 through a 2-stage pipeline: the activation tile (64 x 64) is staged by
// cp.async while the block's threads decode the next 64 x 64 W tile (rows of W x columns of W) from its
// packed codes into the other stage's shared buffer, in the compute dtype (dequant_tile.cuh). Warp w owns
// output rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32: four m16n8k16 accumulators. The forward
// reads the W tile as B (k, n) = tile[n][k], the dgrad as B (n, k) = tile[n][k]: the same decoded tile,
// transposed access. The reduction is not split, so there are no partials and no atomics.
#pragma once

#include "common.cuh"
#include "dequant_tile.cuh"
#include "mma.cuh"
#include "tiles.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

// out[m, j] = T(acc + c[m, j]) for the warp's fragments (c optional).
template <typename T>
__device__ __forceinline__ void write_dequant_gemm_tile(const FragC (&acc)[4], int64_t m_base, int64_t j_base,
                                                        int64_t M, int64_t P, const T* __restrict__ c, int64_t sc0,
                                                        int64_t sc1, T* __restrict__ out) {
#pragma unroll
  for (int f = 0; f < 4; ++f)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = m_base + frag_c_row(e), j = j_base + f * 8 + frag_c_col(e);
      if (m < M && j < P) {
        const float base = c != nullptr ? to_float(c[m * sc0 + j * sc1]) : 0.0f;
        out[m * P + j] = from_float<T>(base + acc[f].x[e]);
      }
    }
}

template <typename T, int FMT, bool DGRAD>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    dequant_gemm_kernel(const T* __restrict__ a, int64_t M, int64_t Q, int64_t sa0, int64_t sa1, bool a_vec,
                        QuantTile q, const T* __restrict__ c, int64_t sc0, int64_t sc1, T* __restrict__ out,
                        int64_t P) {
  constexpr bool kMma = kUseMma<T>;
  constexpr DequantGemmLayout L = dequant_gemm_layout(sizeof(T));
  constexpr int LD = padded_ld(kQgBK, sizeof(T));
  LOWCOST_DYNAMIC_SMEM(smem);
  const int warp = warp_id(), wa = warp % 4, wb = warp / 4;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kQgBN, m0 = static_cast<int64_t>(blockIdx.y) * kQgBM;
  const int64_t steps = ceil_div(Q, kQgBK);
  float* tables = reinterpret_cast<float*>(smem + L.tables);
  auto a_tile = [&](int64_t i) { return reinterpret_cast<T*>(smem + (i % kQgStages) * L.stage); };
  auto w_tile = [&](int64_t i) { return reinterpret_cast<T*>(smem + (i % kQgStages) * L.stage + L.w_tile); };
  auto load = [&](int64_t i) {  // reduction step i: activation tile (async) and decoded W tile
    if (i < steps) {
      const int64_t r0 = i * kQgBK;
      stage_tile<T, kQgBM, kQgBK>(a_tile(i), a, m0, r0, M, Q, sa0, sa1, a_vec);
      if constexpr (DGRAD) {
        decode_w_tile<T, FMT>(w_tile(i), q, tables, r0, j0);
      } else {
        decode_w_tile<T, FMT>(w_tile(i), q, tables, j0, r0);
      }
    }
    cp_async_commit();
  };

  load_code_tables<FMT>(q, tables);
  __syncthreads();
  FragC acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) zero(acc[f]);
  load(0);
  for (int64_t i = 0; i < steps; ++i) {
    cp_async_wait<0>();
    __syncthreads();  // step i has landed and is decoded; every warp is done with step i - 1's buffers
    load(i + 1);
    const T* at = a_tile(i);
    const T* wt = w_tile(i);
#pragma unroll 1
    for (int kk = 0; kk < kQgBK; kk += 16) {
      const auto op_a = load_operand_a<kMma, LD, 1>(at + wa * 16 * LD + kk);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const int col = wb * 32 + f * 8;
        if constexpr (DGRAD) {
          mma(acc[f], op_a, load_operand_b<kMma, LD, 1>(wt + kk * LD + col));
        } else {
          mma(acc[f], op_a, load_operand_b<kMma, 1, LD>(wt + col * LD + kk));
        }
      }
    }
  }
  cp_async_wait<0>();
  write_dequant_gemm_tile(acc, m0 + wa * 16, j0 + wb * 32, M, P, c, sc0, sc1, out);
}

}  // namespace cuda
}  // namespace lowcost
