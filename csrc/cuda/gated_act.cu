// CUDA entry points of gated_act_mul and gated_act_mul_backward (host side in host_launchers.h, kernels in
// gated_act_kernels.cuh).
#include "gpu_exec.cuh"
#include "host_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor gated_act_mul(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  GpuExec exec;
  return run_gated_act_mul(gate, up, activation, exec);
}

std::tuple<at::Tensor, at::Tensor> gated_act_mul_backward(const at::Tensor& dh, const at::Tensor& gate,
                                                          const at::Tensor& up, c10::string_view activation) {
  GpuExec exec;
  return run_gated_act_mul_backward(dh, gate, up, activation, exec);
}

}  // namespace cuda
}  // namespace lowcost
