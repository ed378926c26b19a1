// The GPU side of csrc/cuda/host_launchers.h: device guard, uninitialised outputs, SM count, and a
// launch on the current stream of the guarded device with the launch error checked.
#pragma once

#include "common.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace lowcost {
namespace cuda {

struct GpuExec {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

  c10::cuda::CUDAGuard guard(const c10::Device& device) const { return c10::cuda::CUDAGuard(device); }

  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) const {
    return at::empty(shape, options);
  }

  int64_t sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  // Launches kernel<<<grid, kThreads, smem>>>(args...) on the current stream. The kernels use
  // cp.async and bf16 mma.sync (compute capability 8.0+); dynamic shared memory above the default
  // 48 KiB is opted into per kernel.
  template <typename Kernel, typename... Args>
  void launch(const LaunchGrid& grid, int64_t smem, const char* op, Kernel kernel, Args... args) const {
    check_grid(grid, op);
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(prop->major >= 8, "lowcost::", op, ": the CUDA kernels need compute capability 8.0 or newer ",
                "(cp.async, bf16 mma.sync); this GPU is ", prop->major, ".", prop->minor,
                "; use backend='triton' or 'torch'");
    TORCH_CHECK(smem <= static_cast<int64_t>(prop->sharedMemPerBlockOptin), "lowcost::", op, ": needs ", smem,
                " bytes of shared memory per block; this GPU allows ", prop->sharedMemPerBlockOptin);
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<to_dim3(grid), kThreads, static_cast<size_t>(smem), at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace lowcost
