// CUDA launcher of lora_dx_da (kernel in dx_da_kernels.cuh).
#include "dx_da_kernels.cuh"
#include "ops_cuda.h"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace lowcost {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> lora_dx_da(const at::Tensor& x, const at::Tensor& du,
                                              const at::Tensor& lora_a, int64_t seed, double p,
                                              bool need_dx) {
  const LoraDims dims = check_lora_dx_da_args(x, du, lora_a, seed, p, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = need_dx ? at::empty({dims.M, dims.K}, x.options()) : at::empty({0}, x.options());
  at::Tensor dA = at::zeros({dims.r, dims.K}, x.options().dtype(at::kFloat));  // atomics add into it
  if (dims.M == 0 || dims.K == 0) return {dx, dA};
  if (dims.r == 0) {
    if (need_dx) dx.zero_();
    return {dx, dA};
  }
  const DropoutParams d = make_dropout_params(seed, p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const LaunchGrid grid = lora_dx_da_grid(dims.M, dims.K, sms);
  check_grid(grid, "lora_dx_da");
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_dx_da", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const xT* xp = x.data_ptr<xT>();
    const bool x_vec = rows_vectorizable(xp, x.stride(0), x.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      lora_dx_da_kernel<xT, aT, RT><<<to_dim3(grid), kThreads, 0, stream>>>(
          xp, dims.M, dims.K, x.stride(0), x.stride(1), x_vec, du.data_ptr<float>(), dims.r,
          du.stride(0), du.stride(1), lora_a.data_ptr<aT>(), lora_a.stride(0), lora_a.stride(1),
          d, need_dx ? dx.data_ptr<xT>() : nullptr, dA.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dA};
}

}  // namespace cuda
}  // namespace lowcost
