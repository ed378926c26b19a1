// CUDA entry point of softmax_xent_rows (host side in host_launchers.h, kernel in xent_rows_kernels.cuh).
#include "gpu_exec.cuh"
#include "host_launchers.h"
#include "ops_cuda.h"

namespace lowcost {
namespace cuda {

at::Tensor softmax_xent_rows(at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& row_weight,
                             int64_t ignore_index, double label_smoothing, double softcap) {
  GpuExec exec;
  return run_softmax_xent_rows(z, labels, row_weight, ignore_index, label_smoothing, softcap, exec);
}

}  // namespace cuda
}  // namespace lowcost
