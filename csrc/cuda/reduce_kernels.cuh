// sum_partials: the fixed-order reduction that replaces atomics in the skinny kernels.
//
// A kernel that splits a reduction across blocks (K splits of lora_down, row and column segments of
// lora_grad_pass, row segments of lora_dx_da) writes one fp32 partial per split into a workspace
// (count, n); this kernel adds them: out[e] = (sum of partials [0, count/2)) + (sum of partials
// [count/2, count)), each half in increasing order. The order depends on the shapes alone, so results
// are bitwise reproducible from run to run. Up to three outputs are reduced by one launch; a block
// covers 128 elements of one job with its two thread halves.
#pragma once

#include "common.cuh"

#include <cstdint>

namespace lowcost {
namespace cuda {

struct ReduceJob {
  const float* parts = nullptr;  // (count, n), contiguous
  float* out = nullptr;          // (n,), contiguous
  int64_t n = 0;
  int64_t count = 0;
};

struct ReduceJobs {
  ReduceJob job[kReduceJobs];
  int64_t first_block[kReduceJobs + 1];  // job i owns blocks [first_block[i], first_block[i + 1])
};

// A template (one job count) so every .cu that includes this header may instantiate it.
template <int kJobs>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sum_partials_kernel(ReduceJobs jobs) {
  static_assert(kJobs == 3, "the job selection below is written for three jobs");
  LOWCOST_DYNAMIC_SMEM(smem);
  float* upper = reinterpret_cast<float*>(smem);  // the second half's sums
  const int64_t block = blockIdx.x;
  // Constant indices only (a dynamic index would copy the job table to local memory).
  const int i = block >= jobs.first_block[2] ? 2 : (block >= jobs.first_block[1] ? 1 : 0);
  const ReduceJob job = i == 2 ? jobs.job[2] : (i == 1 ? jobs.job[1] : jobs.job[0]);
  const int64_t first = i == 2 ? jobs.first_block[2] : (i == 1 ? jobs.first_block[1] : jobs.first_block[0]);
  const int slot = static_cast<int>(threadIdx.x) % kReduceElems, half = static_cast<int>(threadIdx.x) / kReduceElems;
  const int64_t e = (block - first) * kReduceElems + slot;
  float sum = 0.0f;
  if (e < job.n) {
    const int64_t p1 = range_begin(job.count, 2, half + 1);
    for (int64_t p = range_begin(job.count, 2, half); p < p1; ++p) sum += job.parts[p * job.n + e];
  }
  if (half == 1) upper[slot] = sum;
  __syncthreads();
  if (half == 0 && e < job.n) job.out[e] = sum + upper[slot];
}

}  // namespace cuda
}  // namespace lowcost
