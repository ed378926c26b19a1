// CUDA launchers of philox_dropout and lora_down (kernels in dropout_down_kernels.cuh).
#include "dropout_down_kernels.cuh"
#include "ops_cuda.h"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace lowcost {
namespace cuda {

at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, double p) {
  const LoraDims dims = check_philox_dropout_args(x, seed, p, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({dims.M, dims.K}, x.options());
  if (out.numel() == 0) return out;
  const DropoutParams d = make_dropout_params(seed, p);
  if (!d.enabled) return out.copy_(x);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = philox_dropout_blocks(out.numel(), sms);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_act(x.scalar_type(), "philox_dropout", [&](auto xv) {
    using xT = decltype(xv);
    const xT* xp = x.data_ptr<xT>();
    const bool flat_vec = rows_are_flat_vectorizable(xp, dims.M, dims.K, x.stride(0), x.stride(1));
    philox_dropout_kernel<xT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xp, dims.M, dims.K, x.stride(0), x.stride(1), flat_vec, d, out.data_ptr<xT>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p) {
  const LoraDims dims = check_lora_down_args(x, lora_a, seed, p, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor u = at::empty({dims.M, dims.r}, x.options().dtype(at::kFloat));
  if (u.numel() == 0) return u;
  if (dims.K == 0) return u.zero_();
  const DropoutParams d = make_dropout_params(seed, p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_act_adapter(x.scalar_type(), lora_a.scalar_type(), "lora_down", [&](auto xv, auto av) {
    using xT = decltype(xv);
    using aT = decltype(av);
    const xT* xp = x.data_ptr<xT>();
    const bool x_vec = rows_vectorizable(xp, x.stride(0), x.stride(1));
    dispatch_rank_tile(dims.r, [&](auto tile) {
      constexpr int RT = decltype(tile)::value;
      const LaunchGrid grid = lora_down_grid(dims.M, dims.r, RT);
      check_grid(grid, "lora_down");
      lora_down_kernel<xT, aT, RT><<<to_dim3(grid), kThreads, 0, stream>>>(
          xp, dims.M, dims.K, x.stride(0), x.stride(1), x_vec, lora_a.data_ptr<aT>(), dims.r,
          lora_a.stride(0), lora_a.stride(1), d, u.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return u;
}

}  // namespace cuda
}  // namespace lowcost
