// The gate activations of the fused gated MLP (lowcost/reference/lora_gated_mlp.py) and their derivatives,
// in float32, written once for the CPU kernels (csrc/cpu/gated_act_cpu.cpp) and the CUDA kernels
// (csrc/cuda/gated_act_kernels.cuh):
//
//   silu       a(g) = g s,  s = 1 / (1 + exp(-g))                         a'(g) = s (1 + g (1 - s))
//   gelu_tanh  a(g) = g (1 + t) / 2,  t = tanh(b (g + c g^3)),            a'(g) = (1 + t) / 2
//              b = sqrt(2 / pi), c = 0.044715                                      + g (1 - t^2) b (1 + 3 c g^2) / 2
//   gelu       a(g) = g Phi(g),  Phi(g) = (1 + erf(g / sqrt 2)) / 2      a'(g) = Phi(g) + g exp(-g^2 / 2) / sqrt(2 pi)
//
// These are torch's definitions (F.silu, F.gelu(approximate="tanh"/"none") and their aten backward kernels).
// The ops built on them round once to the tensors' dtype:
//   gated_act_mul:           h = a(g) u
//   gated_act_mul_backward:  d_up = dh a(g),  d_gate = (dh u) a'(g)
#pragma once

#include "host_device.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace lowcost {

// The kernels' template argument (and the kernel report's name for it): the activation's index in
// lowcost.reference.lora_gated_mlp.ACTIVATIONS.
enum GatedAct : int { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

constexpr float kGeluTanhBeta = 0.7978845608028654f;   // sqrt(2 / pi)
constexpr float kGeluTanhKappa = 0.044715f;
constexpr float kSqrtHalf = 0.7071067811865476f;       // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;     // 1 / sqrt(2 pi)

// a(g), and a'(g) when `grad` is non-null.
template <int ACT>
LOWCOST_HD float gated_act(float g, float* grad) {
  if constexpr (ACT == kSilu) {
    const float s = 1.0f / (1.0f + expf(-g));
    if (grad != nullptr) *grad = s * (1.0f + g * (1.0f - s));
    return g * s;
  } else if constexpr (ACT == kGeluTanh) {
    const float t = tanhf(kGeluTanhBeta * (g + kGeluTanhKappa * g * g * g));
    if (grad != nullptr) {
      *grad = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kGeluTanhBeta * (1.0f + 3.0f * kGeluTanhKappa * g * g);
    }
    return 0.5f * g * (1.0f + t);
  } else {
    const float cdf = 0.5f * (1.0f + erff(g * kSqrtHalf));
    if (grad != nullptr) *grad = cdf + g * kInvSqrt2Pi * expf(-0.5f * g * g);
    return g * cdf;
  }
}

// h = a(g) u (float32; the caller rounds once).
template <int ACT>
LOWCOST_HD float gated_act_mul_value(float g, float u) {
  return gated_act<ACT>(g, nullptr) * u;
}

// (d_gate, d_up) = ((dh u) a'(g), dh a(g)) (float32; the caller rounds each once).
template <int ACT>
LOWCOST_HD void gated_act_mul_grads(float dh, float g, float u, float& d_gate, float& d_up) {
  float grad = 0.0f;
  const float a = gated_act<ACT>(g, &grad);
  d_gate = dh * u * grad;
  d_up = dh * a;
}

// Host side: calls f(std::integral_constant<int, ACT>{}) for the activation `act`.
template <typename F>
void dispatch_gated_act(GatedAct act, F&& f) {
  if (act == kSilu) {
    f(std::integral_constant<int, kSilu>{});
  } else if (act == kGeluTanh) {
    f(std::integral_constant<int, kGeluTanh>{});
  } else {
    f(std::integral_constant<int, kGelu>{});
  }
}

}  // namespace lowcost
