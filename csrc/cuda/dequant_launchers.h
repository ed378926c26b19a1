// The host side of dequant_gemm and dequant_gemm_dgrad, written once for the GPU (dequant_gemm.cu) and the
// emulator (csrc/tests/test_dequant_gemm_emulated.cpp), in the style of host_launchers.h (the `Exec`
// contract is described there): argument checks, the output, the device view of the quantized weight, the
// dtype and format dispatch and the launch. No workspace: the reduction is not split (launch_plan.h).
#pragma once

#include "dequant_gemm_kernels.cuh"

#include "../checks.h"
#include "../dispatch.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace lowcost {
namespace cuda {

// The device view of the stored tensors `packed` (validated by check_dequant_gemm_args).
inline QuantTile make_quant_tile(c10::ArrayRef<at::Tensor> packed, const DequantGemmDims& d, int64_t block_size) {
  QuantTile q;
  q.codes = reinterpret_cast<const uint8_t*>(packed[0].data_ptr());
  q.code_stride = packed[0].stride(0);
  q.N = d.N;
  q.K = d.K;
  q.block_size = static_cast<int>(block_size);
  q.blocks_per_row = d.blocks_per_row;
  if (is_gguf(d.scheme)) {
    return q;  // the blocks carry their own scales
  }
  if (d.scheme == QuantScheme::kInt8) {
    q.absmax = packed[1].data_ptr<float>();
    return q;
  }
  q.absmax_stride = packed[1].stride(0);
  if (d.scheme == QuantScheme::kNf4) {
    q.absmax = packed[1].data_ptr<float>();
    q.nf4_code = packed[2].data_ptr<float>();
    return q;
  }
  q.absmax_q = packed[1].data_ptr<uint8_t>();
  q.absmax_scale = packed[2].data_ptr<float>();
  q.absmax_offset = packed[3].data_ptr<float>();
  q.nf4_code = packed[4].data_ptr<float>();
  q.dyn_code = packed[5].data_ptr<float>();
  return q;
}

// Calls f(std::integral_constant<int, FMT>) for the kernel's format constant.
template <typename F>
void dispatch_quant_scheme(QuantScheme scheme, F&& f) {
  if (scheme == QuantScheme::kNf4) {
    f(std::integral_constant<int, kFmtNf4>{});
  } else if (scheme == QuantScheme::kNf4Dq) {
    f(std::integral_constant<int, kFmtNf4Dq>{});
  } else if (scheme == QuantScheme::kInt8) {
    f(std::integral_constant<int, kFmtInt8>{});
  } else if (scheme == QuantScheme::kQ8_0) {
    f(std::integral_constant<int, kFmtQ8_0>{});
  } else if (scheme == QuantScheme::kQ4_0) {
    f(std::integral_constant<int, kFmtQ4_0>{});
  } else if (scheme == QuantScheme::kQ4_1) {
    f(std::integral_constant<int, kFmtQ4_1>{});
  } else if (scheme == QuantScheme::kQ4_K) {
    f(std::integral_constant<int, kFmtQ4_K>{});
  } else {
    f(std::integral_constant<int, kFmtQ6_K>{});
  }
}

// DGRAD false: c + x deq(W)^T (M, N); DGRAD true: c + g deq(W) (M, K); in the activation's dtype. (A template
// parameter, so dequant_gemm.cu and dequant_gemm_dgrad.cu each compile only their own kernels.)
template <bool DGRAD, typename Exec>
at::Tensor run_dequant_gemm(const at::Tensor& a, c10::ArrayRef<at::Tensor> packed, c10::string_view scheme,
                            int64_t n_other, int64_t block_size, const std::optional<at::Tensor>& c, Exec& exec) {
  constexpr bool dgrad = DGRAD;
  const DequantGemmDims d = check_dequant_gemm_args(a, packed, scheme, n_other, block_size, c, dgrad, Exec::kDevice);
  [[maybe_unused]] const auto guard = exec.guard(a.device());
  const int64_t P = dgrad ? d.K : d.N, Q = dgrad ? d.N : d.K;
  at::Tensor out = exec.empty({d.M, P}, a.options());
  if (out.numel() == 0) return out;
  const QuantTile q = make_quant_tile(packed, d, block_size);
  const bool has_c = c.has_value() && c->defined();
  const char* op = dgrad ? "dequant_gemm_dgrad" : "dequant_gemm";
  dispatch_act(a.scalar_type(), op, [&](auto av) {
    using T = decltype(av);
    const DequantGemmPlan plan = plan_dequant_gemm(d.M, P, sizeof(T));
    const T* ap = a.data_ptr<T>();
    const T* cp = has_c ? c->data_ptr<T>() : static_cast<const T*>(nullptr);
    const int64_t sc0 = has_c ? c->stride(0) : 0, sc1 = has_c ? c->stride(1) : 0;
    const bool a_vec = rows_vec16(ap, d.M, a.stride(0), a.stride(1));
    dispatch_quant_scheme(d.scheme, [&](auto fmt) {
      constexpr int FMT = decltype(fmt)::value;
      exec.launch(plan.grid, plan.smem, op, dequant_gemm_kernel<T, FMT, DGRAD>, ap, d.M, Q, a.stride(0),
                  a.stride(1), a_vec, q, cp, sc0, sc1, out.data_ptr<T>(), P);
    });
  });
  return out;
}

}  // namespace cuda
}  // namespace lowcost
