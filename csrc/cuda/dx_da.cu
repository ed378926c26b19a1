// CUDA entry points of lora_dx_da and lora_dx_da_grouped (host side in host_launchers.h, kernel in dx_da_kernels.cuh).
#include "gpu_exec.cuh"
#include "host_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> lora_dx_da(const at::Tensor& x, const at::Tensor& du,
                                              const at::Tensor& lora_a, int64_t seed, double p,
                                              bool need_dx) {
  GpuExec exec;
  return run_lora_dx_da(x, du, lora_a, seed, p, need_dx, exec);
}

std::tuple<at::Tensor, at::Tensor> lora_dx_da_grouped(const at::Tensor& x, const at::Tensor& du,
                                                      const at::Tensor& lora_a, at::IntArrayRef ranks,
                                                      at::IntArrayRef seeds, at::ArrayRef<double> p) {
  GpuExec exec;
  return run_lora_dx_da_grouped(x, du, lora_a, ranks, seeds, p, exec);
}

}  // namespace cuda
}  // namespace lowcost
