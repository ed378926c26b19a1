// The host side of each CUDA op, written once: argument checks, output and workspace allocation,
// early exits, dtype and rank-tile dispatch, launch plans (launch_plan.h) and the fixed-order
// reductions. `Exec` supplies only what differs between the real GPU (csrc/cuda/gpu_exec.cuh, used by
// the .cu files) and the host emulator (csrc/tests/test_cuda_emulated.cpp), so the emulator test
// exercises this code as the GPU runs it:
//
//   static constexpr c10::DeviceType kDevice;              // the device the argument checks expect
//   auto guard(const c10::Device&);                         // held for the op (CUDAGuard on the GPU)
//   at::Tensor empty(at::IntArrayRef, const at::TensorOptions&);  // uninitialised output
//   int64_t sms();                                          // streaming multiprocessors to fill
//   void launch(const LaunchGrid&, int64_t smem, const char* op, kernel, args...);  // run it
//
// No kernel uses atomics: reductions split across blocks go through fp32 workspaces and
// sum_partials, so every output is bitwise reproducible for a given shape and device.
//
// Include after the kernels' headers have been made compilable for the target (nvcc, or the
// emulator's macros).
#pragma once

#include "dropout_down_kernels.cuh"
#include "dx_da_kernels.cuh"
#include "gated_act_kernels.cuh"
#include "reduce_kernels.cuh"
#include "up_grad_kernels.cuh"
#include "xent_rows_kernels.cuh"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace lowcost {
namespace cuda {

// Adds the partials of each job with count > 1 (a job with count 1 wrote its output directly).
template <typename Exec>
void sum_partials(Exec& exec, std::initializer_list<ReduceJob> jobs) {
  ReduceJobs table{};
  int used = 0;
  int64_t blocks = 0;
  for (const ReduceJob& job : jobs) {
    if (!reduce_job_active(job.n, job.count)) continue;
    table.job[used] = job;
    table.first_block[used] = blocks;
    blocks += reduce_blocks(job.n);
    ++used;
  }
  if (used == 0) return;
  for (int i = used; i <= kReduceJobs; ++i) table.first_block[i] = blocks;
  exec.launch(LaunchGrid{blocks, 1, 1}, kReduceSmem, "sum_partials", sum_partials_kernel<kReduceJobs>,
              table);
}

// The (count, shape...) workspace of a split reduction, or the output itself when count is 1.
template <typename Exec>
at::Tensor partials_or_output(Exec& exec, const at::Tensor& output, int64_t count, bool zeroed) {
  if (count == 1) return zeroed ? output.zero_() : output;
  std::vector<int64_t> shape{count};
  for (int64_t s : output.sizes()) shape.push_back(s);
  return zeroed ? at::zeros(shape, output.options()) : exec.empty(shape, output.options());
}

template <typename Exec>
at::Tensor run_philox_dropout(const at::Tensor& x, int64_t seed, double p, Exec& exec) {
  const LoraDims dims = check_philox_dropout_args(x, seed, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor out = exec.empty({dims.M, dims.K}, x.options());
  if (out.numel() == 0) return out;
  const DropoutParams d = make_dropout_params(seed, p);
  if (!d.enabled) return out.copy_(x);
  const LaunchGrid grid{philox_dropout_blocks(out.numel(), exec.sms()), 1, 1};
  dispatch_act(x.scalar_type(), "philox_dropout", [&](auto xv) {
    using xT = decltype(xv);
    const xT* xp = x.data_ptr<xT>();
    const bool flat_vec = rows_are_flat_vectorizable(xp, dims.M, dims.K, x.stride(0), x.stride(1));
    exec.launch(grid, 0, "philox_dropout", philox_dropout_kernel<xT>, xp, dims.M, dims.K, x.stride(0), x.stride(1),
                flat_vec, d, out.data_ptr<xT>());
  });
  return out;
}

template <typename Exec>
at::Tensor run_lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p, Exec& exec) {
  const LoraDims dims = check_lora_down_args(x, lora_a, seed, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor u = exec.empty({dims.M, dims.r}, x.options().dtype(at::kFloat));
  if (u.numel() == 0) return u;
  if (dims.K == 0) return u.zero_();
  const DropoutParams d = make_dropout_params(seed, p);
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_down", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const DownPlan plan = plan_lora_down(dims.M, dims.K, dims.r, exec.sms(), sizeof(xT), sizeof(aT));
    const at::Tensor parts = partials_or_output(exec, u, plan.splits, false);
    const xT* xp = x.data_ptr<xT>();
    const aT* ap = lora_a.data_ptr<aT>();
    dispatch_rank_tile(plan.rt, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(plan.grid, plan.smem, "lora_down", lora_down_kernel<xT, aT, RT>, xp, dims.M, dims.K, x.stride(0),
                  x.stride(1), rows_vec16(xp, dims.M, x.stride(0), x.stride(1)), ap, dims.r, lora_a.stride(0),
                  lora_a.stride(1), rows_vec16(ap, dims.r, lora_a.stride(0), lora_a.stride(1)), d,
                  parts.data_ptr<float>());
    });
    sum_partials(exec, {{parts.data_ptr<float>(), u.data_ptr<float>(), dims.M * dims.r, plan.splits}});
  });
  return u;
}

template <typename Exec>
at::Tensor run_lora_down_grouped(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks,
                                 at::IntArrayRef seeds, at::ArrayRef<double> p, Exec& exec) {
  const LoraDims dims = check_lora_down_grouped_args(x, lora_a, ranks, seeds, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor u = exec.empty({dims.M, dims.r}, x.options().dtype(at::kFloat));
  if (u.numel() == 0) return u;
  if (dims.K == 0) return u.zero_();
  DownGroup group;
  group.count = static_cast<int>(ranks.size());
  for (int i = 0; i < group.count; ++i) {
    group.rank[i] = ranks[i];
    group.row0[i] = i == 0 ? 0 : group.row0[i - 1] + ranks[i - 1];
    group.frag0[i + 1] = group.frag0[i] + down_fragments(ranks[i]);
    group.d[i] = make_dropout_params(seeds[i], p[i]);
  }
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_down_grouped", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const DownPlan plan =
        plan_lora_down_grouped(dims.M, dims.K, group.frag0[group.count], exec.sms(), sizeof(xT), sizeof(aT));
    const at::Tensor parts = partials_or_output(exec, u, plan.splits, false);
    const xT* xp = x.data_ptr<xT>();
    const aT* ap = lora_a.data_ptr<aT>();
    dispatch_rank_tile(plan.rt, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(plan.grid, plan.smem, "lora_down_grouped", lora_down_grouped_kernel<xT, aT, RT>, xp, dims.M, dims.K,
                  x.stride(0), x.stride(1), rows_vec16(xp, dims.M, x.stride(0), x.stride(1)), ap, lora_a.stride(0),
                  lora_a.stride(1), rows_vec16(ap, dims.r, lora_a.stride(0), lora_a.stride(1)), group, dims.r,
                  parts.data_ptr<float>());
    });
    sum_partials(exec, {{parts.data_ptr<float>(), u.data_ptr<float>(), dims.M * dims.r, plan.splits}});
  });
  return u;
}

template <typename Exec>
at::Tensor run_lora_up(const at::Tensor& u, const at::Tensor& lora_b, const std::optional<at::Tensor>& bias,
                       double scale, c10::ScalarType dtype, Exec& exec) {
  const LoraDims dims = check_lora_up_args(u, lora_b, bias, dtype, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(u.device());
  at::Tensor out = exec.empty({dims.M, dims.N}, u.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const bool has_bias = bias.has_value() && bias->defined();
  dispatch_act_adapter(dtype, lora_b.scalar_type(), "lora_up", [&](auto ov, auto bv) {
    using oT = decltype(ov);
    using bT = decltype(bv);
    const UpPlan plan = plan_lora_up(dims.M, dims.N, sizeof(bT));
    oT* op = out.data_ptr<oT>();
    const float* up = u.data_ptr<float>();
    const bT* bp = lora_b.data_ptr<bT>();
    exec.launch(plan.grid, plan.smem, "lora_up", lora_up_kernel<oT, bT>, up, dims.M, dims.r, u.stride(0), u.stride(1),
                rows_vec16(up, dims.M, u.stride(0), u.stride(1)), bp, dims.N, lora_b.stride(0), lora_b.stride(1),
                rows_vec16(bp, dims.N, lora_b.stride(0), lora_b.stride(1)),
                has_bias ? bias->data_ptr<oT>() : static_cast<const oT*>(nullptr),
                has_bias ? bias->stride(0) : int64_t{0}, static_cast<float>(scale), rows_vec16(op, dims.M, dims.N, 1),
                op);
  });
  return out;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_lora_grad_pass(const at::Tensor& grad_y, const at::Tensor& u,
                                                                  const at::Tensor& lora_b, double scale,
                                                                  bool need_dbias, Exec& exec) {
  const LoraDims dims = check_lora_grad_pass_args(grad_y, u, lora_b, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(grad_y.device());
  const auto f32 = grad_y.options().dtype(at::kFloat);
  if (dims.M == 0 || dims.N == 0 || (dims.r == 0 && !need_dbias)) {
    return {at::zeros({dims.M, dims.r}, f32), at::zeros({dims.N, dims.r}, f32),
            need_dbias ? at::zeros({dims.N}, f32) : at::empty({0}, f32)};
  }
  at::Tensor du = exec.empty({dims.M, dims.r}, f32);  // every element is written by the kernels
  at::Tensor dB = exec.empty({dims.N, dims.r}, f32);
  at::Tensor dbias = need_dbias ? exec.empty({dims.N}, f32) : at::empty({0}, f32);
  dispatch_act_adapter(grad_y.scalar_type(), lora_b.scalar_type(), "lora_grad_pass", [&](auto gv, auto bv) {
    using gT = decltype(gv);
    using bT = decltype(bv);
    const GradPassPlan plan = plan_lora_grad_pass(dims.M, dims.N, dims.r, exec.sms(), sizeof(gT), sizeof(bT));
    const at::Tensor du_parts = partials_or_output(exec, du, plan.col_segments, false);
    const at::Tensor db_parts = partials_or_output(exec, dB, plan.row_segments, false);
    const at::Tensor bias_parts = need_dbias ? partials_or_output(exec, dbias, plan.row_segments, false) : dbias;
    const gT* gp = grad_y.data_ptr<gT>();
    const float* up = u.data_ptr<float>();
    const bT* bp = lora_b.data_ptr<bT>();
    dispatch_rank_tile(plan.rt, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(plan.grid, plan.smem, "lora_grad_pass", lora_grad_pass_kernel<gT, bT, RT>, gp, dims.M, dims.N,
                  grad_y.stride(0), grad_y.stride(1), rows_vec16(gp, dims.M, grad_y.stride(0), grad_y.stride(1)),
                  up, dims.r, u.stride(0), u.stride(1), rows_vec16(up, dims.M, u.stride(0), u.stride(1)), bp,
                  lora_b.stride(0), lora_b.stride(1), rows_vec16(bp, dims.N, lora_b.stride(0), lora_b.stride(1)),
                  static_cast<float>(scale), du_parts.data_ptr<float>(), db_parts.data_ptr<float>(),
                  need_dbias ? bias_parts.data_ptr<float>() : static_cast<float*>(nullptr));
    });
    sum_partials(exec, {{du_parts.data_ptr<float>(), du.data_ptr<float>(), dims.M * dims.r, plan.col_segments},
                        {db_parts.data_ptr<float>(), dB.data_ptr<float>(), dims.N * dims.r, plan.row_segments},
                        {need_dbias ? bias_parts.data_ptr<float>() : nullptr,
                         need_dbias ? dbias.data_ptr<float>() : nullptr, need_dbias ? dims.N : 0,
                         plan.row_segments}});
  });
  return {du, dB, dbias};
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor> run_lora_dx_da(const at::Tensor& x, const at::Tensor& du,
                                                  const at::Tensor& lora_a, int64_t seed, double p, bool need_dx,
                                                  Exec& exec) {
  const LoraDims dims = check_lora_dx_da_args(x, du, lora_a, seed, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor dx = need_dx ? exec.empty({dims.M, dims.K}, x.options()) : at::empty({0}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  if (dims.M == 0 || dims.K == 0) return {dx, at::zeros({dims.r, dims.K}, f32)};
  if (dims.r == 0) {
    if (need_dx) dx.zero_();
    return {dx, at::empty({0, dims.K}, f32)};
  }
  at::Tensor dA = exec.empty({dims.r, dims.K}, f32);
  const DropoutParams d = make_dropout_params(seed, p);
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const DxDaPlan plan = plan_lora_dx_da(dims.M, dims.K, dims.r, exec.sms(), sizeof(xT), sizeof(aT));
    // Several rank chunks add into the block's partial rows, so those start at zero.
    const at::Tensor parts = partials_or_output(exec, dA, plan.row_segments, plan.chunks > 1);
    const xT* xp = x.data_ptr<xT>();
    const float* dup = du.data_ptr<float>();
    const aT* ap = lora_a.data_ptr<aT>();
    xT* dxp = need_dx ? dx.data_ptr<xT>() : static_cast<xT*>(nullptr);
    dispatch_rank_tile(plan.rt, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(plan.grid, plan.smem, "lora_dx_da", lora_dx_da_kernel<xT, aT, RT>, xp, dims.M, dims.K, x.stride(0),
                  x.stride(1), rows_vec16(xp, dims.M, x.stride(0), x.stride(1)), dup, dims.r, du.stride(0),
                  du.stride(1), rows_vec16(dup, dims.M, du.stride(0), du.stride(1)), ap, lora_a.stride(0),
                  lora_a.stride(1), rows_vec16(ap, dims.r, lora_a.stride(0), lora_a.stride(1)), d, dxp,
                  need_dx && rows_vec16(dxp, dims.M, dims.K, 1), parts.data_ptr<float>());
    });
    sum_partials(exec, {{parts.data_ptr<float>(), dA.data_ptr<float>(), dims.r * dims.K, plan.row_segments}});
  });
  return {dx, dA};
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor> run_lora_dx_da_grouped(const at::Tensor& x, const at::Tensor& du,
                                                          const at::Tensor& lora_a, at::IntArrayRef ranks,
                                                          at::IntArrayRef seeds, at::ArrayRef<double> p, Exec& exec) {
  const LoraDims dims = check_lora_dx_da_grouped_args(x, du, lora_a, ranks, seeds, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor t = exec.empty({dims.M, dims.K}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  if (dims.M == 0 || dims.K == 0) return {t, at::zeros({dims.r, dims.K}, f32)};
  if (dims.r == 0) return {t.zero_(), at::empty({0, dims.K}, f32)};
  at::Tensor dA = exec.empty({dims.r, dims.K}, f32);
  DxDaGroup group;
  group.count = static_cast<int>(ranks.size());
  int64_t max_rank = 0;
  for (int i = 0; i < group.count; ++i) {
    group.rank[i] = ranks[i];
    group.row0[i] = i == 0 ? 0 : group.row0[i - 1] + ranks[i - 1];
    group.acc0[i + 1] = group.acc0[i] + dx_da_fragments(ranks[i]);
    group.d[i] = make_dropout_params(seeds[i], p[i]);
    max_rank = std::max<int64_t>(max_rank, ranks[i]);
  }
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da_grouped", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const DxDaPlan plan = plan_lora_dx_da_grouped(dims.M, dims.K, max_rank, group.acc0[group.count], exec.sms(),
                                                  sizeof(xT), sizeof(aT));
    const at::Tensor parts = partials_or_output(exec, dA, plan.row_segments, false);
    const xT* xp = x.data_ptr<xT>();
    xT* tp = t.data_ptr<xT>();
    dispatch_rank_tile(plan.rt, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(plan.grid, plan.smem, "lora_dx_da_grouped", lora_dx_da_grouped_kernel<xT, aT, RT>, xp, dims.M,
                  dims.K, x.stride(0), x.stride(1), rows_vec16(xp, dims.M, x.stride(0), x.stride(1)),
                  du.data_ptr<float>(), du.stride(0), du.stride(1), lora_a.data_ptr<aT>(), lora_a.stride(0),
                  lora_a.stride(1), group, dims.r, tp, rows_vec16(tp, dims.M, dims.K, 1), parts.data_ptr<float>());
    });
    sum_partials(exec, {{parts.data_ptr<float>(), dA.data_ptr<float>(), dims.r * dims.K, plan.row_segments}});
  });
  return {t, dA};
}

template <typename Exec>
at::Tensor run_gated_act_mul(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation, Exec& exec) {
  const GatedActDims dims = check_gated_act_mul_args(gate, up, activation, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(gate.device());
  at::Tensor h = exec.empty({dims.M, dims.I}, gate.options());
  if (h.numel() == 0) return h;
  const LaunchGrid grid{gated_act_blocks(h.numel(), exec.sms()), 1, 1};
  dispatch_act(gate.scalar_type(), "gated_act_mul", [&](auto tv) {
    using T = decltype(tv);
    const T* gp = gate.data_ptr<T>();
    const T* up_p = up.data_ptr<T>();
    const bool flat_vec = rows_are_flat_vectorizable(gp, dims.M, dims.I, gate.stride(0), gate.stride(1)) &&
                          rows_are_flat_vectorizable(up_p, dims.M, dims.I, up.stride(0), up.stride(1));
    dispatch_gated_act(dims.act, [&](auto act) {
      exec.launch(grid, 0, "gated_act_mul", gated_act_mul_kernel<T, decltype(act)::value>, gp, gate.stride(0),
                  gate.stride(1), up_p, up.stride(0), up.stride(1), dims.M, dims.I, flat_vec, h.data_ptr<T>());
    });
  });
  return h;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor> run_gated_act_mul_backward(const at::Tensor& dh, const at::Tensor& gate,
                                                              const at::Tensor& up, c10::string_view activation,
                                                              Exec& exec) {
  const GatedActDims dims = check_gated_act_mul_backward_args(dh, gate, up, activation, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(gate.device());
  at::Tensor d_gate = exec.empty({dims.M, dims.I}, gate.options());
  at::Tensor d_up = exec.empty({dims.M, dims.I}, gate.options());
  if (d_gate.numel() == 0) return {d_gate, d_up};
  const LaunchGrid grid{gated_act_blocks(d_gate.numel(), exec.sms()), 1, 1};
  dispatch_act(gate.scalar_type(), "gated_act_mul_backward", [&](auto tv) {
    using T = decltype(tv);
    const T* dp = dh.data_ptr<T>();
    const T* gp = gate.data_ptr<T>();
    const T* up_p = up.data_ptr<T>();
    const bool flat_vec = rows_are_flat_vectorizable(dp, dims.M, dims.I, dh.stride(0), dh.stride(1)) &&
                          rows_are_flat_vectorizable(gp, dims.M, dims.I, gate.stride(0), gate.stride(1)) &&
                          rows_are_flat_vectorizable(up_p, dims.M, dims.I, up.stride(0), up.stride(1));
    dispatch_gated_act(dims.act, [&](auto act) {
      exec.launch(grid, 0, "gated_act_mul_backward", gated_act_mul_backward_kernel<T, decltype(act)::value>, dp,
                  dh.stride(0), dh.stride(1), gp, gate.stride(0), gate.stride(1), up_p, up.stride(0), up.stride(1),
                  dims.M, dims.I, flat_vec, d_gate.data_ptr<T>(), d_up.data_ptr<T>());
    });
  });
  return {d_gate, d_up};
}

// The row pass of the fused linear cross-entropy: loss (C,) float32, and z <- dz in place when row_weight is given.
// One launch when the rows fill the GPU (S = 1), else the partials and the finish launches over S slices of each
// row, with their fp32 workspace (launch_plan.h's plan_xent_rows; the same bits either way).
template <typename Exec>
at::Tensor run_softmax_xent_rows(at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& row_weight,
                                 int64_t ignore_index, double label_smoothing, double softcap, Exec& exec) {
  const XentSettings st = check_softmax_xent_rows_args(z, labels, row_weight, ignore_index, label_smoothing, softcap,
                                                       Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(z.device());
  const int64_t C = z.size(0);
  at::Tensor loss = exec.empty({C}, z.options().dtype(at::kFloat));
  if (C == 0) return loss;
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  const float* wp = weight.defined() ? weight.data_ptr<float>() : nullptr;
  const XentRowsPlan plan = plan_xent_rows(C, st.V, exec.sms());
  const at::Tensor workspace = plan.slices > 1 ? exec.empty({plan.workspace}, z.options().dtype(at::kFloat))
                                               : at::Tensor();
  dispatch_act(z.scalar_type(), "softmax_xent_rows", [&](auto tv) {
    using T = decltype(tv);
    T* zp = z.data_ptr<T>();
    const int64_t* lp = labels.data_ptr<int64_t>();
    if (plan.slices == 1) {
      exec.launch(plan.grid, plan.smem, "softmax_xent_rows",
                  weight.defined() ? xent_rows_kernel<T, true> : xent_rows_kernel<T, false>, zp, z.stride(0), lp,
                  labels.stride(0), wp, C, st, loss.data_ptr<float>());
      return;
    }
    float* ws = workspace.data_ptr<float>();
    exec.launch(plan.grid, plan.smem, "softmax_xent_rows", xent_partials_kernel<T>, static_cast<const T*>(zp),
                z.stride(0), lp, labels.stride(0), C, st, ws);
    const LaunchGrid finish{plan.grid.x, weight.defined() ? plan.slices : 1, 1};
    exec.launch(finish, 0, "softmax_xent_rows",
                weight.defined() ? xent_finish_kernel<T, true> : xent_finish_kernel<T, false>, zp, z.stride(0), lp,
                labels.stride(0), wp, C, st, static_cast<const float*>(ws), loss.data_ptr<float>());
  });
  return loss;
}

}  // namespace cuda
}  // namespace lowcost
