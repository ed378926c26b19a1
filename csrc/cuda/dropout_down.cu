// CUDA entry points of philox_dropout, lora_down and lora_down_grouped (host side in host_launchers.h, kernels in
// dropout_down_kernels.cuh).
#include "gpu_exec.cuh"
#include "host_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, double p) {
  GpuExec exec;
  return run_philox_dropout(x, seed, p, exec);
}

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p) {
  GpuExec exec;
  return run_lora_down(x, lora_a, seed, p, exec);
}

at::Tensor lora_down_grouped(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks,
                             at::IntArrayRef seeds, at::ArrayRef<double> p) {
  GpuExec exec;
  return run_lora_down_grouped(x, lora_a, ranks, seeds, p, exec);
}

}  // namespace cuda
}  // namespace lowcost
