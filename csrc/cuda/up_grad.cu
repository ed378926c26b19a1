// CUDA entry points of lora_up and lora_grad_pass (host side in host_launchers.h, kernels in
// up_grad_kernels.cuh).
#include "gpu_exec.cuh"
#include "host_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor lora_up(const at::Tensor& u, const at::Tensor& lora_b, const std::optional<at::Tensor>& bias,
                   double scale, c10::ScalarType dtype) {
  GpuExec exec;
  return run_lora_up(u, lora_b, bias, scale, dtype, exec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_grad_pass(const at::Tensor& grad_y, const at::Tensor& u,
                                                              const at::Tensor& lora_b, double scale,
                                                              bool need_dbias) {
  GpuExec exec;
  return run_lora_grad_pass(grad_y, u, lora_b, scale, need_dbias, exec);
}

}  // namespace cuda
}  // namespace lowcost
