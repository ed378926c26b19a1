// Meta kernels of gated_act_mul and gated_act_mul_backward: the same argument checks as the CPU and CUDA
// kernels, outputs of the right shape and dtype and no data, so FakeTensor (torch.compile, opcheck) can
// trace calls to them.
#include "checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace lowcost {
namespace meta {

at::Tensor gated_act_mul(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  const GatedActDims dims = check_gated_act_mul_args(gate, up, activation, c10::DeviceType::Meta);
  return at::empty({dims.M, dims.I}, gate.options());
}

std::tuple<at::Tensor, at::Tensor> gated_act_mul_backward(const at::Tensor& dh, const at::Tensor& gate,
                                                          const at::Tensor& up, c10::string_view activation) {
  const GatedActDims dims = check_gated_act_mul_backward_args(dh, gate, up, activation, c10::DeviceType::Meta);
  return {at::empty({dims.M, dims.I}, gate.options()), at::empty({dims.M, dims.I}, gate.options())};
}

}  // namespace meta
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, Meta, m) {
  m.impl("gated_act_mul", &lowcost::meta::gated_act_mul);
  m.impl("gated_act_mul_backward", &lowcost::meta::gated_act_mul_backward);
}
