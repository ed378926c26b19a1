// Kernel of softmax_xent_rows, the fused linear cross-entropy's row pass (launched from xent_rows.cu; math and
// reduction order in csrc/xent_rows.h, shared with the CPU kernel).
//
// One block of kThreads threads per row, a grid-stride loop over rows (launch_plan.h's xent_rows_blocks). Thread
// t is lane t of csrc/xent_rows.h: it walks the row's groups of 4 columns q = t, t + kThreads, ... (one 8-byte
// (half, bfloat16) or 16-byte (float) load per group when the row start is aligned for it, element by element
// otherwise and for the last partial group), keeping its own online (max, sum of exponentials, sum). The
// kThreads partials meet in a halving tree in shared memory (3 x kThreads floats; no shuffles, no atomics), so
// the order of every floating-point operation depends on V alone. Thread 0 stores the row's loss; with HAS_GRAD a
// second pass over the same columns overwrites them with dz, rounded once to z's dtype.
//
// A label outside [0, V) that is not ignore_index cannot be reported from here: its row's loss and dz are NaN
// (lowcost.ops.linear_cross_entropy and the CPU kernel refuse such labels before any kernel runs).
#pragma once

#include "../xent_rows.h"
#include "common.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

static_assert(kXentLanes == kThreads, "csrc/xent_rows.h's lanes are the block's threads");

template <typename T>
__device__ __forceinline__ bool row_is_aligned4(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (kXentGroup * sizeof(T)) == 0;
}

// The 4 (capped) logits of group j0..j0+3 of a row (n of them valid), or fewer at the row's end.
template <typename T>
__device__ __forceinline__ int load_group(const T* row, int64_t j0, int64_t V, bool aligned, float cap, float v[4]) {
  const int n = V - j0 >= kXentGroup ? kXentGroup : static_cast<int>(V - j0);
  if (aligned && n == kXentGroup) {
    load4(row + j0, v);
  } else {
#pragma unroll
    for (int u = 0; u < kXentGroup; ++u) v[u] = u < n ? to_float(row[j0 + u]) : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kXentGroup; ++u) v[u] = xent_capped(v[u], cap);
  return n;
}

template <typename T, bool HAS_GRAD>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    xent_rows_kernel(T* __restrict__ z, int64_t sz, const int64_t* __restrict__ labels, int64_t sl,
                     const float* __restrict__ weight, int64_t C, XentSettings st, float* __restrict__ loss) {
  LOWCOST_DYNAMIC_SMEM(smem);
  float* part_m = reinterpret_cast<float*>(smem);
  float* part_s = part_m + kThreads;
  float* part_total = part_s + kThreads;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t V = st.V, groups = (V + kXentGroup - 1) / kXentGroup;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    T* row = z + c * sz;
    const bool aligned = row_is_aligned4(row);
    const int64_t label = labels[c * sl];
    const bool valid = label != st.ignore_index, in_range = label >= 0 && label < V;
    const int64_t target = valid && in_range ? label : 0;
    const float zc_y = xent_capped(to_float(row[target]), st.softcap);  // read before any thread writes dz
    XentPartial p = xent_partial_empty();
    for (int64_t q = t; q < groups; q += kThreads) {
      float v[4];
      const int n = load_group(row, q * kXentGroup, V, aligned, st.softcap, v);
#pragma unroll
      for (int u = 0; u < kXentGroup; ++u) {
        if (u < n) xent_partial_add(p, v[u]);
      }
    }
    part_m[t] = p.m;
    part_s[t] = p.s;
    part_total[t] = p.total;
    __syncthreads();
    for (int h = kThreads / 2; h > 0; h /= 2) {
      if (t < h) {
        const XentPartial merged = xent_partial_merge({part_m[t], part_s[t], part_total[t]},
                                                      {part_m[t + h], part_s[t + h], part_total[t + h]});
        part_m[t] = merged.m;
        part_s[t] = merged.s;
        part_total[t] = merged.total;
      }
      __syncthreads();
    }
    const XentPartial total = {part_m[0], part_s[0], part_total[0]};
    if (t == 0) loss[c] = valid ? (in_range ? xent_loss(total, zc_y, st) : NAN) : 0.0f;
    if (HAS_GRAD) {
      const float lse = xent_lse(total), w = valid ? (in_range ? weight[c] : NAN) : 0.0f;
      for (int64_t q = t; q < groups; q += kThreads) {
        const int64_t j0 = q * kXentGroup;
        float v[4];
        const int n = load_group(row, j0, V, aligned, st.softcap, v);
#pragma unroll
        for (int u = 0; u < kXentGroup; ++u) v[u] = xent_grad(v[u], lse, j0 + u == target, w, st);
        if (aligned && n == kXentGroup) {
          store4(row + j0, v);
        } else {
#pragma unroll
          for (int u = 0; u < kXentGroup; ++u) {
            if (u < n) row[j0 + u] = from_float<T>(v[u]);
          }
        }
      }
    }
    __syncthreads();  // the partials' shared memory is the next row's
  }
}

}  // namespace cuda
}  // namespace lowcost
