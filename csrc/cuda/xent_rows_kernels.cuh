// Kernels of softmax_xent_rows, the fused linear cross-entropy's row pass (launched from host_launchers.h's
// run_softmax_xent_rows with launch_plan.h's plan_xent_rows; math and reduction order in csrc/xent_rows.h, shared
// with the CPU kernel).
//
// Thread t is lane t of csrc/xent_rows.h. A block reduces one piece of a row (8192 columns) at a time: thread t
// walks the piece's groups of 4 columns q = t, t + kThreads, ... (one 8-byte (half, bfloat16) or 16-byte (float)
// load per group when the row start is aligned for it, element by element otherwise and for the last partial
// group), keeping its own online (max, sum of exponentials, sum); the kThreads partials meet in a halving tree in
// shared memory (3 x kThreads floats; no shuffles, no atomics) into the piece's partial, and the row's partial is
// the left fold of its pieces' partials in piece order. So the order of every floating-point operation depends on
// V alone, not on the grid:
//   xent_rows_kernel (S = 1): one block per row, grid-stride over rows: the pieces folded as they come, thread 0
//       stores the loss, with HAS_GRAD a second pass overwrites the row with dz, rounded once to z's dtype.
//   xent_partials_kernel + xent_finish_kernel (S > 1: rows too few to fill the GPU): block (row c, slice s) of the
//       first writes its slice's piece partials (and slice 0 the capped target logit, read before any dz is
//       written) to the fp32 workspace; block (c, s) of the second folds all of row c's partials in piece order
//       (every block the same fold: no atomics, no inter-block sync), slice 0 stores the loss, and with HAS_GRAD
//       writes dz over slice s's columns.
//
// Each kernel is compiled for launch_plan.h's kXentBlocksPerSm resident blocks of kThreads (the SM's 2048 threads:
// at most 32 registers per thread), the occupancy the plan's grids assume.
//
// A label outside [0, V) that is not ignore_index cannot be reported from here: its row's loss and dz are NaN
// (lowcost.ops.linear_cross_entropy and the CPU kernel refuse such labels before any kernel runs).
#pragma once

#include "../xent_rows.h"
#include "common.cuh"
#include "launch_plan.h"

#include <cstdint>

namespace lowcost {
namespace cuda {

static_assert(kXentLanes == kThreads, "csrc/xent_rows.h's lanes are the block's threads");
static_assert(kXentPieceGroups % kThreads == 0, "a piece's groups start at lane 0");

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

// A row's label read once: whether it counts (not ignore_index), whether it names a class, and the column whose
// logit enters the loss (0 for a row that has none, so the read stays inside the row).
struct XentRowLabel {
  bool valid;
  bool in_range;
  int64_t target;
};

__device__ __forceinline__ XentRowLabel xent_row_label(int64_t label, const XentSettings& st) {
  const bool valid = label != st.ignore_index, in_range = label >= 0 && label < st.V;
  return {valid, in_range, valid && in_range ? label : 0};
}

// The loss of a row: 0 when ignored, NaN for a label outside [0, V).
__device__ __forceinline__ float xent_row_loss(const XentPartial& total, float zc_y, const XentRowLabel& y,
                                               const XentSettings& st) {
  return y.valid ? (y.in_range ? xent_loss(total, zc_y, st) : NAN) : 0.0f;
}

// The weight of a row's dz: 0 when ignored, NaN for a label outside [0, V).
__device__ __forceinline__ float xent_row_weight(const float* weight, int64_t c, const XentRowLabel& y) {
  return y.valid ? (y.in_range ? weight[c] : NAN) : 0.0f;
}

// The partial of piece `piece` of a row, returned to every thread of the block: the lanes' online partials, then
// the halving tree in `part` (3 x kThreads floats), which is free again when this returns.
template <typename T>
__device__ __forceinline__ XentPartial block_piece_partial(const T* row, int64_t piece, bool aligned,
                                                           const XentSettings& st, float* part) {
  float* part_m = part;
  float* part_s = part + kThreads;
  float* part_total = part + 2 * kThreads;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t q_end = xent_piece_end(piece, st.V);
  XentPartial p = xent_partial_empty();
  for (int64_t q = piece * kXentPieceGroups + t; q < q_end; q += kThreads) {
    float v[4];
    const int n = load_group(row, q * kXentGroup, st.V, aligned, st.softcap, v);
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
  const XentPartial out = {part_m[0], part_s[0], part_total[0]};
  __syncthreads();  // `part` is the next piece's
  return out;
}

// dz over groups [q_begin, q_end) of a row (the block's threads take every kThreads-th group), rounded once to T.
template <typename T>
__device__ __forceinline__ void write_dz(T* row, int64_t q_begin, int64_t q_end, bool aligned, float lse,
                                         int64_t target, float w, const XentSettings& st) {
  for (int64_t q = q_begin + threadIdx.x; q < q_end; q += kThreads) {
    const int64_t j0 = q * kXentGroup;
    float v[4];
    const int n = load_group(row, j0, st.V, aligned, st.softcap, v);
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

// S = 1: one block per row, grid-stride over rows.
template <typename T, bool HAS_GRAD>
__global__ void __launch_bounds__(kThreads, kXentBlocksPerSm)
    xent_rows_kernel(T* __restrict__ z, int64_t sz, const int64_t* __restrict__ labels, int64_t sl,
                     const float* __restrict__ weight, int64_t C, XentSettings st, float* __restrict__ loss) {
  LOWCOST_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);
  const int64_t pieces = xent_pieces(st.V);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    T* row = z + c * sz;
    const bool aligned = row_is_aligned4(row);
    const XentRowLabel y = xent_row_label(labels[c * sl], st);
    const float zc_y = xent_capped(to_float(row[y.target]), st.softcap);  // read before any thread writes dz
    XentPartial total = xent_partial_empty();
    for (int64_t piece = 0; piece < pieces; ++piece) {
      total = xent_partial_merge(total, block_piece_partial(row, piece, aligned, st, part));
    }
    if (threadIdx.x == 0) loss[c] = xent_row_loss(total, zc_y, y, st);
    if (HAS_GRAD) {
      write_dz(row, 0, xent_groups(st.V), aligned, xent_lse(total), y.target, xent_row_weight(weight, c, y), st);
    }
  }
}

// S > 1, first launch (grid (C, S)): block (c, s) writes the (m, s, sum) of slice s's pieces of row c to workspace row c
// (xent_workspace_row floats: the pieces' partials, then the capped target logit, written by slice 0).
template <typename T>
__global__ void __launch_bounds__(kThreads, kXentBlocksPerSm)
    xent_partials_kernel(const T* __restrict__ z, int64_t sz, const int64_t* __restrict__ labels, int64_t sl,
                         int64_t C, XentSettings st, float* __restrict__ workspace) {
  LOWCOST_DYNAMIC_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);
  const int64_t pieces = xent_pieces(st.V);
  const int64_t p_begin = range_begin(pieces, gridDim.y, blockIdx.y);
  const int64_t p_end = range_begin(pieces, gridDim.y, blockIdx.y + 1);
  const int64_t c = blockIdx.x;  // grid.x = C: the plan splits rows only when they are fewer than its target
  if (c >= C) return;
  const T* row = z + c * sz;
  const bool aligned = row_is_aligned4(row);
  float* ws = workspace + c * xent_workspace_row(pieces);
  for (int64_t piece = p_begin; piece < p_end; ++piece) {
    const XentPartial p = block_piece_partial(row, piece, aligned, st, part);
    if (threadIdx.x == 0) {
      ws[3 * piece] = p.m;
      ws[3 * piece + 1] = p.s;
      ws[3 * piece + 2] = p.total;
    }
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    ws[3 * pieces] = xent_capped(to_float(row[xent_row_label(labels[c * sl], st).target]), st.softcap);
  }
}

// S > 1, second launch (grid (C, S), or (C, 1) without HAS_GRAD): block (c, s) folds row c's piece partials (all of them, in piece order), slice 0 stores
// the loss, and with HAS_GRAD the block writes dz over slice s's pieces.
template <typename T, bool HAS_GRAD>
__global__ void __launch_bounds__(kThreads, kXentBlocksPerSm)
    xent_finish_kernel(T* __restrict__ z, int64_t sz, const int64_t* __restrict__ labels, int64_t sl,
                       const float* __restrict__ weight, int64_t C, XentSettings st,
                       const float* __restrict__ workspace, float* __restrict__ loss) {
  const int64_t pieces = xent_pieces(st.V);
  const int64_t q_begin = range_begin(pieces, gridDim.y, blockIdx.y) * kXentPieceGroups;
  const int64_t q_end = xent_piece_end(range_begin(pieces, gridDim.y, blockIdx.y + 1) - 1, st.V);
  const int64_t c = blockIdx.x;  // grid.x = C, as in xent_partials_kernel
  if (c >= C) return;
  const float* ws = workspace + c * xent_workspace_row(pieces);
  const XentRowLabel y = xent_row_label(labels[c * sl], st);
  const XentPartial total = xent_fold_pieces(ws, ws + 1, ws + 2, pieces, 3);
  if (blockIdx.y == 0 && threadIdx.x == 0) loss[c] = xent_row_loss(total, ws[3 * pieces], y, st);
  if (HAS_GRAD) {
    T* row = z + c * sz;
    write_dz(row, q_begin, q_end, row_is_aligned4(row), xent_lse(total), y.target, xent_row_weight(weight, c, y), st);
  }
}

}  // namespace cuda
}  // namespace lowcost
