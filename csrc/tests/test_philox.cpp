// C++ unit test (ctest): Philox known answers from docs/lora_linear_spec.md, the dropout parameters,
// and the CPU ops, called through the dispatcher, against scalar loops written from the spec.
#include "../cpu/ops_cpu.h"
#include "../philox.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

void test_known_answers() {
  struct Case {
    uint32_t c[4], k[2], expect[4];
  };
  const Case cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Case& cs : cases) {
    const lowcost::Philox4 out =
        lowcost::philox4x32_10(cs.c[0], cs.c[1], cs.c[2], cs.c[3], cs.k[0], cs.k[1]);
    for (int t = 0; t < 4; ++t) {
      check(out.w[t] == cs.expect[t], "philox known answer word " + std::to_string(t) + ": got " +
                                          hex(out.w[t]) + ", expected " + hex(cs.expect[t]));
    }
  }
}

void test_dropout_params() {
  const lowcost::DropoutParams d = lowcost::make_dropout_params((int64_t{0x12345678} << 32) | 0x9abcdef0, 0.25);
  check(d.key0 == 0x9abcdef0u && d.key1 == 0x12345678u, "seed splits into (lo32, hi32)");
  check(d.threshold == 0x40000000u, "threshold of p = 0.25 is 2^30");
  check(d.keep_scale == static_cast<float>(1.0 / 0.75), "keep_scale = float32(1 / (1 - p))");
  const lowcost::DropoutParams z = lowcost::make_dropout_params(7, 0.0);
  check(!z.enabled && z.keep_scale == 1.0f, "p = 0 disables the generator");
  const lowcost::DropoutParams h = lowcost::make_dropout_params(7, 0.1);
  check(h.threshold == static_cast<uint32_t>(static_cast<uint64_t>(0.1 * 4294967296.0)),
        "threshold = int(p * 2^32)");
  // dropout_keep4 at an unaligned start agrees with four single-element answers.
  for (uint64_t i0 = 0; i0 < 16; ++i0) {
    const uint32_t bits = lowcost::dropout_keep4(h, i0);
    for (uint32_t t = 0; t < 4; ++t) {
      check(((bits >> t) & 1u) == (lowcost::dropout_keep(h, i0 + t) ? 1u : 0u),
            "dropout_keep4 at i0 = " + std::to_string(i0));
    }
  }
}

// x~[m, k] from the spec, computed element by element.
float masked(const lowcost::DropoutParams& d, const at::Tensor& x32, int64_t m, int64_t k) {
  const int64_t K = x32.size(1);
  const float v = x32[m][k].item<float>();
  return lowcost::dropout_apply(d, lowcost::dropout_keep(d, static_cast<uint64_t>(m * K + k)), v);
}

bool close(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1.0 + std::fabs(b)); }

void test_cpu_ops() {
  const int64_t M = 7, K = 13, N = 11, r = 5, seed = (int64_t{3} << 32) + 12345;
  const double p = 0.3;
  at::manual_seed(0);
  // x is a transposed (non-contiguous) view, as the ops must accept any strides.
  const at::Tensor x = at::randn({K, M}, at::kFloat).t();
  const at::Tensor a = at::randn({r, K}, at::kFloat);
  const at::Tensor b = at::randn({N, r}, at::kFloat);
  const at::Tensor g = at::randn({M, N}, at::kFloat);
  const at::Tensor bias = at::randn({N}, at::kFloat);
  const lowcost::DropoutParams d = lowcost::make_dropout_params(seed, p);
  const float scale = 0.5f;

  auto& dispatcher = c10::Dispatcher::singleton();
  auto dropout_op = dispatcher.findSchemaOrThrow("lowcost::philox_dropout", "")
                        .typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  auto down_op = dispatcher.findSchemaOrThrow("lowcost::lora_down", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>();

  const at::Tensor xt = dropout_op.call(x, seed, p);
  const at::Tensor u = down_op.call(x, a, seed, p);
  const at::Tensor c = lowcost::cpu::lora_up(u, b, bias, scale, at::kFloat);
  at::Tensor du, dB, dbias, dx, dA;
  std::tie(du, dB, dbias) = lowcost::cpu::lora_grad_pass(g, u, b, scale, true);
  std::tie(dx, dA) = lowcost::cpu::lora_dx_da(x, du, a, seed, p, true);

  int64_t kept = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float want = masked(d, x, m, k);
      kept += want != 0.0f;
      check(xt[m][k].item<float>() == want, "philox_dropout element exact");
    }
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(masked(d, x, m, k)) * a[j][k].item<float>();
      check(close(u[m][j].item<float>(), s, 1e-5), "lora_down u[" + std::to_string(m) + "," + std::to_string(j) + "]");
    }
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t j = 0; j < r; ++j) s += double(u[m][j].item<float>()) * b[n][j].item<float>();
      check(close(c[m][n].item<float>(), scale * s + bias[n].item<float>(), 1e-5), "lora_up");
    }
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += double(g[m][n].item<float>()) * b[n][j].item<float>();
      check(close(du[m][j].item<float>(), scale * s, 1e-5), "lora_grad_pass du");
    }
    for (int64_t k = 0; k < K; ++k) {
      double s = 0;
      for (int64_t j = 0; j < r; ++j) s += double(du[m][j].item<float>()) * a[j][k].item<float>();
      const bool keep = lowcost::dropout_keep(d, static_cast<uint64_t>(m * K + k));
      check(close(dx[m][k].item<float>(), keep ? s * d.keep_scale : 0.0, 1e-5), "lora_dx_da dx");
    }
  }
  check(kept > 0 && kept < M * K, "the mask drops some and keeps some elements");
  for (int64_t n = 0; n < N; ++n) {
    double sb = 0;
    for (int64_t m = 0; m < M; ++m) sb += g[m][n].item<float>();
    check(close(dbias[n].item<float>(), sb, 1e-5), "lora_grad_pass dbias");
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) s += double(g[m][n].item<float>()) * u[m][j].item<float>();
      check(close(dB[n][j].item<float>(), scale * s, 1e-5), "lora_grad_pass dB");
    }
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) s += double(du[m][j].item<float>()) * masked(d, x, m, k);
      check(close(dA[j][k].item<float>(), s, 1e-5), "lora_dx_da dA");
    }
  }

  // Errors name the argument.
  bool threw = false;
  try {
    down_op.call(x, at::randn({r, K + 1}), seed, p);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("lora_a must be (r, K)") != std::string::npos;
  }
  check(threw, "lora_down rejects a K mismatch with a message naming lora_a");
}

}  // namespace

int main() {
  test_known_answers();
  test_dropout_params();
  test_cpu_ops();
  if (g_failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return EXIT_FAILURE;
  }
  std::printf("test_philox: all checks passed\n");
  return EXIT_SUCCESS;
}
