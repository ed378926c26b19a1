// CPU kernels of the gated MLP's elementwise ops (gated_act_mul, gated_act_mul_backward): the math of
// csrc/gated_act.h, the same functions the CUDA kernels call, in float32 with one rounding per output.
// gate, up and dh are read in place through their strides; outputs are contiguous (M, I). Rows are split
// over threads; every element is computed independently, so results do not depend on the thread count.
#include "ops_cpu.h"

#include "../checks.h"
#include "../dispatch.h"
#include "../gated_act.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace lowcost {
namespace cpu {
namespace {

// A 2-D tensor's data and strides, read as float.
template <typename T>
struct Strided {
  const T* p;
  int64_t s0, s1;

  explicit Strided(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  float operator()(int64_t m, int64_t k) const { return static_cast<float>(p[m * s0 + k * s1]); }
};

// Rows per parallel chunk so that a chunk covers at least ~16k elements.
int64_t row_grain(int64_t I) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, I));
}

template <typename T, int ACT>
void gated_act_mul_impl(const at::Tensor& gate, const at::Tensor& up, at::Tensor& h) {
  const int64_t M = gate.size(0), I = gate.size(1);
  const Strided<T> g(gate), u(up);
  T* hp = h.data_ptr<T>();
  at::parallel_for(0, M, row_grain(I), [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t k = 0; k < I; ++k) hp[m * I + k] = static_cast<T>(gated_act_mul_value<ACT>(g(m, k), u(m, k)));
    }
  });
}

template <typename T, int ACT>
void gated_act_mul_backward_impl(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                                 at::Tensor& d_gate, at::Tensor& d_up) {
  const int64_t M = gate.size(0), I = gate.size(1);
  const Strided<T> dy(dh), g(gate), u(up);
  T* dgp = d_gate.data_ptr<T>();
  T* dup = d_up.data_ptr<T>();
  at::parallel_for(0, M, row_grain(I), [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t k = 0; k < I; ++k) {
        float dg = 0.0f, du = 0.0f;
        gated_act_mul_grads<ACT>(dy(m, k), g(m, k), u(m, k), dg, du);
        dgp[m * I + k] = static_cast<T>(dg);
        dup[m * I + k] = static_cast<T>(du);
      }
    }
  });
}

}  // namespace

at::Tensor gated_act_mul(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  const GatedActDims dims = check_gated_act_mul_args(gate, up, activation, c10::DeviceType::CPU);
  at::Tensor h = at::empty({dims.M, dims.I}, gate.options());
  if (h.numel() == 0) return h;
  dispatch_act(gate.scalar_type(), "gated_act_mul", [&](auto tv) {
    dispatch_gated_act(dims.act, [&](auto act) {
      gated_act_mul_impl<decltype(tv), decltype(act)::value>(gate, up, h);
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_act_mul_backward(const at::Tensor& dh, const at::Tensor& gate,
                                                          const at::Tensor& up, c10::string_view activation) {
  const GatedActDims dims = check_gated_act_mul_backward_args(dh, gate, up, activation, c10::DeviceType::CPU);
  at::Tensor d_gate = at::empty({dims.M, dims.I}, gate.options());
  at::Tensor d_up = at::empty({dims.M, dims.I}, gate.options());
  if (d_gate.numel() == 0) return {d_gate, d_up};
  dispatch_act(gate.scalar_type(), "gated_act_mul_backward", [&](auto tv) {
    dispatch_gated_act(dims.act, [&](auto act) {
      gated_act_mul_backward_impl<decltype(tv), decltype(act)::value>(dh, gate, up, d_gate, d_up);
    });
  });
  return {d_gate, d_up};
}

}  // namespace cpu
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, CPU, m) {
  m.impl("gated_act_mul", &lowcost::cpu::gated_act_mul);
  m.impl("gated_act_mul_backward", &lowcost::cpu::gated_act_mul_backward);
}
