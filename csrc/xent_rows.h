// The row pass of the fused linear cross-entropy (lowcost/ops/linear_cross_entropy.py; math in
// lowcost/reference/linear_cross_entropy.py), in float32, written once for the CPU kernel
// (csrc/cpu/xent_rows_cpu.cpp) and the CUDA kernel (csrc/cuda/xent_rows_kernels.cuh). It follows the Triton row
// kernel (lowcost/kernels/linear_cross_entropy.py) formula by formula:
//
//   zc   = c (1 - 2 / (exp(2 z / c) + 1))      soft-capping c tanh(z / c), when c > 0 (tanh written with exp)
//   lse  = m + log(s)                          online logsumexp: running max m, s = sum_j exp(zc_j - m)
//   loss = lse - (1 - eps) zc_y - (eps / V) sum_j zc_j                    0 when y == ignore_index
//   dz_j = w (exp(zc_j - lse) - eps / V - (1 - eps) [j == y])            w = row weight, 0 for an ignored row
//   dz_j *= 1 - (zc_j / c)^2                   through the soft-cap, when c > 0
//
// Reduction order (what fixes the bits, a function of V alone): the row is cut into pieces of kXentPieceGroups
// groups of 4 columns (8192 columns; xent_pieces(V) of them, the last one shorter). Inside a piece the groups are
// dealt to kXentLanes lanes (lane t owns columns 4q..4q+3 of every group q of the piece with q = t mod kXentLanes,
// in increasing order); each lane keeps a partial (m, s, sum) updated one element at a time (xent_partial_add); the
// lanes are merged by a halving tree (lane t absorbs lane t + h for h = kXentLanes/2, ..., 1) into the piece's
// partial; the row's partial is the left fold of its pieces' partials in piece order, starting from the empty
// partial (xent_fold_pieces). The CUDA kernels give lane t to thread t of a block and may spread a row's pieces
// over several blocks (launch_plan.h's plan_xent_rows: S slices of whole pieces, partials through a workspace);
// the fold is the same whatever S is, so the bits do not depend on the launch. The CPU kernel walks the same
// pieces and lanes, so under host emulation both produce the same bits.
#pragma once

#include "host_device.h"

#include <cmath>
#include <cstdint>

namespace lowcost {

constexpr int kXentLanes = 256;  // = the CUDA kernel's threads per block (launch_plan.h's kThreads)
constexpr int kXentGroup = 4;    // consecutive columns per lane visit (one 4-wide load on the GPU)
constexpr int64_t kXentPieceGroups = 8 * kXentLanes;  // groups of a piece: 8 sweeps of the lanes, 8192 columns

// Groups of 4 columns of a row of V logits (the last one may be partial).
LOWCOST_HD int64_t xent_groups(int64_t V) { return (V + kXentGroup - 1) / kXentGroup; }

// One past the last group of piece p of a row of V logits.
LOWCOST_HD int64_t xent_piece_end(int64_t p, int64_t V) {
  const int64_t end = (p + 1) * kXentPieceGroups, groups = xent_groups(V);
  return end < groups ? end : groups;
}

// Pieces of a row of V logits (at least 1); piece p covers groups [p kXentPieceGroups, (p + 1) kXentPieceGroups).
LOWCOST_HD int64_t xent_pieces(int64_t V) {
  const int64_t pieces = (xent_groups(V) + kXentPieceGroups - 1) / kXentPieceGroups;
  return pieces > 0 ? pieces : 1;
}

// Per-row settings of the op (softcap 0: none).
struct XentSettings {
  int64_t V = 0;
  int64_t ignore_index = -100;
  float smoothing = 0.0f;
  float softcap = 0.0f;
};

// c tanh(z / c) as the Triton kernel writes it: exact limits +-c for large |z|.
LOWCOST_HD float xent_softcap(float z, float cap) {
  return cap * (1.0f - 2.0f / (expf(2.0f * z / cap) + 1.0f));
}

LOWCOST_HD float xent_capped(float z, float cap) {
  return cap > 0.0f ? xent_softcap(z, cap) : z;
}

// A lane's share of a row: running max m, s = sum exp(zc - m), and sum zc (label smoothing's term).
struct XentPartial {
  float m;
  float s;
  float total;
};

LOWCOST_HD XentPartial xent_partial_empty() {
  return {-INFINITY, 0.0f, 0.0f};
}

// One more (capped) logit. NaN logits make s NaN (the comparison fails), so the row's loss is NaN.
LOWCOST_HD void xent_partial_add(XentPartial& p, float zc) {
  if (zc > p.m) {
    p.s = p.s * expf(p.m - zc) + 1.0f;
    p.m = zc;
  } else {
    p.s += expf(zc - p.m);
  }
  p.total += zc;
}

// a then b (a lane with no columns, m = -inf and s = 0, contributes nothing).
LOWCOST_HD XentPartial xent_partial_merge(const XentPartial& a, const XentPartial& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s, a.total + b.total};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m), a.total + b.total};
}

// The row's partial: the left fold of its `pieces` piece partials (piece p at m[p * stride], s[p * stride],
// total[p * stride]) in piece order, from the empty partial. Every kernel and every block of a split row folds
// this way, so the row's bits depend on V alone.
LOWCOST_HD XentPartial xent_fold_pieces(const float* m, const float* s, const float* total, int64_t pieces,
                                        int64_t stride) {
  XentPartial row = xent_partial_empty();
  for (int64_t p = 0; p < pieces; ++p) row = xent_partial_merge(row, {m[p * stride], s[p * stride], total[p * stride]});
  return row;
}

LOWCOST_HD float xent_lse(const XentPartial& p) {
  return p.m + logf(p.s);
}

// The row's loss from its merged partial and its (capped) target logit; the caller zeroes ignored rows.
LOWCOST_HD float xent_loss(const XentPartial& p, float zc_y, const XentSettings& st) {
  return xent_lse(p) - (1.0f - st.smoothing) * zc_y - st.smoothing / static_cast<float>(st.V) * p.total;
}

// dz of one column: zc its capped logit, w the row's weight (0 for an ignored row).
LOWCOST_HD float xent_grad(float zc, float lse, bool is_target, float w, const XentSettings& st) {
  float dz = expf(zc - lse) - st.smoothing / static_cast<float>(st.V) - (is_target ? 1.0f - st.smoothing : 0.0f);
  dz = dz * w;
  if (st.softcap > 0.0f) {
    const float t = zc / st.softcap;
    dz = dz * (1.0f - t * t);
  }
  return dz;
}

}  // namespace lowcost
