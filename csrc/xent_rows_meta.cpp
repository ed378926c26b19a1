// Meta kernel of softmax_xent_rows: the CPU and CUDA kernels' argument checks, the (C,) float32 loss without
// data, and z untouched (its in-place dz has z's shape and dtype), so FakeTensor (torch.compile, opcheck) can
// trace calls.
#include "checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace lowcost {
namespace meta {

at::Tensor softmax_xent_rows(at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& row_weight,
                             int64_t ignore_index, double label_smoothing, double softcap) {
  check_softmax_xent_rows_args(z, labels, row_weight, ignore_index, label_smoothing, softcap, c10::DeviceType::Meta);
  return at::empty({z.size(0)}, z.options().dtype(at::kFloat));
}

}  // namespace meta
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, Meta, m) {
  m.impl("softmax_xent_rows", &lowcost::meta::softmax_xent_rows);
}
