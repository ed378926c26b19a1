// Argument validation shared by the CPU and CUDA implementations of the lowcost ops.
// Every failure is a TORCH_CHECK whose message names the op, the argument and the expectation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include "gated_act.h"
#include "xent_rows.h"

#include <cstdint>
#include <optional>

namespace lowcost {

// Problem sizes read from validated arguments.
struct LoraDims {
  int64_t M = 0;  // rows of x / grad_y / u
  int64_t K = 0;  // columns of x (in_features)
  int64_t N = 0;  // columns of grad_y / rows of lora_b (out_features)
  int64_t r = 0;  // LoRA rank
};

// True for float32, float16 and bfloat16: the activation dtypes every op accepts.
bool is_supported_float(c10::ScalarType t);

LoraDims check_philox_dropout_args(const at::Tensor& x, int64_t seed, double p,
                                   c10::DeviceType device);

LoraDims check_philox_dropout_pair_args(const at::Tensor& x, const at::Tensor& z, int64_t seed, double p,
                                        c10::DeviceType device);

LoraDims check_lora_down_args(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed,
                              double p, c10::DeviceType device);

// The most projections one lora_down_grouped call takes (the CUDA kernel's per-projection table is a kernel
// argument of this many entries).
constexpr int kMaxGroupedProjections = 8;

// lora_down_grouped(x, lora_a, ranks, seeds, p): x and lora_a as for lora_down, lora_a the stacked (sum r_i, K)
// adapters; ranks, seeds and p one entry per projection (1 .. kMaxGroupedProjections of them), ranks >= 0 summing
// to lora_a.size(0), each seed and p as lora_down's. Returns r = sum r_i.
LoraDims check_lora_down_grouped_args(const at::Tensor& x, const at::Tensor& lora_a, c10::ArrayRef<int64_t> ranks,
                                      c10::ArrayRef<int64_t> seeds, c10::ArrayRef<double> p,
                                      c10::DeviceType device);

LoraDims check_lora_up_args(const at::Tensor& u, const at::Tensor& lora_b,
                            const std::optional<at::Tensor>& bias, c10::ScalarType dtype,
                            c10::DeviceType device);

LoraDims check_lora_grad_pass_args(const at::Tensor& grad_y, const at::Tensor& u,
                                   const at::Tensor& lora_b, c10::DeviceType device);

LoraDims check_lora_dx_da_args(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                               int64_t seed, double p, c10::DeviceType device);

// The most dA rows one lora_dx_da_grouped call accumulates for a block of the CUDA kernel: sum over projections of
// r_i rounded up to 16 (each projection's dA accumulators sit in shared memory across the row tiles; 256 rows are
// 64 KiB). Checked on every device so a call that runs on one runs on the other.
constexpr int64_t kMaxGroupedDxDaRows = 256;

// lora_dx_da_grouped(x, du, lora_a, ranks, seeds, p): x (M, K); du the stacked (M, sum r_i) fp32 du_i; lora_a the
// stacked (sum r_i, K) adapters; ranks, seeds and p as lora_down_grouped's (1 .. kMaxGroupedProjections entries,
// the r_i rounded up to 16 summing to at most kMaxGroupedDxDaRows). Returns r = sum r_i.
LoraDims check_lora_dx_da_grouped_args(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                                       c10::ArrayRef<int64_t> ranks, c10::ArrayRef<int64_t> seeds,
                                       c10::ArrayRef<double> p, c10::DeviceType device);

// The quantized formats the CUDA dequantizing GEMMs decode (lowcost/reference/quant).
enum class QuantScheme { kNf4, kNf4Dq, kInt8, kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ6_K };

// The GGUF block formats (q8_0, q4_0, q4_1, q4_k, q6_k): one stored tensor, the file's blocks as they are.
inline bool is_gguf(QuantScheme s) {
  return s != QuantScheme::kNf4 && s != QuantScheme::kNf4Dq && s != QuantScheme::kInt8;
}

// Sizes of a dequantizing GEMM on a quantized W (N, K): M rows of the activation, and the NF4 blocks per
// (padded) row of W.
struct DequantGemmDims {
  int64_t M = 0;
  int64_t N = 0;
  int64_t K = 0;
  QuantScheme scheme = QuantScheme::kNf4;
  int64_t blocks_per_row = 0;
};

// dequant_gemm (dgrad false: a = x (M, K), n_other = N) and dequant_gemm_dgrad (dgrad true: a = grad_y
// (M, N), n_other = K). packed: the format's stored tensors in QuantizedWeight order, then its code books
// (nf4: codes, absmax, NF4 code (16,); nf4-dq: codes, absmax_q, absmax_scale, absmax_offset, NF4 code,
// dynamic map (256,); int8: qweight, scale; q8_0, q4_0, q4_1, q4_k, q6_k: data, the GGUF blocks (K a multiple of
// the block: 32, or 256 for the k-quants q4_k and q6_k)).
// c: optional (M, output columns) in a's dtype, any strides.
DequantGemmDims check_dequant_gemm_args(const at::Tensor& a, c10::ArrayRef<at::Tensor> packed,
                                        c10::string_view scheme, int64_t n_other, int64_t block_size,
                                        const std::optional<at::Tensor>& c, bool dgrad, c10::DeviceType device);

// Sizes of the gated MLP's elementwise ops: gate, up (and dh) are (M, I) with any strides.
struct GatedActDims {
  int64_t M = 0;
  int64_t I = 0;
  GatedAct act = kSilu;
};

// gated_act_mul(gate, up, activation): gate and up 2-D, one shape, one float32/float16/bfloat16 dtype, one
// device; activation "silu", "gelu_tanh" or "gelu".
GatedActDims check_gated_act_mul_args(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                                      c10::DeviceType device);

// gated_act_mul_backward(dh, gate, up, activation): as above, and dh with gate's shape, dtype and device.
GatedActDims check_gated_act_mul_backward_args(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                                               c10::string_view activation, c10::DeviceType device);

// softmax_xent_rows(z, labels, row_weight, ignore_index, label_smoothing, softcap): z a 2-D (C, V) float32/
// float16/bfloat16 chunk with unit column stride, labels (C,) int64, row_weight None or (C,) float32, one device;
// label_smoothing in [0, 1], softcap finite and >= 0 (0: none). Returns the settings the kernels read.
XentSettings check_softmax_xent_rows_args(const at::Tensor& z, const at::Tensor& labels,
                                          const std::optional<at::Tensor>& row_weight, int64_t ignore_index,
                                          double label_smoothing, double softcap, c10::DeviceType device);

}  // namespace lowcost
