// The host side of each CUDA op, written once: argument checks, output allocation, early exits, dtype
// and rank-tile dispatch, launch grids. `Exec` supplies only what differs between the real GPU
// (csrc/cuda/gpu_exec.cuh, used by the .cu files) and the host emulator
// (csrc/tests/test_cuda_emulated.cpp), so the emulator test exercises this code as the GPU runs it:
//
//   static constexpr c10::DeviceType kDevice;              // the device the argument checks expect
//   auto guard(const c10::Device&);                         // held for the op (CUDAGuard on the GPU)
//   at::Tensor empty(at::IntArrayRef, const at::TensorOptions&);  // uninitialised output
//   int64_t sms();                                          // streaming multiprocessors to fill
//   void launch(const LaunchGrid&, const char* op, kernel, args...);  // run kernel(args...) on grid
//
// Include after the kernels' headers have been made compilable for the target (nvcc, or the
// emulator's macros).
#pragma once

#include "dropout_down_kernels.cuh"
#include "dx_da_kernels.cuh"
#include "up_grad_kernels.cuh"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace lowcost {
namespace cuda {

template <typename Exec>
at::Tensor run_philox_dropout(const at::Tensor& x, int64_t seed, double p, Exec& exec) {
  const LoraDims dims = check_philox_dropout_args(x, seed, p, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(x.device());
  at::Tensor out = exec.empty({dims.M, dims.K}, x.options());
  if (out.numel() == 0) return out;
  const DropoutParams d = make_dropout_params(seed, p);
  if (!d.enabled) return out.copy_(x);
  const LaunchGrid grid{philox_dropout_blocks(out.numel(), exec.sms()), 1};
  dispatch_act(x.scalar_type(), "philox_dropout", [&](auto xv) {
    using xT = decltype(xv);
    const xT* xp = x.data_ptr<xT>();
    const bool flat_vec = rows_are_flat_vectorizable(xp, dims.M, dims.K, x.stride(0), x.stride(1));
    exec.launch(grid, "philox_dropout", philox_dropout_kernel<xT>, xp, dims.M, dims.K, x.stride(0),
                x.stride(1), flat_vec, d, out.data_ptr<xT>());
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
    const xT* xp = x.data_ptr<xT>();
    const bool x_vec = rows_vectorizable(xp, x.stride(0), x.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(lora_down_grid(dims.M, dims.r, RT), "lora_down", lora_down_kernel<xT, aT, RT>, xp, dims.M,
                  dims.K, x.stride(0), x.stride(1), x_vec, lora_a.data_ptr<aT>(), dims.r, lora_a.stride(0),
                  lora_a.stride(1), d, u.data_ptr<float>());
    });
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
  const LaunchGrid grid = lora_up_grid(dims.M, dims.N);
  dispatch_act_adapter(dtype, lora_b.scalar_type(), "lora_up", [&](auto ov, auto bv) {
    using oT = decltype(ov);
    using bT = decltype(bv);
    oT* op = out.data_ptr<oT>();
    const bool out_vec = dims.N % 4 == 0 && is_aligned4(op);
    exec.launch(grid, "lora_up", lora_up_kernel<oT, bT>, u.data_ptr<float>(), dims.M, dims.r, u.stride(0),
                u.stride(1), lora_b.data_ptr<bT>(), dims.N, lora_b.stride(0), lora_b.stride(1),
                has_bias ? bias->data_ptr<oT>() : static_cast<const oT*>(nullptr),
                has_bias ? bias->stride(0) : int64_t{0}, static_cast<float>(scale), out_vec, op);
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
  at::Tensor dB = at::zeros({dims.N, dims.r}, f32);  // the kernel accumulates into it atomically
  at::Tensor dbias = need_dbias ? at::zeros({dims.N}, f32) : at::empty({0}, f32);
  if (dims.M == 0 || dims.N == 0 || (dims.r == 0 && !need_dbias)) {
    return {at::zeros({dims.M, dims.r}, f32), dB, dbias};
  }
  at::Tensor du = exec.empty({dims.M, dims.r}, f32);  // every element is written by the kernel
  dispatch_act_adapter(grad_y.scalar_type(), lora_b.scalar_type(), "lora_grad_pass", [&](auto gv, auto bv) {
    using gT = decltype(gv);
    using bT = decltype(bv);
    const gT* gp = grad_y.data_ptr<gT>();
    const bool g_vec = rows_vectorizable(gp, grad_y.stride(0), grad_y.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(lora_grad_pass_grid(dims.M, dims.r, RT), "lora_grad_pass", lora_grad_pass_kernel<gT, bT, RT>,
                  gp, dims.M, dims.N, grad_y.stride(0), grad_y.stride(1), g_vec, u.data_ptr<float>(), dims.r,
                  u.stride(0), u.stride(1), lora_b.data_ptr<bT>(), lora_b.stride(0), lora_b.stride(1),
                  static_cast<float>(scale), du.data_ptr<float>(), dB.data_ptr<float>(),
                  need_dbias ? dbias.data_ptr<float>() : static_cast<float*>(nullptr));
    });
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
  at::Tensor dA = at::zeros({dims.r, dims.K}, x.options().dtype(at::kFloat));  // atomics add into it
  if (dims.M == 0 || dims.K == 0) return {dx, dA};
  if (dims.r == 0) {
    if (need_dx) dx.zero_();
    return {dx, dA};
  }
  const DropoutParams d = make_dropout_params(seed, p);
  const LaunchGrid grid = lora_dx_da_grid(dims.M, dims.K, exec.sms());
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const xT* xp = x.data_ptr<xT>();
    const bool x_vec = rows_vectorizable(xp, x.stride(0), x.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      exec.launch(grid, "lora_dx_da", lora_dx_da_kernel<xT, aT, RT>, xp, dims.M, dims.K, x.stride(0),
                  x.stride(1), x_vec, du.data_ptr<float>(), dims.r, du.stride(0), du.stride(1),
                  lora_a.data_ptr<aT>(), lora_a.stride(0), lora_a.stride(1), d,
                  need_dx ? dx.data_ptr<xT>() : static_cast<xT*>(nullptr), dA.data_ptr<float>());
    });
  });
  return {dx, dA};
}

}  // namespace cuda
}  // namespace lowcost
