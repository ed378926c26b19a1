// CUDA entry point of dequant_gemm_dgrad (host side in dequant_launchers.h, kernel in
// dequant_gemm_kernels.cuh).
#include "gpu_exec.cuh"
#include "dequant_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor dequant_gemm_dgrad(const at::Tensor& grad_y, at::TensorList packed, c10::string_view scheme,
                              int64_t n_cols, int64_t block_size, const std::optional<at::Tensor>& c) {
  GpuExec exec;
  return run_dequant_gemm<true>(grad_y, packed, scheme, n_cols, block_size, c, exec);
}

}  // namespace cuda
}  // namespace lowcost
