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

  template <typename Kernel, typename... Args>
  void launch(const LaunchGrid& grid, const char* op, Kernel kernel, Args... args) const {
    check_grid(grid, op);
    kernel<<<to_dim3(grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace lowcost
