#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <string>

namespace lowcost {
namespace {

const char* device_name(c10::DeviceType device) {
  if (device == c10::DeviceType::Meta) return "Meta";
  return device == c10::DeviceType::CUDA ? "CUDA" : "CPU";
}

void check_2d(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK(t.dim() == 2, "lowcost::", op, ": ", name, " must be a 2-D ", shape, " tensor, got ",
              t.dim(), "-D of shape ", t.sizes());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                  const char* ref_name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, "lowcost::", op, ": ", name, " must be a ",
              device_name(device), " tensor (the ", device_name(device),
              " kernel was selected), got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "lowcost::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), "; all tensors must share one device");
}

void check_activation_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "lowcost::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// Adapters (lora_a, lora_b) are float32 or share the activation dtype.
void check_adapter_dtype(const char* op, const char* name, const at::Tensor& adapter,
                         c10::ScalarType act, const char* act_name) {
  const auto t = adapter.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == act, "lowcost::", op, ": ", name,
              " must be float32 or the dtype of ", act_name, " (", act, "), got ", t);
}

void check_float32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "lowcost::", op, ": ", name,
              " must be float32 (the rank-r activation is kept in float32), got ", t.scalar_type());
}

void check_seed(const char* op, int64_t seed) {
  TORCH_CHECK(seed >= 0, "lowcost::", op, ": seed must lie in [0, 2^63), got ", seed);
}

void check_p(const char* op, double p) {
  TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, "lowcost::", op,
              ": dropout probability p must lie in [0, 1), got ", p);
}

QuantScheme parse_quant_scheme(const char* op, c10::string_view scheme) {
  const std::string name(scheme.data(), scheme.size());
  if (name == "nf4") return QuantScheme::kNf4;
  if (name == "nf4-dq") return QuantScheme::kNf4Dq;
  if (name == "int8") return QuantScheme::kInt8;
  if (name == "q8_0") return QuantScheme::kQ8_0;
  if (name == "q4_0") return QuantScheme::kQ4_0;
  if (name == "q4_1") return QuantScheme::kQ4_1;
  if (name == "q4_k") return QuantScheme::kQ4_K;
  if (name == "q6_k") return QuantScheme::kQ6_K;
  TORCH_CHECK(false, "lowcost::", op, ": scheme must be 'nf4', 'nf4-dq', 'int8', 'q8_0', 'q4_0', 'q4_1', 'q4_k' or ",
              "'q6_k' (the ",
              "formats with a CUDA dequantizing tile), got '", name, "'");
}

// One stored tensor of a quantized weight: dtype, rank, device, unit inner stride (rows may be strided).
void check_stored(const char* op, const char* name, const at::Tensor& t, c10::ScalarType dtype, int64_t dims,
                  const at::Tensor& ref, c10::DeviceType device) {
  TORCH_CHECK(t.defined() && t.dim() == dims, "lowcost::", op, ": packed tensor ", name, " must be ", dims,
              "-D, got ", t.defined() ? t.dim() : -1, "-D");
  check_device(op, name, t, ref, "the activation", device);
  TORCH_CHECK(t.scalar_type() == dtype, "lowcost::", op, ": packed tensor ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(dims == 2 ? (t.size(1) <= 1 || t.stride(1) == 1) : t.is_contiguous(), "lowcost::", op,
              ": packed tensor ", name, " must have contiguous ", dims == 2 ? "rows" : "elements", ", got strides ",
              t.strides());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.sizes().equals(shape), "lowcost::", op, ": packed tensor ", name, " must have shape ",
              c10::IntArrayRef(shape), ", got ", t.sizes());
}

const char* quant_scheme_name(QuantScheme s) {
  switch (s) {
    case QuantScheme::kNf4: return "nf4";
    case QuantScheme::kNf4Dq: return "nf4-dq";
    case QuantScheme::kInt8: return "int8";
    case QuantScheme::kQ8_0: return "q8_0";
    case QuantScheme::kQ4_0: return "q4_0";
    case QuantScheme::kQ4_1: return "q4_1";
    case QuantScheme::kQ4_K: return "q4_k";
    default: return "q6_k";
  }
}

// The packed tensors a format is passed as (stored tensors, then code books).
size_t packed_count(QuantScheme s) {
  return s == QuantScheme::kNf4 ? 3 : (s == QuantScheme::kNf4Dq ? 6 : (s == QuantScheme::kInt8 ? 2 : 1));  // GGUF: 1
}

// Elements and bytes of one block of a GGUF block format (the file's layout, lowcost/reference/quant/gguf_blocks.py).
struct GgufBlock {
  int64_t elements;
  int64_t bytes;
};

GgufBlock gguf_block(QuantScheme s) {
  switch (s) {
    case QuantScheme::kQ8_0: return {32, 34};
    case QuantScheme::kQ4_0: return {32, 18};
    case QuantScheme::kQ4_1: return {32, 20};
    case QuantScheme::kQ4_K: return {256, 144};
    default: return {256, 210};  // kQ6_K
  }
}

// data (N, K / block * type_size) of a GGUF block format.
void check_gguf_blocks(const char* op, const at::Tensor& data, QuantScheme s, int64_t N, int64_t K,
                       const at::Tensor& ref, c10::DeviceType device) {
  const GgufBlock block = gguf_block(s);
  TORCH_CHECK(K % block.elements == 0, "lowcost::", op, ": a ", quant_scheme_name(s), " weight holds whole ",
              block.elements, "-element blocks: K must be a multiple of ", block.elements, ", got ", K);
  check_stored(op, "data", data, at::kByte, 2, ref, device);
  check_shape(op, "data", data, {N, K / block.elements * block.bytes});
}

// codes (N, Kp / 2) and the block size of an NF4 weight; returns the blocks per padded row Kp / B.
int64_t check_nf4_codes(const char* op, c10::ArrayRef<at::Tensor> packed, int64_t N, int64_t K,
                        int64_t block_size, const at::Tensor& ref, c10::DeviceType device) {
  check_stored(op, "codes", packed[0], at::kByte, 2, ref, device);
  const int64_t Kp = 2 * packed[0].size(1);
  TORCH_CHECK(block_size >= 8 && block_size % 8 == 0 && Kp % block_size == 0, "lowcost::", op,
              ": block_size must be a positive multiple of 8 that divides the padded row (", Kp, " codes), got ",
              block_size);
  TORCH_CHECK(packed[0].size(0) == N && Kp >= K && Kp - K < block_size, "lowcost::", op,
              ": codes must be (N, Kp / 2) = (", N, ", ceil(", K, " / ", block_size, ") * ", block_size / 2,
              "), got ", packed[0].sizes());
  const at::Tensor& code = packed[2 + (packed.size() == 6 ? 2 : 0)];
  check_stored(op, "nf4 code book", code, at::kFloat, 1, ref, device);
  TORCH_CHECK(code.numel() == 16, "lowcost::", op, ": the NF4 code book must have 16 values, got ", code.numel());
  return Kp / block_size;
}

void check_quant_weight(const char* op, c10::ArrayRef<at::Tensor> packed, DequantGemmDims& d, int64_t block_size,
                        const at::Tensor& ref, c10::DeviceType device) {
  const size_t want = packed_count(d.scheme);
  TORCH_CHECK(packed.size() == want, "lowcost::", op, ": a ", quant_scheme_name(d.scheme), " weight is passed as ",
              want, " packed tensors (stored tensors, then code books), got ", packed.size());
  if (is_gguf(d.scheme)) {
    check_gguf_blocks(op, packed[0], d.scheme, d.N, d.K, ref, device);
    return;
  }
  if (d.scheme == QuantScheme::kInt8) {
    check_stored(op, "qweight", packed[0], at::kChar, 2, ref, device);
    check_shape(op, "qweight", packed[0], {d.N, d.K});
    check_stored(op, "scale", packed[1], at::kFloat, 1, ref, device);
    check_shape(op, "scale", packed[1], {d.N});
    return;
  }
  d.blocks_per_row = check_nf4_codes(op, packed, d.N, d.K, block_size, ref, device);
  if (d.scheme == QuantScheme::kNf4) {
    check_stored(op, "absmax", packed[1], at::kFloat, 2, ref, device);
    check_shape(op, "absmax", packed[1], {d.N, d.blocks_per_row});
    return;
  }
  check_stored(op, "absmax_q", packed[1], at::kByte, 2, ref, device);
  check_shape(op, "absmax_q", packed[1], {d.N, d.blocks_per_row});
  check_stored(op, "absmax_scale", packed[2], at::kFloat, 1, ref, device);
  const int64_t groups = (d.N * d.blocks_per_row + 255) / 256;
  TORCH_CHECK(packed[2].numel() >= groups, "lowcost::", op, ": absmax_scale must hold one scale per 256 blocks (",
              groups, "), got ", packed[2].numel());
  check_stored(op, "absmax_offset", packed[3], at::kFloat, packed[3].dim(), ref, device);
  TORCH_CHECK(packed[3].numel() == 1, "lowcost::", op, ": absmax_offset must be one value, got ", packed[3].numel());
  check_stored(op, "dynamic map", packed[5], at::kFloat, 1, ref, device);
  TORCH_CHECK(packed[5].numel() == 256, "lowcost::", op, ": the dynamic map must have 256 values, got ",
              packed[5].numel());
}

}  // namespace

bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

LoraDims check_philox_dropout_args(const at::Tensor& x, int64_t seed, double p,
                                   c10::DeviceType device) {
  const char* op = "philox_dropout";
  check_2d(op, "x", x, "(M, K)");
  check_device(op, "x", x, x, "x", device);
  check_activation_dtype(op, "x", x);
  check_seed(op, seed);
  check_p(op, p);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  return d;
}

LoraDims check_philox_dropout_pair_args(const at::Tensor& x, const at::Tensor& z, int64_t seed, double p,
                                        c10::DeviceType device) {
  const char* op = "philox_dropout_pair_";
  LoraDims d = check_philox_dropout_args(x, seed, p, device);
  check_2d(op, "z", z, "(M, K)");
  check_device(op, "z", z, x, "x", device);
  check_float32(op, "z", z);
  TORCH_CHECK(z.size(0) == d.M && z.size(1) == d.K, "lowcost::", op, ": z must have x's shape (", d.M, ", ",
              d.K, "), got ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), "lowcost::", op, ": z must be contiguous (it is masked in place), got strides ",
              z.strides());
  return d;
}

namespace {

// x (M, K) and lora_a (R, K), R named r_name ("r", or "sum r_i" for the stacked adapters of a grouped op): the
// operands lora_down and lora_down_grouped share.
void check_down_operands(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const std::string& r_name,
                         c10::DeviceType device) {
  const std::string r_k = "(" + r_name + ", K)";
  check_2d(op, "x", x, "(M, K)");
  check_2d(op, "lora_a", lora_a, r_k.c_str());
  check_device(op, "x", x, x, "x", device);
  check_device(op, "lora_a", lora_a, x, "x", device);
  check_activation_dtype(op, "x", x);
  check_adapter_dtype(op, "lora_a", lora_a, x.scalar_type(), "x");
  TORCH_CHECK(lora_a.size(1) == x.size(1), "lowcost::", op, ": lora_a must be ", r_k, " with K = x.size(1) = ",
              x.size(1), ", got lora_a of shape ", lora_a.sizes());
}

// x (M, K), du (M, R) fp32 and lora_a (R, K), R named r_name: the operands lora_dx_da and lora_dx_da_grouped share.
void check_dx_da_operands(const char* op, const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                          const std::string& r_name, c10::DeviceType device) {
  const std::string m_r = "(M, " + r_name + ")", r_k = "(" + r_name + ", K)";
  check_2d(op, "x", x, "(M, K)");
  check_2d(op, "du", du, m_r.c_str());
  check_2d(op, "lora_a", lora_a, r_k.c_str());
  check_device(op, "x", x, x, "x", device);
  check_device(op, "du", du, x, "x", device);
  check_device(op, "lora_a", lora_a, x, "x", device);
  check_activation_dtype(op, "x", x);
  check_float32(op, "du", du);
  check_adapter_dtype(op, "lora_a", lora_a, x.scalar_type(), "x");
  TORCH_CHECK(du.size(0) == x.size(0), "lowcost::", op, ": du must be ", m_r, " with M = x.size(0) = ", x.size(0),
              ", got du of shape ", du.sizes());
  TORCH_CHECK(lora_a.size(1) == x.size(1), "lowcost::", op, ": lora_a must be ", r_k, " with K = x.size(1) = ",
              x.size(1), ", got lora_a of shape ", lora_a.sizes());
  TORCH_CHECK(lora_a.size(0) == du.size(1), "lowcost::", op, ": rank mismatch: du is ", m_r, " with ", r_name,
              " = ", du.size(1), " but lora_a has shape ", lora_a.sizes());
}

}  // namespace

LoraDims check_lora_down_args(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed,
                              double p, c10::DeviceType device) {
  const char* op = "lora_down";
  check_down_operands(op, x, lora_a, "r", device);
  check_seed(op, seed);
  check_p(op, p);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = lora_a.size(0);
  return d;
}

namespace {

// The per-projection lists of a grouped op: 1 .. kMaxGroupedProjections ranks >= 0 summing to stacked_rows
// (lora_a.size(0)), one seed and one p (each as lora_down's) per projection. Returns sum r_i.
int64_t check_grouped_projections(const char* op, c10::ArrayRef<int64_t> ranks, c10::ArrayRef<int64_t> seeds,
                                  c10::ArrayRef<double> p, int64_t stacked_rows) {
  const int64_t count = static_cast<int64_t>(ranks.size());
  TORCH_CHECK(count >= 1 && count <= kMaxGroupedProjections, "lowcost::", op, ": ranks must have 1 to ",
              kMaxGroupedProjections, " entries (one per projection), got ", count);
  TORCH_CHECK(static_cast<int64_t>(seeds.size()) == count && static_cast<int64_t>(p.size()) == count, "lowcost::", op,
              ": seeds and p must have one entry per projection (", count, " ranks), got ", seeds.size(), " seeds and ",
              p.size(), " p");
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ranks[i] >= 0, "lowcost::", op, ": ranks[", i, "] must be >= 0, got ", ranks[i]);
    total += ranks[i];
    check_seed(op, seeds[i]);
    check_p(op, p[i]);
  }
  TORCH_CHECK(total == stacked_rows, "lowcost::", op, ": ranks must sum to lora_a.size(0) = ", stacked_rows,
              " (the stacked adapters' rows), got ", ranks, " (sum ", total, ")");
  return total;
}

}  // namespace

LoraDims check_lora_down_grouped_args(const at::Tensor& x, const at::Tensor& lora_a, c10::ArrayRef<int64_t> ranks,
                                      c10::ArrayRef<int64_t> seeds, c10::ArrayRef<double> p,
                                      c10::DeviceType device) {
  const char* op = "lora_down_grouped";
  check_down_operands(op, x, lora_a, "sum r_i", device);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = check_grouped_projections(op, ranks, seeds, p, lora_a.size(0));
  return d;
}

LoraDims check_lora_up_args(const at::Tensor& u, const at::Tensor& lora_b,
                            const std::optional<at::Tensor>& bias, c10::ScalarType dtype,
                            c10::DeviceType device) {
  const char* op = "lora_up";
  check_2d(op, "u", u, "(M, r)");
  check_2d(op, "lora_b", lora_b, "(N, r)");
  check_device(op, "u", u, u, "u", device);
  check_device(op, "lora_b", lora_b, u, "u", device);
  check_float32(op, "u", u);
  TORCH_CHECK(is_supported_float(dtype), "lowcost::", op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  check_adapter_dtype(op, "lora_b", lora_b, dtype, "the output (dtype)");
  TORCH_CHECK(lora_b.size(1) == u.size(1), "lowcost::", op,
              ": rank mismatch: u is (M, r) with r = ", u.size(1), " but lora_b has shape ",
              lora_b.sizes(), " (expected (N, ", u.size(1), "))");
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == lora_b.size(0), "lowcost::", op,
                ": bias must be a 1-D (N,) tensor with N = lora_b.size(0) = ", lora_b.size(0),
                ", got shape ", b.sizes());
    check_device(op, "bias", b, u, "u", device);
    TORCH_CHECK(b.scalar_type() == dtype, "lowcost::", op, ": bias must have the output dtype ",
                dtype, ", got ", b.scalar_type());
  }
  LoraDims d;
  d.M = u.size(0);
  d.r = u.size(1);
  d.N = lora_b.size(0);
  return d;
}

LoraDims check_lora_grad_pass_args(const at::Tensor& grad_y, const at::Tensor& u,
                                   const at::Tensor& lora_b, c10::DeviceType device) {
  const char* op = "lora_grad_pass";
  check_2d(op, "grad_y", grad_y, "(M, N)");
  check_2d(op, "u", u, "(M, r)");
  check_2d(op, "lora_b", lora_b, "(N, r)");
  check_device(op, "grad_y", grad_y, grad_y, "grad_y", device);
  check_device(op, "u", u, grad_y, "grad_y", device);
  check_device(op, "lora_b", lora_b, grad_y, "grad_y", device);
  check_activation_dtype(op, "grad_y", grad_y);
  check_float32(op, "u", u);
  check_adapter_dtype(op, "lora_b", lora_b, grad_y.scalar_type(), "grad_y");
  TORCH_CHECK(u.size(0) == grad_y.size(0), "lowcost::", op, ": u must be (M, r) with M = grad_y.size(0) = ",
              grad_y.size(0), ", got u of shape ", u.sizes());
  TORCH_CHECK(lora_b.size(0) == grad_y.size(1), "lowcost::", op,
              ": lora_b must be (N, r) with N = grad_y.size(1) = ", grad_y.size(1),
              ", got lora_b of shape ", lora_b.sizes());
  TORCH_CHECK(lora_b.size(1) == u.size(1), "lowcost::", op,
              ": rank mismatch: u is (M, r) with r = ", u.size(1), " but lora_b has shape ",
              lora_b.sizes());
  LoraDims d;
  d.M = grad_y.size(0);
  d.N = grad_y.size(1);
  d.r = u.size(1);
  return d;
}

LoraDims check_lora_dx_da_args(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                               int64_t seed, double p, c10::DeviceType device) {
  const char* op = "lora_dx_da";
  check_dx_da_operands(op, x, du, lora_a, "r", device);
  check_seed(op, seed);
  check_p(op, p);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = du.size(1);
  return d;
}

LoraDims check_lora_dx_da_grouped_args(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                                       c10::ArrayRef<int64_t> ranks, c10::ArrayRef<int64_t> seeds,
                                       c10::ArrayRef<double> p, c10::DeviceType device) {
  const char* op = "lora_dx_da_grouped";
  check_dx_da_operands(op, x, du, lora_a, "sum r_i", device);
  const int64_t total = check_grouped_projections(op, ranks, seeds, p, lora_a.size(0));
  int64_t padded = 0;
  for (const int64_t r : ranks) padded += (r + 15) / 16 * 16;
  TORCH_CHECK(padded <= kMaxGroupedDxDaRows, "lowcost::", op, ": ranks rounded up to 16 must sum to at most ",
              kMaxGroupedDxDaRows, " (the dA rows one CUDA block accumulates), got ", ranks, " (", padded, ")");
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = total;
  return d;
}

DequantGemmDims check_dequant_gemm_args(const at::Tensor& a, c10::ArrayRef<at::Tensor> packed,
                                        c10::string_view scheme, int64_t n_other, int64_t block_size,
                                        const std::optional<at::Tensor>& c, bool dgrad, c10::DeviceType device) {
  const char* op = dgrad ? "dequant_gemm_dgrad" : "dequant_gemm";
  const char* a_name = dgrad ? "grad_y" : "x";
  check_2d(op, a_name, a, dgrad ? "(M, N)" : "(M, K)");
  check_device(op, a_name, a, a, a_name, device);
  check_activation_dtype(op, a_name, a);
  TORCH_CHECK(n_other >= 0, "lowcost::", op, ": ", dgrad ? "n_cols" : "n_rows", " must be >= 0, got ", n_other);
  DequantGemmDims d;
  d.scheme = parse_quant_scheme(op, scheme);
  d.M = a.size(0);
  d.N = dgrad ? a.size(1) : n_other;
  d.K = dgrad ? n_other : a.size(1);
  check_quant_weight(op, packed, d, block_size, a, device);
  if (c.has_value() && c->defined()) {
    const int64_t cols = dgrad ? d.K : d.N;
    check_2d(op, "c", *c, "(M, output columns)");
    check_device(op, "c", *c, a, a_name, device);
    TORCH_CHECK(c->size(0) == d.M && c->size(1) == cols, "lowcost::", op, ": c must be (", d.M, ", ", cols,
                "), got ", c->sizes());
    TORCH_CHECK(c->scalar_type() == a.scalar_type(), "lowcost::", op, ": c must have ", a_name, "'s dtype ",
                a.scalar_type(), ", got ", c->scalar_type());
  }
  return d;
}

namespace {

GatedActDims check_gate_up(const char* op, const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                           c10::DeviceType device) {
  check_2d(op, "gate", gate, "(M, I)");
  check_2d(op, "up", up, "(M, I)");
  check_device(op, "gate", gate, gate, "gate", device);
  check_device(op, "up", up, gate, "gate", device);
  check_activation_dtype(op, "gate", gate);
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), "lowcost::", op, ": up must have gate's dtype ",
              gate.scalar_type(), ", got ", up.scalar_type());
  TORCH_CHECK(up.sizes().equals(gate.sizes()), "lowcost::", op, ": up must have gate's shape ", gate.sizes(),
              ", got ", up.sizes());
  const std::string name(activation.data(), activation.size());
  GatedActDims d;
  if (name == "silu") {
    d.act = kSilu;
  } else if (name == "gelu_tanh") {
    d.act = kGeluTanh;
  } else if (name == "gelu") {
    d.act = kGelu;
  } else {
    TORCH_CHECK(false, "lowcost::", op, ": activation must be 'silu', 'gelu_tanh' or 'gelu', got '", name, "'");
  }
  d.M = gate.size(0);
  d.I = gate.size(1);
  return d;
}

}  // namespace

GatedActDims check_gated_act_mul_args(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                                      c10::DeviceType device) {
  return check_gate_up("gated_act_mul", gate, up, activation, device);
}

GatedActDims check_gated_act_mul_backward_args(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                                               c10::string_view activation, c10::DeviceType device) {
  const char* op = "gated_act_mul_backward";
  const GatedActDims d = check_gate_up(op, gate, up, activation, device);
  check_2d(op, "dh", dh, "(M, I)");
  check_device(op, "dh", dh, gate, "gate", device);
  TORCH_CHECK(dh.scalar_type() == gate.scalar_type(), "lowcost::", op, ": dh must have gate's dtype ",
              gate.scalar_type(), ", got ", dh.scalar_type());
  TORCH_CHECK(dh.sizes().equals(gate.sizes()), "lowcost::", op, ": dh must have gate's shape ", gate.sizes(),
              ", got ", dh.sizes());
  return d;
}

XentSettings check_softmax_xent_rows_args(const at::Tensor& z, const at::Tensor& labels,
                                          const std::optional<at::Tensor>& row_weight, int64_t ignore_index,
                                          double label_smoothing, double softcap, c10::DeviceType device) {
  const char* op = "softmax_xent_rows";
  check_2d(op, "z", z, "(C, V) logits");
  check_device(op, "z", z, z, "z", device);
  check_activation_dtype(op, "z", z);
  TORCH_CHECK(z.size(1) >= 1, "lowcost::", op, ": z must have V >= 1 columns (classes), got shape ", z.sizes());
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1, "lowcost::", op, ": z must have unit column stride (a row-major ",
              "chunk of logits), got strides ", z.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "lowcost::", op, ": labels must be a 1-D (C,) ",
              "tensor with C=", z.size(0), " (z's rows), got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "lowcost::", op, ": labels must be int64, got ",
              labels.scalar_type());
  check_device(op, "labels", labels, z, "z", device);
  if (row_weight.has_value()) {
    const at::Tensor& w = *row_weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == z.size(0), "lowcost::", op, ": row_weight must be a 1-D (C,) ",
                "tensor with C=", z.size(0), " (z's rows), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == at::kFloat, "lowcost::", op, ": row_weight must be float32, got ",
                w.scalar_type());
    check_device(op, "row_weight", w, z, "z", device);
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "lowcost::", op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "lowcost::", op,
              ": softcap must be finite and >= 0 (0: no soft-capping), got ", softcap);
  XentSettings st;
  st.V = z.size(1);
  st.ignore_index = ignore_index;
  st.smoothing = static_cast<float>(label_smoothing);
  st.softcap = static_cast<float>(softcap);
  return st;
}

}  // namespace lowcost
