// CUDA entry point of dequant_gemm (host side in dequant_launchers.h, kernel in dequant_gemm_kernels.cuh;
// the dgrad is dequant_gemm_dgrad.cu, a separate file so the two compile in parallel).
#include "gpu_exec.cuh"
#include "dequant_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor dequant_gemm(const at::Tensor& x, at::TensorList packed, c10::string_view scheme, int64_t n_rows,
                        int64_t block_size, const std::optional<at::Tensor>& c) {
  GpuExec exec;
  return run_dequant_gemm<false>(x, packed, scheme, n_rows, block_size, c, exec);
}

}  // namespace cuda
}  // namespace lowcost
