// CUDA implementations of the lowcost ops (schemas in csrc/ops.cpp, contract in
// docs/lora_linear_spec.md). Each runs on the current stream of the inputs' device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace lowcost {
namespace cuda {

at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, double p);

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p);

at::Tensor lora_up(const at::Tensor& u, const at::Tensor& lora_b,
                   const std::optional<at::Tensor>& bias, double scale, c10::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_grad_pass(const at::Tensor& grad_y,
                                                              const at::Tensor& u,
                                                              const at::Tensor& lora_b,
                                                              double scale, bool need_dbias);

std::tuple<at::Tensor, at::Tensor> lora_dx_da(const at::Tensor& x, const at::Tensor& du,
                                              const at::Tensor& lora_a, int64_t seed, double p,
                                              bool need_dx);

}  // namespace cuda
}  // namespace lowcost
