#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace lowcost {
namespace {

const char* device_name(c10::DeviceType device) {
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

LoraDims check_lora_down_args(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed,
                              double p, c10::DeviceType device) {
  const char* op = "lora_down";
  check_2d(op, "x", x, "(M, K)");
  check_2d(op, "lora_a", lora_a, "(r, K)");
  check_device(op, "x", x, x, "x", device);
  check_device(op, "lora_a", lora_a, x, "x", device);
  check_activation_dtype(op, "x", x);
  check_adapter_dtype(op, "lora_a", lora_a, x.scalar_type(), "x");
  TORCH_CHECK(lora_a.size(1) == x.size(1), "lowcost::", op, ": lora_a must be (r, K) with K = x.size(1) = ",
              x.size(1), ", got lora_a of shape ", lora_a.sizes());
  check_seed(op, seed);
  check_p(op, p);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = lora_a.size(0);
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
  check_2d(op, "x", x, "(M, K)");
  check_2d(op, "du", du, "(M, r)");
  check_2d(op, "lora_a", lora_a, "(r, K)");
  check_device(op, "x", x, x, "x", device);
  check_device(op, "du", du, x, "x", device);
  check_device(op, "lora_a", lora_a, x, "x", device);
  check_activation_dtype(op, "x", x);
  check_float32(op, "du", du);
  check_adapter_dtype(op, "lora_a", lora_a, x.scalar_type(), "x");
  TORCH_CHECK(du.size(0) == x.size(0), "lowcost::", op, ": du must be (M, r) with M = x.size(0) = ",
              x.size(0), ", got du of shape ", du.sizes());
  TORCH_CHECK(lora_a.size(1) == x.size(1), "lowcost::", op,
              ": lora_a must be (r, K) with K = x.size(1) = ", x.size(1), ", got lora_a of shape ",
              lora_a.sizes());
  TORCH_CHECK(lora_a.size(0) == du.size(1), "lowcost::", op,
              ": rank mismatch: du is (M, r) with r = ", du.size(1), " but lora_a has shape ",
              lora_a.sizes());
  check_seed(op, seed);
  check_p(op, p);
  LoraDims d;
  d.M = x.size(0);
  d.K = x.size(1);
  d.r = du.size(1);
  return d;
}

}  // namespace lowcost
