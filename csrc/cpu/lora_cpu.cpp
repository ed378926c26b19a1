// CPU implementations of the fused LoRA ops (the dropout ops are in dropout_cpu.cpp): plain loops
// over strided inputs, float32 accumulation, at::parallel_for over independent row or column blocks.
// Every reduction splits the work into blocks fixed by the shapes alone and adds the partial results in
// a fixed order, so results do not depend on the number of threads.
//
// The small adapters (lora_a (r, K), lora_b (N, r)) are staged once into float32 buffers laid out
// for the inner loops (the CPU's counterpart of shared memory); x and grad_y are never copied: they
// are read in place through their strides with int64 offsets.
#include "ops_cpu.h"

#include "../checks.h"
#include "../dispatch.h"
#include "../philox.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lowcost {
namespace cpu {
namespace {

// Streams keep flags for increasing logical indices, calling the generator once per group of 4.
class MaskCursor {
 public:
  explicit MaskCursor(const DropoutParams& d) : d_(d) {}

  bool keep(int64_t i) {
    if (!d_.enabled) return true;
    const uint64_t group = static_cast<uint64_t>(i) >> 2;
    if (group != group_) {
      group_ = group;
      bits_ = keep_bits(philox_group(d_, group), d_.threshold);
    }
    return (bits_ >> (i & 3)) & 1u;
  }

 private:
  const DropoutParams& d_;
  uint64_t group_ = ~uint64_t{0};
  uint32_t bits_ = 0;
};

// dst = float32(t) for a 2-D tensor read through its strides; row-major (R, C), or (C, R) when
// transpose is set.
template <typename T>
std::vector<float> stage_fp32(const at::Tensor& t, bool transpose) {
  const int64_t R = t.size(0), C = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  std::vector<float> dst(static_cast<size_t>(R * C));
  const T* p = t.data_ptr<T>();
  for (int64_t i = 0; i < R; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      const float v = static_cast<float>(p[i * s0 + j * s1]);
      dst[static_cast<size_t>(transpose ? j * R + i : i * C + j)] = v;
    }
  }
  return dst;
}

// Rows per parallel chunk so that a chunk does at least ~64k multiply-adds.
int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_row));
}

// out[j] = sum_k D_k x[m, k] a_kr[k][j] for one row m of x (xrow: its first element, sx1: its column stride), the
// mask read through `mask` at the logical indices m*K + k. The loop order (k ascending, zero start) is the one
// every lora_down row uses, so rows computed here for any caller are bitwise those of lora_down.
template <typename xT>
void lora_down_row(const xT* xrow, int64_t sx1, int64_t m, int64_t K, const float* a_kr, int64_t r,
                   const DropoutParams& d, MaskCursor& mask, float* out) {
  std::fill(out, out + r, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    if (!mask.keep(m * K + k)) continue;  // a dropped element contributes exactly 0
    const float xv = dropout_apply(d, true, static_cast<float>(xrow[k * sx1]));
    const float* a = a_kr + k * r;
    for (int64_t j = 0; j < r; ++j) out[j] += xv * a[j];
  }
}

template <typename xT, typename aT>
void lora_down_impl(const at::Tensor& x, const at::Tensor& lora_a, const DropoutParams& d,
                    at::Tensor& u) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_a.size(0);
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const std::vector<float> at_kr = stage_fp32<aT>(lora_a, /*transpose=*/true);  // [K][r]
  const xT* xp = x.data_ptr<xT>();
  float* up = u.data_ptr<float>();
  at::parallel_for(0, M, row_grain(K * r), [&](int64_t m_begin, int64_t m_end) {
    MaskCursor mask(d);
    std::vector<float> acc(static_cast<size_t>(r));
    for (int64_t m = m_begin; m < m_end; ++m) {
      lora_down_row<xT>(xp + m * sx0, sx1, m, K, at_kr.data(), r, d, mask, acc.data());
      std::copy(acc.begin(), acc.end(), up + m * r);
    }
  });
}

// lora_down_grouped: per row m of x, each projection i's columns u[m, o_i .. o_i + r_i) (o_i = r_0 + .. + r_{i-1})
// by lora_down_row with its own mask cursor, so each is bitwise its lora_down's row; the row is read from memory
// once and from cache by the later projections.
template <typename xT, typename aT>
void lora_down_grouped_impl(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks,
                            const std::vector<DropoutParams>& ds, at::Tensor& u) {
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const int64_t P = static_cast<int64_t>(ranks.size());
  std::vector<std::vector<float>> a_kr;  // projection i's A_i as [K][r_i]
  std::vector<int64_t> offset(static_cast<size_t>(P) + 1, 0);
  for (int64_t i = 0; i < P; ++i) {
    a_kr.push_back(stage_fp32<aT>(lora_a.narrow(0, offset[i], ranks[i]), /*transpose=*/true));
    offset[i + 1] = offset[i] + ranks[i];
  }
  const xT* xp = x.data_ptr<xT>();
  float* up = u.data_ptr<float>();
  at::parallel_for(0, M, row_grain(K * R), [&](int64_t m_begin, int64_t m_end) {
    std::vector<MaskCursor> masks(ds.begin(), ds.end());
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t i = 0; i < P; ++i) {
        lora_down_row<xT>(xp + m * sx0, sx1, m, K, a_kr[i].data(), ranks[i], ds[i], masks[i], up + m * R + offset[i]);
      }
    }
  });
}

template <typename oT, typename bT>
void lora_up_impl(const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& bias,
                  float scale, at::Tensor& out) {
  const int64_t M = u.size(0), r = u.size(1), N = lora_b.size(0);
  const int64_t su0 = u.stride(0), su1 = u.stride(1);
  const std::vector<float> b_nr = stage_fp32<bT>(lora_b, /*transpose=*/false);  // [N][r]
  std::vector<float> bias32(static_cast<size_t>(N), 0.0f);
  if (bias.defined()) {
    const oT* bp = bias.data_ptr<oT>();
    for (int64_t n = 0; n < N; ++n) bias32[n] = static_cast<float>(bp[n * bias.stride(0)]);
  }
  const float* up = u.data_ptr<float>();
  oT* op = out.data_ptr<oT>();
  at::parallel_for(0, M, row_grain(N * r), [&](int64_t m_begin, int64_t m_end) {
    std::vector<float> urow(static_cast<size_t>(r));
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t j = 0; j < r; ++j) urow[j] = up[m * su0 + j * su1];
      oT* orow = op + m * N;
      for (int64_t n = 0; n < N; ++n) {
        const float* b = b_nr.data() + n * r;
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc += urow[j] * b[j];
        orow[n] = static_cast<oT>(scale * acc + bias32[n]);
      }
    }
  });
}

// grad_y is read once, row by row. Rows are split into a shape-determined number of chunks; each
// chunk writes its du rows directly and accumulates private partial dB / dbias sums, which are
// then added in chunk order.
template <typename gT, typename bT>
void lora_grad_pass_impl(const at::Tensor& g, const at::Tensor& u, const at::Tensor& lora_b,
                         float scale, bool need_dbias, at::Tensor& du, at::Tensor& dB,
                         at::Tensor& dbias) {
  const int64_t M = g.size(0), N = g.size(1), r = u.size(1);
  const int64_t sg0 = g.stride(0), sg1 = g.stride(1), su0 = u.stride(0), su1 = u.stride(1);
  const std::vector<float> b_nr = stage_fp32<bT>(lora_b, /*transpose=*/false);  // [N][r]
  const int64_t part_size = N * (r + 1);  // dB partial (N, r) then dbias partial (N,)
  const int64_t kPartBudget = int64_t{1} << 23;  // floats (32 MiB) for all partials together
  const int64_t max_chunks =
      std::max<int64_t>(1, std::min<int64_t>(64, kPartBudget / std::max<int64_t>(1, part_size)));
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, M));
  const int64_t rows_per_chunk = (M + n_chunks - 1) / n_chunks;
  std::vector<float> parts(static_cast<size_t>(n_chunks * part_size), 0.0f);

  const gT* gp = g.data_ptr<gT>();
  const float* up = u.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> urow(static_cast<size_t>(r)), acc(static_cast<size_t>(r));
    for (int64_t c = c_begin; c < c_end; ++c) {
      float* pdB = parts.data() + c * part_size;
      float* pdbias = pdB + N * r;
      const int64_t m_end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t m = c * rows_per_chunk; m < m_end; ++m) {
        for (int64_t j = 0; j < r; ++j) urow[j] = up[m * su0 + j * su1];
        std::fill(acc.begin(), acc.end(), 0.0f);
        const gT* grow = gp + m * sg0;
        for (int64_t n = 0; n < N; ++n) {
          const float gv = static_cast<float>(grow[n * sg1]);
          const float* b = b_nr.data() + n * r;
          float* p = pdB + n * r;
          for (int64_t j = 0; j < r; ++j) {
            acc[j] += gv * b[j];
            p[j] += gv * urow[j];
          }
          pdbias[n] += gv;
        }
        for (int64_t j = 0; j < r; ++j) dup[m * r + j] = scale * acc[j];
      }
    }
  });

  float* dBp = dB.data_ptr<float>();
  float* dbp = need_dbias ? dbias.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, row_grain(n_chunks * r), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      for (int64_t j = 0; j < r; ++j) {
        float s = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) s += parts[c * part_size + n * r + j];
        dBp[n * r + j] = scale * s;
      }
      if (dbp != nullptr) {
        float s = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) s += parts[c * part_size + N * r + n];
        dbp[n] = s;
      }
    }
  });
}

// Columns [k0, k1) of one row m of lora_dx_da (xrow: the row's first element, sx1: its column stride; durow: du's
// row, a_kr: A as [K][r]; the mask read through `mask` at m*K + k, once per element, used for both outputs):
//   dx_acc[k - k0] = D (.) (du A)[m, k] in fp32 (with `accumulate`, added to what dx_acc holds) when dx_acc is set,
//   dA_blk[(k - k0) r + j] += du[m, j] (D (.) x)[m, k].
// One lora_dx_da and every projection of lora_dx_da_grouped go through it, so their sums are the same, bit for bit.
template <typename xT>
void dx_da_row_segment(const xT* xrow, int64_t sx1, int64_t m, int64_t K, int64_t k0, int64_t k1,
                       const float* a_kr, const float* durow, int64_t r, const DropoutParams& d, MaskCursor& mask,
                       float* dx_acc, bool accumulate, float* dA_blk) {
  for (int64_t k = k0; k < k1; ++k) {
    const bool keep = mask.keep(m * K + k);
    const float* a = a_kr + k * r;
    if (dx_acc != nullptr) {
      float acc = 0.0f;
      for (int64_t j = 0; j < r; ++j) acc += durow[j] * a[j];
      const float v = dropout_apply(d, keep, acc);
      dx_acc[k - k0] = accumulate ? dx_acc[k - k0] + v : v;
    }
    if (!keep) continue;
    const float xv = dropout_apply(d, true, static_cast<float>(xrow[k * sx1]));
    float* p = dA_blk + (k - k0) * r;
    for (int64_t j = 0; j < r; ++j) p[j] += durow[j] * xv;
  }
}

// Copies projection rows [o, o + r) of du's row m (strides sd0, sd1) into durow.
inline void load_du_row(const float* dp, int64_t sd0, int64_t sd1, int64_t m, int64_t o, int64_t r, float* durow) {
  for (int64_t j = 0; j < r; ++j) durow[j] = dp[m * sd0 + (o + j) * sd1];
}

// Writes a column block's dA accumulators ([k1 - k0][r]) to rows [o, o + r) of the (., K) output dAp.
inline void store_da_block(const float* dA_blk, int64_t k0, int64_t k1, int64_t r, int64_t o, int64_t K,
                           float* dAp) {
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t j = 0; j < r; ++j) dAp[(o + j) * K + k] = dA_blk[(k - k0) * r + j];
  }
}

constexpr int64_t kDxDaBlock = 64;  // columns of K per parallel block of lora_dx_da and lora_dx_da_grouped

// Column blocks of K run in parallel; each walks all rows, generating each element's mask once and
// using it for both dx_lora (D (.) (du A)) and the block's slice of dA = du^T (D (.) x).
template <typename xT, typename aT>
void lora_dx_da_impl(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                     const DropoutParams& d, bool need_dx, at::Tensor& dx, at::Tensor& dA) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_a.size(0);
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sd0 = du.stride(0), sd1 = du.stride(1);
  const std::vector<float> at_kr = stage_fp32<aT>(lora_a, /*transpose=*/true);  // [K][r]
  const int64_t n_blocks = (K + kDxDaBlock - 1) / kDxDaBlock;
  const xT* xp = x.data_ptr<xT>();
  const float* dp = du.data_ptr<float>();
  xT* dxp = need_dx ? dx.data_ptr<xT>() : nullptr;
  float* dAp = dA.data_ptr<float>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<float> dA_blk(static_cast<size_t>(kDxDaBlock * r)), durow(static_cast<size_t>(r));
    std::vector<float> dx_row(static_cast<size_t>(kDxDaBlock));
    MaskCursor mask(d);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t k0 = blk * kDxDaBlock, k1 = std::min(K, k0 + kDxDaBlock);
      std::fill(dA_blk.begin(), dA_blk.end(), 0.0f);
      for (int64_t m = 0; m < M; ++m) {
        load_du_row(dp, sd0, sd1, m, 0, r, durow.data());
        dx_da_row_segment<xT>(xp + m * sx0, sx1, m, K, k0, k1, at_kr.data(), durow.data(), r, d, mask,
                              dxp != nullptr ? dx_row.data() : nullptr, false, dA_blk.data());
        if (dxp != nullptr) {
          for (int64_t k = k0; k < k1; ++k) dxp[m * K + k] = static_cast<xT>(dx_row[k - k0]);
        }
      }
      store_da_block(dA_blk.data(), k0, k1, r, 0, K, dAp);
    }
  });
}

// lora_dx_da_grouped: lora_dx_da's column blocks, each row of x read once for all P projections: per row and block,
// projection i's dx_da_row_segment (its own mask cursor and dA accumulators) adds D_i (.) (du_i A_i) into the row's
// fp32 t in projection order (the first one stores), then t is rounded once. Each dA_i sees the terms of its own
// lora_dx_da in the same order, so it is bitwise that call's dA.
template <typename xT, typename aT>
void lora_dx_da_grouped_impl(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                             at::IntArrayRef ranks, const std::vector<DropoutParams>& ds, at::Tensor& t,
                             at::Tensor& dA) {
  const int64_t M = x.size(0), K = x.size(1), P = static_cast<int64_t>(ranks.size());
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sd0 = du.stride(0), sd1 = du.stride(1);
  std::vector<std::vector<float>> a_kr;  // projection i's A_i as [K][r_i]
  std::vector<int64_t> offset(static_cast<size_t>(P) + 1, 0);
  for (int64_t i = 0; i < P; ++i) {
    a_kr.push_back(stage_fp32<aT>(lora_a.narrow(0, offset[i], ranks[i]), /*transpose=*/true));
    offset[i + 1] = offset[i] + ranks[i];
  }
  const int64_t n_blocks = (K + kDxDaBlock - 1) / kDxDaBlock;
  const xT* xp = x.data_ptr<xT>();
  const float* dp = du.data_ptr<float>();
  xT* tp = t.data_ptr<xT>();
  float* dAp = dA.data_ptr<float>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<std::vector<float>> dA_blk, durow;
    for (int64_t i = 0; i < P; ++i) {
      dA_blk.emplace_back(static_cast<size_t>(kDxDaBlock * ranks[i]));
      durow.emplace_back(static_cast<size_t>(ranks[i]));
    }
    std::vector<float> t_row(static_cast<size_t>(kDxDaBlock));
    std::vector<MaskCursor> masks(ds.begin(), ds.end());
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t k0 = blk * kDxDaBlock, k1 = std::min(K, k0 + kDxDaBlock);
      for (auto& acc : dA_blk) std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t m = 0; m < M; ++m) {
        std::fill(t_row.begin(), t_row.end(), 0.0f);  // stays 0 when every rank is 0
        bool first = true;
        for (int64_t i = 0; i < P; ++i) {
          if (ranks[i] == 0) continue;
          load_du_row(dp, sd0, sd1, m, offset[i], ranks[i], durow[i].data());
          dx_da_row_segment<xT>(xp + m * sx0, sx1, m, K, k0, k1, a_kr[i].data(), durow[i].data(), ranks[i], ds[i],
                                masks[i], t_row.data(), !first, dA_blk[i].data());
          first = false;
        }
        for (int64_t k = k0; k < k1; ++k) tp[m * K + k] = static_cast<xT>(t_row[k - k0]);
      }
      for (int64_t i = 0; i < P; ++i) store_da_block(dA_blk[i].data(), k0, k1, ranks[i], offset[i], K, dAp);
    }
  });
}

}  // namespace

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p) {
  const LoraDims dims = check_lora_down_args(x, lora_a, seed, p, c10::DeviceType::CPU);
  at::Tensor u = at::zeros({dims.M, dims.r}, x.options().dtype(at::kFloat));
  if (u.numel() == 0 || dims.K == 0) return u;
  const DropoutParams d = make_dropout_params(seed, p);
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_down", [&](auto xv, auto av) {
    lora_down_impl<decltype(xv), decltype(av)>(x, lora_a, d, u);
  });
  return u;
}

at::Tensor lora_down_grouped(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks,
                             at::IntArrayRef seeds, at::ArrayRef<double> p) {
  const LoraDims dims = check_lora_down_grouped_args(x, lora_a, ranks, seeds, p, c10::DeviceType::CPU);
  at::Tensor u = at::zeros({dims.M, dims.r}, x.options().dtype(at::kFloat));
  if (u.numel() == 0 || dims.K == 0) return u;
  std::vector<DropoutParams> ds;
  for (size_t i = 0; i < ranks.size(); ++i) ds.push_back(make_dropout_params(seeds[i], p[i]));
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_down_grouped", [&](auto xv, auto av) {
    lora_down_grouped_impl<decltype(xv), decltype(av)>(x, lora_a, ranks, ds, u);
  });
  return u;
}

at::Tensor lora_up(const at::Tensor& u, const at::Tensor& lora_b,
                   const std::optional<at::Tensor>& bias, double scale, c10::ScalarType dtype) {
  const LoraDims dims = check_lora_up_args(u, lora_b, bias, dtype, c10::DeviceType::CPU);
  at::Tensor out = at::empty({dims.M, dims.N}, u.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  dispatch_act_adapter(dtype, lora_b.scalar_type(), "lora_up", [&](auto ov, auto bv) {
    lora_up_impl<decltype(ov), decltype(bv)>(u, lora_b, bias_t, static_cast<float>(scale), out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_grad_pass(const at::Tensor& grad_y,
                                                              const at::Tensor& u,
                                                              const at::Tensor& lora_b,
                                                              double scale, bool need_dbias) {
  const LoraDims dims = check_lora_grad_pass_args(grad_y, u, lora_b, c10::DeviceType::CPU);
  const auto f32 = grad_y.options().dtype(at::kFloat);
  at::Tensor du = at::zeros({dims.M, dims.r}, f32);
  at::Tensor dB = at::zeros({dims.N, dims.r}, f32);
  at::Tensor dbias = need_dbias ? at::zeros({dims.N}, f32) : at::empty({0}, f32);
  if (dims.M == 0 || dims.N == 0) return {du, dB, dbias};
  dispatch_act_adapter(grad_y.scalar_type(), lora_b.scalar_type(), "lora_grad_pass",
                       [&](auto gv, auto bv) {
                         lora_grad_pass_impl<decltype(gv), decltype(bv)>(
                             grad_y, u, lora_b, static_cast<float>(scale), need_dbias, du, dB,
                             dbias);
                       });
  return {du, dB, dbias};
}

std::tuple<at::Tensor, at::Tensor> lora_dx_da(const at::Tensor& x, const at::Tensor& du,
                                              const at::Tensor& lora_a, int64_t seed, double p,
                                              bool need_dx) {
  const LoraDims dims = check_lora_dx_da_args(x, du, lora_a, seed, p, c10::DeviceType::CPU);
  at::Tensor dx = need_dx ? at::empty({dims.M, dims.K}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = at::zeros({dims.r, dims.K}, x.options().dtype(at::kFloat));
  if (dims.M == 0 || dims.K == 0) return {dx, dA};
  const DropoutParams d = make_dropout_params(seed, p);
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da", [&](auto xv, auto av) {
    lora_dx_da_impl<decltype(xv), decltype(av)>(x, du, lora_a, d, need_dx, dx, dA);
  });
  return {dx, dA};
}

std::tuple<at::Tensor, at::Tensor> lora_dx_da_grouped(const at::Tensor& x, const at::Tensor& du,
                                                      const at::Tensor& lora_a, at::IntArrayRef ranks,
                                                      at::IntArrayRef seeds, at::ArrayRef<double> p) {
  const LoraDims dims = check_lora_dx_da_grouped_args(x, du, lora_a, ranks, seeds, p, c10::DeviceType::CPU);
  at::Tensor t = at::empty({dims.M, dims.K}, x.options());  // every element written below
  if (dims.M == 0 || dims.K == 0) return {t, at::zeros({dims.r, dims.K}, x.options().dtype(at::kFloat))};
  at::Tensor dA = at::empty({dims.r, dims.K}, x.options().dtype(at::kFloat));  // every element written below
  std::vector<DropoutParams> ds;
  for (size_t i = 0; i < ranks.size(); ++i) ds.push_back(make_dropout_params(seeds[i], p[i]));
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da_grouped", [&](auto xv, auto av) {
    lora_dx_da_grouped_impl<decltype(xv), decltype(av)>(x, du, lora_a, ranks, ds, t, dA);
  });
  return {t, dA};
}

}  // namespace cpu
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, CPU, m) {
  m.impl("lora_down", &lowcost::cpu::lora_down);
  m.impl("lora_down_grouped", &lowcost::cpu::lora_down_grouped);
  m.impl("lora_up", &lowcost::cpu::lora_up);
  m.impl("lora_grad_pass", &lowcost::cpu::lora_grad_pass);
  m.impl("lora_dx_da", &lowcost::cpu::lora_dx_da);
  m.impl("lora_dx_da_grouped", &lowcost::cpu::lora_dx_da_grouped);
}
