// CUDA launchers of lora_up and lora_grad_pass (kernels in up_grad_kernels.cuh).
#include "ops_cuda.h"
#include "up_grad_kernels.cuh"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace lowcost {
namespace cuda {

at::Tensor lora_up(const at::Tensor& u, const at::Tensor& lora_b,
                   const std::optional<at::Tensor>& bias, double scale, c10::ScalarType dtype) {
  const LoraDims dims = check_lora_up_args(u, lora_b, bias, dtype, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty({dims.M, dims.N}, u.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const bool has_bias = bias.has_value() && bias->defined();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const LaunchGrid grid = lora_up_grid(dims.M, dims.N);
  check_grid(grid, "lora_up");
  dispatch_act_adapter(dtype, lora_b.scalar_type(), "lora_up", [&](auto ov, auto bv) {
    using oT = decltype(ov);
    using bT = decltype(bv);
    oT* op = out.data_ptr<oT>();
    const bool out_vec = dims.N % 4 == 0 && is_aligned4(op);
    lora_up_kernel<oT, bT><<<to_dim3(grid), kThreads, 0, stream>>>(
        u.data_ptr<float>(), dims.M, dims.r, u.stride(0), u.stride(1), lora_b.data_ptr<bT>(),
        dims.N, lora_b.stride(0), lora_b.stride(1), has_bias ? bias->data_ptr<oT>() : nullptr,
        has_bias ? bias->stride(0) : 0, static_cast<float>(scale), out_vec, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_grad_pass(const at::Tensor& grad_y,
                                                              const at::Tensor& u,
                                                              const at::Tensor& lora_b,
                                                              double scale, bool need_dbias) {
  const LoraDims dims = check_lora_grad_pass_args(grad_y, u, lora_b, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto f32 = grad_y.options().dtype(at::kFloat);
  at::Tensor dB = at::zeros({dims.N, dims.r}, f32);  // the kernel accumulates into it atomically
  at::Tensor dbias = need_dbias ? at::zeros({dims.N}, f32) : at::empty({0}, f32);
  if (dims.M == 0 || dims.N == 0 || (dims.r == 0 && !need_dbias)) {
    return {at::zeros({dims.M, dims.r}, f32), dB, dbias};
  }
  at::Tensor du = at::empty({dims.M, dims.r}, f32);  // every element is written by the kernel
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_act_adapter(grad_y.scalar_type(), lora_b.scalar_type(), "lora_grad_pass",
                       [&](auto gv, auto bv) {
    using gT = decltype(gv);
    using bT = decltype(bv);
    const gT* gp = grad_y.data_ptr<gT>();
    const bool g_vec = rows_vectorizable(gp, grad_y.stride(0), grad_y.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      const LaunchGrid grid = lora_grad_pass_grid(dims.M, dims.r, RT);
      check_grid(grid, "lora_grad_pass");
      lora_grad_pass_kernel<gT, bT, RT><<<to_dim3(grid), kThreads, 0, stream>>>(
          gp, dims.M, dims.N, grad_y.stride(0), grad_y.stride(1), g_vec, u.data_ptr<float>(),
          dims.r, u.stride(0), u.stride(1), lora_b.data_ptr<bT>(), lora_b.stride(0),
          lora_b.stride(1), static_cast<float>(scale), du.data_ptr<float>(),
          dB.data_ptr<float>(), need_dbias ? dbias.data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {du, dB, dbias};
}

}  // namespace cuda
}  // namespace lowcost
