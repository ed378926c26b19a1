// CPU implementations of the lowcost ops (schemas in csrc/ops.cpp, contract in
// docs/lora_linear_spec.md). Declared here so the C++ unit test can call them directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace lowcost {
namespace cpu {

#include "../op_declarations.inc"  // NOLINT(build/include): declarations only

// CPU only (the torch backend's backward; other devices call philox_dropout twice).
at::Tensor philox_dropout_pair_(const at::Tensor& x, at::Tensor& z, int64_t seed, double p);

}  // namespace cpu
}  // namespace lowcost
