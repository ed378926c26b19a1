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

#include "../op_declarations.inc"  // NOLINT(build/include): declarations only

}  // namespace cuda
}  // namespace lowcost
