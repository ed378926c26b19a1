// CUDA implementations of the lowcost ops (schemas in csrc/ops.cpp, contract in
// docs/lora_linear_spec.md). Each runs on the current stream of the inputs' device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace lowcost {
namespace cuda {

#include "../op_declarations.inc"  // NOLINT(build/include): declarations only

// The dequantizing base GEMMs of a quantized weight (CUDA only; schemas in csrc/ops.cpp).
at::Tensor dequant_gemm(const at::Tensor& x, at::TensorList packed, c10::string_view scheme, int64_t n_rows,
                        int64_t block_size, const std::optional<at::Tensor>& c);

at::Tensor dequant_gemm_dgrad(const at::Tensor& grad_y, at::TensorList packed, c10::string_view scheme,
                              int64_t n_cols, int64_t block_size, const std::optional<at::Tensor>& c);

}  // namespace cuda
}  // namespace lowcost
