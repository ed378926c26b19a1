// CPU kernel of softmax_xent_rows: the row pass of the fused linear cross-entropy (math and reduction order in
// csrc/xent_rows.h, shared with the CUDA kernels). Per row: one pass over V, piece by piece (8192 columns) dealing
// the piece's columns to kXentLanes partials in groups of 4 and merging them by the halving tree, the pieces'
// partials folded in piece order, the loss; with row_weight a second pass writes dz over the
// logits in place (rounded once to z's dtype). Rows are split over threads; each row is computed by one thread
// in a fixed order, so results do not depend on the thread count. The CUDA launch plan may split a row's pieces over
// S blocks (launch_plan.h's plan_xent_rows); the fold is the same for every S, so this kernel has no S and the
// emulated CUDA kernels equal it to the bit at every SM count.
#include "ops_cpu.h"

#include "../checks.h"
#include "../dispatch.h"
#include "../xent_rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace lowcost {
namespace cpu {
namespace {

// The (m, s, sum) of piece p of a row of capped logits, in the CUDA kernel's lane order.
template <typename T>
XentPartial piece_partial(const T* z, int64_t p, const XentSettings& st) {
  std::array<XentPartial, kXentLanes> lanes;
  lanes.fill(xent_partial_empty());
  const int64_t j_end = std::min(st.V, xent_piece_end(p, st.V) * kXentGroup);
  for (int64_t j = p * kXentPieceGroups * kXentGroup; j < j_end; ++j) {
    xent_partial_add(lanes[(j / kXentGroup) % kXentLanes], xent_capped(static_cast<float>(z[j]), st.softcap));
  }
  for (int h = kXentLanes / 2; h > 0; h /= 2) {
    for (int t = 0; t < h; ++t) lanes[t] = xent_partial_merge(lanes[t], lanes[t + h]);
  }
  return lanes[0];
}

// The row's (m, s, sum): its pieces' partials folded in piece order (what every CUDA launch plan computes).
template <typename T>
XentPartial row_partial(const T* z, const XentSettings& st) {
  const int64_t pieces = xent_pieces(st.V);
  std::vector<float> parts(3 * pieces);
  for (int64_t p = 0; p < pieces; ++p) {
    const XentPartial part = piece_partial(z, p, st);
    parts[3 * p] = part.m;
    parts[3 * p + 1] = part.s;
    parts[3 * p + 2] = part.total;
  }
  return xent_fold_pieces(parts.data(), parts.data() + 1, parts.data() + 2, pieces, 3);
}

template <typename T>
void xent_rows_impl(at::Tensor& z, const at::Tensor& labels, const float* weight, const XentSettings& st,
                    at::Tensor& loss) {
  const int64_t C = z.size(0), V = st.V, sz = z.stride(0), sl = labels.stride(0);
  const int64_t sw = weight != nullptr ? 1 : 0;
  T* zp = z.data_ptr<T>();
  const int64_t* lp = labels.data_ptr<int64_t>();
  float* out = loss.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  at::parallel_for(0, C, grain, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      T* row = zp + c * sz;
      const int64_t label = lp[c * sl];
      const bool valid = label != st.ignore_index;
      const int64_t target = valid ? label : 0;
      const XentPartial p = row_partial(row, st);
      const float zc_y = xent_capped(static_cast<float>(row[target]), st.softcap);
      out[c] = valid ? xent_loss(p, zc_y, st) : 0.0f;
      if (weight == nullptr) continue;
      const float lse = xent_lse(p), w = valid ? weight[c * sw] : 0.0f;
      for (int64_t j = 0; j < V; ++j) {
        row[j] = static_cast<T>(xent_grad(xent_capped(static_cast<float>(row[j]), st.softcap), lse, j == target, w, st));
      }
    }
  });
}

// A label that is neither a class nor ignore_index would index outside the row: refused by name.
void check_label_range(const at::Tensor& labels, const XentSettings& st) {
  const int64_t* lp = labels.data_ptr<int64_t>();
  for (int64_t c = 0; c < labels.size(0); ++c) {
    const int64_t y = lp[c * labels.stride(0)];
    TORCH_CHECK(y == st.ignore_index || (y >= 0 && y < st.V), "lowcost::softmax_xent_rows: labels must be in [0, ",
                st.V, ") or ignore_index=", st.ignore_index, "; got ", y, " at row ", c);
  }
}

}  // namespace

at::Tensor softmax_xent_rows(at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& row_weight,
                             int64_t ignore_index, double label_smoothing, double softcap) {
  const XentSettings st =
      check_softmax_xent_rows_args(z, labels, row_weight, ignore_index, label_smoothing, softcap, c10::DeviceType::CPU);
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  if (z.size(0) == 0) return loss;
  check_label_range(labels, st);
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  dispatch_act(z.scalar_type(), "softmax_xent_rows", [&](auto tv) {
    xent_rows_impl<decltype(tv)>(z, labels, weight.defined() ? weight.data_ptr<float>() : nullptr, st, loss);
  });
  return loss;
}

}  // namespace cpu
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, CPU, m) {
  m.impl("softmax_xent_rows", &lowcost::cpu::softmax_xent_rows);
}
