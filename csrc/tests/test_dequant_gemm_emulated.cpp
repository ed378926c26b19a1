// Runs the dequantizing GEMMs of csrc/cuda/dequant_gemm_kernels.cuh on the host under the emulated CUDA
// execution model (cuda_emulation.h: a fiber per CUDA thread, barriers, NaN-filled shared memory, cp.async
// queued until its wait, mma.sync from the lanes' fragments as the PTX ISA lays them out), through the same
// host code the GPU runs (csrc/cuda/dequant_launchers.h), and compares them with a float64 reference of
// c + x deq(W)^T and c + g deq(W). deq(W) comes from an independent host decoder written from the formats'
// specification (lowcost/reference/quant: NF4 with the even element in the high nibble, block absmax,
// double-quantized absmax; int8 with a per-row scale; GGUF Q8_0, Q4_0, Q4_1 blocks), rounded to the
// activation dtype as the reference's dequantize_packed(..., dtype) rounds it. The packed codes are random
// bytes (padding included), so every code and nibble value occurs; identity activations check the decoded
// tile bit for bit.
#include "../checks.h"
#include "../dispatch.h"
#include "cuda_emulation.h"

#include "../cuda/dequant_launchers.h"  // the kernel and the ops' host side, as dequant_gemm.cu uses them
#include "emulated_exec.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using lowcost_emu::EmuExec;

// QLoRA's NF4 code book (Dettmers et al. 2023, appendix E), ascending.
const float kNf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// A quantized weight W (N, K): the packed tensors as the op takes them (stored tensors, then code books).
struct Packed {
  std::string scheme;
  int64_t N = 0, K = 0, block = 0;
  std::vector<at::Tensor> tensors;
};

int64_t padded(int64_t K, int64_t block) { return (K + block - 1) / block * block; }

Packed make_nf4(int64_t N, int64_t K, int64_t block, bool double_quant) {
  Packed p{double_quant ? "nf4-dq" : "nf4", N, K, block, {}};
  const int64_t Kp = padded(K, block), nb = Kp / block;
  const at::Tensor code = at::from_blob(const_cast<float*>(kNf4), {16}, at::kFloat).clone();
  p.tensors.push_back(at::randint(0, 256, {N, Kp / 2}, at::kByte));
  if (!double_quant) {
    p.tensors.push_back(at::rand({N, nb}, at::kFloat) + 0.25);
    p.tensors.push_back(code);
    return p;
  }
  p.tensors.push_back(at::randint(0, 256, {N, nb}, at::kByte));
  p.tensors.push_back(at::rand({(N * nb + 255) / 256}, at::kFloat) + 0.5);
  p.tensors.push_back(at::full({}, 0.125, at::kFloat));
  p.tensors.push_back(code);
  p.tensors.push_back(std::get<0>(at::sort(at::randn({256}, at::kFloat))));  // any 256-value table works
  return p;
}

Packed make_int8(int64_t N, int64_t K) {
  return {"int8", N, K, 0, {at::randint(-128, 128, {N, K}, at::kChar), at::rand({N}, at::kFloat) * 0.05 + 0.01}};
}

int gguf_type_size(const std::string& scheme) { return scheme == "q8_0" ? 34 : (scheme == "q4_0" ? 18 : 20); }

// A GGUF Q8_0 / Q4_0 / Q4_1 weight: random block bytes (every code occurs) whose float16 fields (d, and m for
// Q4_1) are set to finite values of either sign.
Packed make_gguf(const std::string& scheme, int64_t N, int64_t K) {
  const int ts = gguf_type_size(scheme);
  at::Tensor data = at::randint(0, 256, {N, K / 32 * ts}, at::kByte);
  auto* bytes = data.data_ptr<uint8_t>();
  const at::Tensor fields = (at::rand({N * K / 32, 2}, at::kFloat) - 0.3) * 0.05;
  for (int64_t b = 0; b < N * K / 32; ++b) {
    for (int f = 0; f < (scheme == "q4_1" ? 2 : 1); ++f) {
      const uint16_t bits = c10::Half(fields.data_ptr<float>()[2 * b + f]).x;
      bytes[b * ts + 2 * f] = static_cast<uint8_t>(bits & 0xFF);
      bytes[b * ts + 2 * f + 1] = static_cast<uint8_t>(bits >> 8);
    }
  }
  return {scheme, N, K, 32, {data}};
}

float half_at(const uint8_t* p) { return static_cast<float>(c10::Half(p[0] | (p[1] << 8), c10::Half::from_bits())); }

// GGUF spec: Q8_0 w = q d; Q4_0 w = (q - 8) d; Q4_1 w = q d + m; 4-bit element j of a block in the low nibble
// of code byte j (j < 16) or the high nibble of byte j - 16.
float gguf_value(const Packed& p, int64_t n, int64_t k) {
  const int ts = gguf_type_size(p.scheme);
  const uint8_t* block = p.tensors[0].data_ptr<uint8_t>() + n * (p.K / 32 * ts) + (k / 32) * ts;
  const int j = static_cast<int>(k % 32);
  const float d = half_at(block);
  if (p.scheme == "q8_0") return static_cast<float>(static_cast<int8_t>(block[2 + j])) * d;
  const uint8_t byte = block[ts - 16 + (j < 16 ? j : j - 16)];
  const float q = static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4));
  if (p.scheme == "q4_0") return (q - 8.0f) * d;
  const float scaled = q * d;
  return scaled + half_at(block + 2);
}

// The spec's float32 value of W[n, k].
float spec_value(const Packed& p, int64_t n, int64_t k) {
  if (p.scheme[0] == 'q') return gguf_value(p, n, k);
  if (p.scheme == "int8") {
    return static_cast<float>(p.tensors[0].data_ptr<int8_t>()[n * p.K + k]) * p.tensors[1].data_ptr<float>()[n];
  }
  const int64_t Kp = padded(p.K, p.block), nb = Kp / p.block, b = k / p.block;
  const uint8_t byte = p.tensors[0].data_ptr<uint8_t>()[n * (Kp / 2) + k / 2];
  const int nibble = k % 2 == 0 ? byte >> 4 : byte & 15;
  float absmax;
  if (p.scheme == "nf4") {
    absmax = p.tensors[1].data_ptr<float>()[n * nb + b];
  } else {
    const float dyn = p.tensors[5].data_ptr<float>()[p.tensors[1].data_ptr<uint8_t>()[n * nb + b]];
    const float scaled = dyn * p.tensors[2].data_ptr<float>()[(n * nb + b) / 256];
    absmax = scaled + p.tensors[3].data_ptr<float>()[0];
  }
  return kNf4[nibble] * absmax;
}

// deq(W) (N, K) rounded to dt (the compute dtype), as float64.
at::Tensor spec_dequantize(const Packed& p, c10::ScalarType dt) {
  at::Tensor w = at::empty({p.N, p.K}, at::kFloat);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t k = 0; k < p.K; ++k) w.data_ptr<float>()[n * p.K + k] = spec_value(p, n, k);
  return w.to(dt).to(at::kDouble);
}

at::Tensor emu_gemm(const at::Tensor& a, const Packed& p, const std::optional<at::Tensor>& c, bool dgrad) {
  EmuExec exec;
  if (dgrad) return lowcost::cuda::run_dequant_gemm<true>(a, p.tensors, p.scheme, p.K, p.block, c, exec);
  return lowcost::cuda::run_dequant_gemm<false>(a, p.tensors, p.scheme, p.N, p.block, c, exec);
}

// ---- checks ------------------------------------------------------------------------------------
int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what, const std::string& why) {
  ++g_failures;
  std::fprintf(stderr, "FAIL %s: %s\n", what.c_str(), why.c_str());
}

// Products of dt data are exact in the kernels (bf16 terms) and accumulate in fp32 over <= 256 terms; the
// result is rounded once to dt: half an ulp of the largest element is 2^-9 (bf16), 2^-12 (fp16), 2^-24 (fp32)
// relative to max |ref|. The bounds leave room for the fp32 accumulation.
double tolerance(c10::ScalarType dt) { return dt == at::kBFloat16 ? 8e-3 : (dt == at::kHalf ? 1e-3 : 1e-5); }

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, c10::ScalarType dt) {
  ++g_checks;
  if (!got.sizes().equals(want.sizes()) || got.scalar_type() != dt) return fail(what, "shape or dtype");
  if (got.numel() == 0) return;
  const at::Tensor g = got.to(at::kDouble);
  if (!at::isfinite(g).all().item<bool>()) return fail(what, "non-finite elements (unwritten outputs are NaN)");
  const double err = (g - want).abs().max().item<double>() / std::max(want.abs().max().item<double>(), 1e-30);
  if (err > tolerance(dt)) fail(what, "max normalised error " + std::to_string(err));
}

std::string label(const char* op, const Packed& p, int64_t M, c10::ScalarType dt, bool with_c, bool strided) {
  return std::string(op) + " " + p.scheme + " M=" + std::to_string(M) + " N=" + std::to_string(p.N) +
         " K=" + std::to_string(p.K) + " B=" + std::to_string(p.block) + " " + c10::toString(dt) +
         (with_c ? " +c" : "") + (strided ? " strided" : "");
}

// (rows, cols) in dt; strided: the transpose of a (cols, rows) tensor.
at::Tensor make(int64_t rows, int64_t cols, c10::ScalarType dt, bool strided) {
  return (strided ? at::randn({cols, rows}, at::kDouble).t() : at::randn({rows, cols}, at::kDouble)).to(dt);
}

// Forward and dgrad of one weight at M rows against float64, with and without c.
void check_weight(const Packed& p, int64_t M, c10::ScalarType dt, bool strided) {
  const at::Tensor w = spec_dequantize(p, dt);
  for (bool with_c : {false, true}) {
    const at::Tensor x = make(M, p.K, dt, strided), g = make(M, p.N, dt, strided);
    std::optional<at::Tensor> cy, cx;
    if (with_c) {
      cy = make(M, p.N, dt, false);
      cx = make(M, p.K, dt, true);  // the dgrad's c strided
    }
    at::Tensor want_y = at::mm(x.to(at::kDouble), w.t()), want_dx = at::mm(g.to(at::kDouble), w);
    if (with_c) {
      want_y += cy->to(at::kDouble);
      want_dx += cx->to(at::kDouble);
    }
    expect_close(label("dequant_gemm", p, M, dt, with_c, strided), emu_gemm(x, p, cy, false), want_y, dt);
    expect_close(label("dequant_gemm_dgrad", p, M, dt, with_c, strided), emu_gemm(g, p, cx, true), want_dx, dt);
  }
}

// Odd shapes: M = 1 and M off the 64-row tile, N and K off the 64-wide tiles, K padded to the NF4 block,
// double-quantized absmax whose 256-block groups straddle rows, int8 rows not 16-byte aligned.
void test_against_float64() {
  for (c10::ScalarType dt : {at::kBFloat16, at::kHalf}) {
    check_weight(make_nf4(70, 96, 32, false), 1, dt, false);
    check_weight(make_nf4(65, 80, 32, false), 67, dt, false);   // K = 80 padded to 96
    check_weight(make_nf4(33, 128, 64, false), 130, dt, true);
    check_weight(make_nf4(70, 200, 64, true), 5, dt, false);    // Kp = 256: 4 blocks a row, groups of 256 blocks
    check_weight(make_nf4(129, 72, 8, true), 66, dt, true);     // 9 blocks a row
    check_weight(make_int8(9, 13), 1, dt, false);
    check_weight(make_int8(100, 70), 67, dt, true);
    check_weight(make_gguf("q8_0", 70, 96), 1, dt, false);
    check_weight(make_gguf("q4_0", 65, 160), 67, dt, true);
    check_weight(make_gguf("q4_1", 33, 64), 130, dt, false);
  }
  check_weight(make_nf4(65, 80, 32, true), 3, at::kFloat, false);  // fp32 activations: the FMA path
  check_weight(make_int8(20, 30), 7, at::kFloat, true);
}

// x = I (forward) and g = I (dgrad): each output element is one product 1 * w, exact, so the kernels'
// outputs are deq(W)^T and deq(W) bit for bit: a wrong nibble order, block or scale index shows.
void test_decode_bit_for_bit() {
  const Packed weights[] = {make_nf4(70, 80, 32, false), make_nf4(66, 200, 64, true), make_int8(67, 75),
                            make_gguf("q8_0", 70, 96),      make_gguf("q4_0", 66, 64),    make_gguf("q4_1", 65, 96)};
  for (const Packed& p : weights) {
    for (c10::ScalarType dt : {at::kBFloat16, at::kHalf}) {
      const at::Tensor w = spec_dequantize(p, dt).to(dt);
      ++g_checks;
      if (!at::equal(emu_gemm(at::eye(p.K, dt), p, std::nullopt, false), w.t().contiguous())) {
        fail(label("decode (x = I)", p, p.K, dt, false, false), "not deq(W)^T bit for bit");
      }
      ++g_checks;
      if (!at::equal(emu_gemm(at::eye(p.N, dt), p, std::nullopt, true), w)) {
        fail(label("decode (g = I)", p, p.N, dt, false, false), "not deq(W) bit for bit");
      }
    }
  }
}

// M = 0 gives an empty output; bad input is refused with a message naming the argument.
void test_edges_and_bad_input() {
  const Packed p = make_nf4(10, 64, 32, false);
  ++g_checks;
  if (emu_gemm(at::empty({0, 64}, at::kBFloat16), p, std::nullopt, false).sizes() != at::IntArrayRef({0, 10})) {
    fail("dequant_gemm M=0", "output is not (0, N)");
  }
  const auto expect_error = [](const std::string& what, const std::string& needle, auto&& call) {
    ++g_checks;
    try {
      call();
      fail(what, "no error");
    } catch (const c10::Error& e) {
      if (std::string(e.what()).find(needle) == std::string::npos) fail(what, std::string("message: ") + e.what());
    }
  };
  const at::Tensor x = at::randn({3, 64}).to(at::kBFloat16);
  Packed q4 = p;
  q4.scheme = "q4_k";
  expect_error("unknown scheme", "scheme must be 'nf4', 'nf4-dq', 'int8', 'q8_0', 'q4_0' or 'q4_1'",
               [&] { emu_gemm(x, q4, std::nullopt, false); });
  const Packed q8 = make_gguf("q8_0", 4, 64);
  expect_error("GGUF K", "K must be a multiple of 32",
               [&] { emu_gemm(at::randn({3, 48}).to(at::kBFloat16), q8, std::nullopt, false); });
  Packed short_list = p;
  short_list.tensors.pop_back();
  expect_error("missing code book", "3 packed tensors", [&] { emu_gemm(x, short_list, std::nullopt, false); });
  expect_error("K mismatch", "codes must be (N, Kp / 2)",
               [&] { emu_gemm(at::randn({3, 100}).to(at::kBFloat16), p, std::nullopt, false); });
  expect_error("c shape", "c must be (3, 10)", [&] { emu_gemm(x, p, at::zeros({3, 9}, at::kBFloat16), false); });
}

// Two runs are bitwise identical (no split reduction, no atomics).
void test_bitwise_reproducible() {
  const Packed p = make_nf4(70, 200, 64, true);
  const at::Tensor x = make(130, 200, at::kBFloat16, false);
  ++g_checks;
  if (!at::equal(emu_gemm(x, p, std::nullopt, false), emu_gemm(x, p, std::nullopt, false))) {
    fail("dequant_gemm run to run", "not identical");
  }
}

}  // namespace

// test_dequant_gemm_emulated [NAME]: every test, or those whose name contains NAME.
int main(int argc, char** argv) {
  at::manual_seed(0);
  at::set_num_threads(1);
  const std::pair<const char*, void (*)()> tests[] = {{"against_float64", test_against_float64},
                                                       {"decode_bit_for_bit", test_decode_bit_for_bit},
                                                       {"edges_and_bad_input", test_edges_and_bad_input},
                                                       {"bitwise_reproducible", test_bitwise_reproducible}};
  for (const auto& test : tests) {
    if (argc < 2 || std::string(test.first).find(argv[1]) != std::string::npos) test.second();
  }
  if (g_failures != 0) {
    std::fprintf(stderr, "%d of %d check(s) failed\n", g_failures, g_checks);
    return EXIT_FAILURE;
  }
  std::printf("test_dequant_gemm_emulated: all %d checks passed\n", g_checks);
  return EXIT_SUCCESS;
}
