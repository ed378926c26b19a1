// Dtype dispatch over (activation dtype, adapter dtype) shared by the CPU and CUDA backends.
// The activation (x or grad_y) is float32, float16 or bfloat16; the adapter (lora_a or lora_b)
// is float32 or the activation's dtype. The callable receives one value of each element type,
// so only the 5 valid pairs are instantiated (no double).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace lowcost {

template <typename F>
void dispatch_act(c10::ScalarType act, const char* name, F&& f) {
  switch (act) {
    case c10::ScalarType::Float:
      f(float{});
      break;
    case c10::ScalarType::Half:
      f(c10::Half{});
      break;
    case c10::ScalarType::BFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "lowcost::", name, ": unsupported dtype ", act);
  }
}

template <typename F>
void dispatch_act_adapter(c10::ScalarType act, c10::ScalarType adapter, const char* name, F&& f) {
  dispatch_act(act, name, [&](auto act_value) {
    using act_t = decltype(act_value);
    if (adapter == c10::ScalarType::Float) {
      f(act_t{}, float{});
    } else {
      TORCH_CHECK(adapter == act, "lowcost::", name, ": adapter dtype ", adapter,
                  " must be float32 or ", act);
      f(act_t{}, act_t{});
    }
  });
}

}  // namespace lowcost
