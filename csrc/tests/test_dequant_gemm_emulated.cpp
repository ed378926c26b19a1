// Runs the dequantizing GEMMs of csrc/cuda/dequant_gemm_kernels.cuh on the host under the emulated CUDA
// execution model (cuda_emulation.h: a fiber per CUDA thread, barriers, NaN-filled shared memory, cp.async
// queued until its wait, mma.sync from the lanes' fragments as the PTX ISA lays them out), through the same
// host code the GPU runs (csrc/cuda/dequant_launchers.h), and compares them with a float64 reference of
// c + x deq(W)^T and c + g deq(W). deq(W) comes from an independent host decoder written from the formats'
// specification (lowcost/reference/quant: NF4 with the even element in the high nibble, block absmax,
// double-quantized absmax; int8 with a per-row scale; GGUF Q8_0, Q4_0, Q4_1 blocks and Q4_K, Q6_K
// super-blocks, the latter decoded a super-block at a time in the loop order of ggml's reference), rounded to
// the activation dtype as the reference's dequantize_packed(..., dtype) rounds it. The packed codes are random
// bytes (padding included), so every code and nibble value occurs; identity activations check the decoded
// tile bit for bit. The k-quant decoder itself is checked against known answers of the `gguf` package
// (test_kquant_known_answers; tests/csrc/test_kquant_known_answers.py checks that table against gguf).
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

bool is_k_quant(const std::string& scheme) { return scheme == "q4_k" || scheme == "q6_k"; }

// GGUF spec: bytes and elements of a block.
int gguf_type_size(const std::string& scheme) {
  if (scheme == "q4_k") return 144;
  if (scheme == "q6_k") return 210;
  return scheme == "q8_0" ? 34 : (scheme == "q4_0" ? 18 : 20);
}

int64_t gguf_block(const std::string& scheme) { return is_k_quant(scheme) ? 256 : 32; }

// Byte offsets of a block's float16 fields: d (Q8_0, Q4_0), d and m (Q4_1), d and dmin (Q4_K), d (Q6_K).
std::vector<int> gguf_f16_fields(const std::string& scheme) {
  if (scheme == "q4_1" || scheme == "q4_k") return {0, 2};
  return {scheme == "q6_k" ? 208 : 0};
}

void put_half(uint8_t* p, uint16_t bits) {
  p[0] = static_cast<uint8_t>(bits & 0xFF);
  p[1] = static_cast<uint8_t>(bits >> 8);
}

// A GGUF weight: random block bytes (every code, 6-bit scale and min, int8 scale occurs) whose float16 fields
// are set to finite values of either sign.
Packed make_gguf(const std::string& scheme, int64_t N, int64_t K) {
  const int ts = gguf_type_size(scheme);
  const int64_t block = gguf_block(scheme), blocks = N * K / block;
  at::Tensor data = at::randint(0, 256, {N, K / block * ts}, at::kByte);
  auto* bytes = data.data_ptr<uint8_t>();
  const at::Tensor fields = (at::rand({blocks, 2}, at::kFloat) - 0.3) * 0.05;
  for (int64_t b = 0; b < blocks; ++b) {
    int f = 0;
    for (int offset : gguf_f16_fields(scheme)) {
      put_half(bytes + b * ts + offset, c10::Half(fields.data_ptr<float>()[2 * b + f++]).x);
    }
  }
  return {scheme, N, K, block, {data}};
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

// GGUF spec of the Q4_K scale and min of sub-block j (6 bits each, packed in 12 bytes q).
void q4_k_scale_min(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// One Q4_K super-block (144 bytes) to y[0, 256), in ggml's loop order: per 64 elements two sub-blocks of 32,
// the low nibbles of 32 code bytes then their high nibbles; w = (d sc) q - (dmin m).
void spec_q4_k_block(const uint8_t* x, float* y) {
  const float d = half_at(x), dmin = half_at(x + 2);
  const uint8_t* q = x + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    q4_k_scale_min(is, x + 4, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    q4_k_scale_min(is + 1, x + 4, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      const float scaled = d1 * static_cast<float>(q[l] & 0xF);
      *y++ = scaled - m1;
    }
    for (int l = 0; l < 32; ++l) {
      const float scaled = d2 * static_cast<float>(q[l] >> 4);
      *y++ = scaled - m2;
    }
  }
}

// One Q6_K super-block (210 bytes) to y[0, 256), in ggml's loop order: per 128 elements, 64 ql bytes (low
// nibbles, then high), 32 qh bytes (2 bits each for the four 32-element quarters), 8 int8 scales of 16
// elements; w = (d sc) (q - 32).
void spec_q6_k_block(const uint8_t* x, float* y) {
  const float d = half_at(x + 208);
  const uint8_t* ql = x;
  const uint8_t* qh = x + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
  }
}

// Row n of a Q4_K / Q6_K weight, (K,) float32.
void spec_k_quant_row(const Packed& p, int64_t n, float* row) {
  const int ts = gguf_type_size(p.scheme);
  const uint8_t* x = p.tensors[0].data_ptr<uint8_t>() + n * (p.K / 256 * ts);
  for (int64_t b = 0; b < p.K / 256; ++b) {
    if (p.scheme == "q4_k") {
      spec_q4_k_block(x + b * ts, row + b * 256);
    } else {
      spec_q6_k_block(x + b * ts, row + b * 256);
    }
  }
}

// The spec's float32 value of W[n, k] (formats other than the k-quants).
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
  for (int64_t n = 0; n < p.N; ++n) {
    float* row = w.data_ptr<float>() + n * p.K;
    if (is_k_quant(p.scheme)) {
      spec_k_quant_row(p, n, row);
      continue;
    }
    for (int64_t k = 0; k < p.K; ++k) row[k] = spec_value(p, n, k);
  }
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
    // k-quants: super-blocks of 256 (one, three a row), N off the 64-row tile, M = 0, 1 and off the tile.
    check_weight(make_gguf("q4_k", 70, 256), 0, dt, false);
    check_weight(make_gguf("q4_k", 33, 768), 67, dt, true);
    check_weight(make_gguf("q4_k", 129, 256), 1, dt, false);
    check_weight(make_gguf("q6_k", 70, 768), 1, dt, false);
    check_weight(make_gguf("q6_k", 65, 256), 130, dt, true);
    check_weight(make_gguf("q6_k", 9, 256), 0, dt, true);
  }
  check_weight(make_nf4(65, 80, 32, true), 3, at::kFloat, false);  // fp32 activations: the FMA path
  check_weight(make_int8(20, 30), 7, at::kFloat, true);
  check_weight(make_gguf("q4_k", 17, 256), 5, at::kFloat, false);
  check_weight(make_gguf("q6_k", 17, 512), 5, at::kFloat, true);
}

// x = I (forward) and g = I (dgrad): each output element is one product 1 * w, exact, so the kernels'
// outputs are deq(W)^T and deq(W) bit for bit: a wrong nibble order, block or scale index shows.
void test_decode_bit_for_bit() {
  const Packed weights[] = {make_nf4(70, 80, 32, false), make_nf4(66, 200, 64, true), make_int8(67, 75),
                            make_gguf("q8_0", 70, 96),      make_gguf("q4_0", 66, 64),    make_gguf("q4_1", 65, 96),
                            make_gguf("q4_k", 70, 512),     make_gguf("q6_k", 65, 512)};
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
  Packed q5 = p;
  q5.scheme = "q5_k";
  expect_error("unknown scheme", "scheme must be 'nf4', 'nf4-dq', 'int8', 'q8_0', 'q4_0', 'q4_1', 'q4_k' or 'q6_k'",
               [&] { emu_gemm(x, q5, std::nullopt, false); });
  const Packed q8 = make_gguf("q8_0", 4, 64);
  expect_error("GGUF K", "K must be a multiple of 32",
               [&] { emu_gemm(at::randn({3, 48}).to(at::kBFloat16), q8, std::nullopt, false); });
  for (const char* scheme : {"q4_k", "q6_k"}) {  // K = 288: whole 32-element blocks, not whole super-blocks
    const Packed k_quant = make_gguf(scheme, 4, 256);
    expect_error(std::string("GGUF K ") + scheme, "weight holds whole 256-element blocks: K must be a multiple of "
                 "256, got 288", [&] { emu_gemm(at::randn({3, 288}).to(at::kBFloat16), k_quant, std::nullopt, false); });
    expect_error(std::string("GGUF K dgrad ") + scheme, "K must be a multiple of 256, got 288", [&] {
      EmuExec exec;
      lowcost::cuda::run_dequant_gemm<true>(at::randn({3, 4}).to(at::kBFloat16), k_quant.tensors, scheme, 288, 256,
                                            std::nullopt, exec);
    });
    expect_error(std::string("GGUF data ") + scheme, "packed tensor data must have shape [4, " +
                 std::to_string(2 * gguf_type_size(scheme)) + "]", [&] {
      emu_gemm(at::randn({3, 512}).to(at::kBFloat16), k_quant, std::nullopt, false);
    });
  }
  Packed short_list = p;
  short_list.tensors.pop_back();
  expect_error("missing code book", "3 packed tensors", [&] { emu_gemm(x, short_list, std::nullopt, false); });
  expect_error("K mismatch", "codes must be (N, Kp / 2)",
               [&] { emu_gemm(at::randn({3, 100}).to(at::kBFloat16), p, std::nullopt, false); });
  expect_error("c shape", "c must be (3, 10)", [&] { emu_gemm(x, p, at::zeros({3, 9}, at::kBFloat16), false); });
}

// Known answers of the host k-quant decoder: one super-block of fixed bytes (byte i = (73 i + 41) mod 256, then
// the float16 fields), and its values at two elements of each Q4_K sub-block and one of each Q6_K scale group,
// as gguf.quants.dequantize (the `gguf` package: the file format's Python reference) decodes the same bytes.
// tests/csrc/test_kquant_known_answers.py rebuilds the bytes and checks this table against gguf.
const std::pair<int, float> kQ4KKnown[] = {
    {2, 0x1.7d11cp+3f},   {21, 0x1.5a3d8p+2f},  {34, 0x1.7e27p+2f},   {41, 0x1.7e27p+2f},
    {79, -0x1.2b7p-3f},   {80, 0x1.bbf3ap+4f},  {119, 0x1.768c8p+4f}, {124, 0x1.9b384p+5f},
    {137, 0x1.3c6c6p+4f}, {158, 0x1.af4bcp+3f}, {165, 0x1.9666ep+4f}, {182, 0x1.734fcp+3f},
    {195, 0x1.5e5acp+4f}, {204, 0x1.b6554p+4f}, {240, -0x1.1ef6p+0f}, {243, -0x1.1ef6p+0f}};
const std::pair<int, float> kQ6KKnown[] = {
    {3, -0x1.5e4dp+5f},   {24, 0x1.97f58p+5f},  {45, -0x1.f5ca2p+7f}, {50, 0x1.6701p+5f},
    {71, -0x1.c49p+0f},   {92, -0x1.763cp+3f},  {97, 0x1.49c45p+7f},  {118, 0x1.395p+5f},
    {139, 0x1.0a888p+6f}, {144, 0x1.d0878p+5f}, {165, -0x1.4bce8p+5f}, {186, 0x1.7a96p+4f},
    {207, 0x1.ce5a8p+4f}, {212, 0x1.c51b4p+6f}, {233, -0x1.97f58p+4f}, {254, 0x1.87a4p+5f}};
constexpr uint16_t kQ4KD = 0x2E66, kQ4KDmin = 0x2A3D, kQ6KD = 0xAC5A;

// The known-answer super-block of `scheme` as a (1, 256) weight.
Packed known_answer_block(const std::string& scheme) {
  const int ts = gguf_type_size(scheme);
  at::Tensor data = at::empty({1, ts}, at::kByte);
  uint8_t* bytes = data.data_ptr<uint8_t>();
  for (int i = 0; i < ts; ++i) bytes[i] = static_cast<uint8_t>((73 * i + 41) % 256);
  if (scheme == "q4_k") {
    put_half(bytes, kQ4KD);
    put_half(bytes + 2, kQ4KDmin);
  } else {
    put_half(bytes + 208, kQ6KD);
  }
  return {scheme, 1, 256, 256, {data}};
}

void test_kquant_known_answers() {
  const auto check = [](const std::string& scheme, const auto& known) {
    const Packed p = known_answer_block(scheme);
    const at::Tensor w = spec_dequantize(p, at::kFloat);
    for (const auto& [index, value] : known) {
      ++g_checks;
      const double got = w[0][index].template item<double>();
      if (got != static_cast<double>(value)) {
        fail(scheme + " known answer at element " + std::to_string(index),
             "host decoder " + std::to_string(got) + ", gguf " + std::to_string(value));
      }
    }
    // The kernel decodes the same block to the host decoder's values rounded to fp16 (g = I: the dgrad is deq(W)).
    ++g_checks;
    if (!at::equal(emu_gemm(at::eye(1, at::kHalf), p, std::nullopt, true), w.to(at::kHalf))) {
      fail(scheme + " known-answer block through dequant_gemm_dgrad", "not the host decoder's values");
    }
  };
  check("q4_k", kQ4KKnown);
  check("q6_k", kQ6KKnown);
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
                                                       {"kquant_known_answers", test_kquant_known_answers},
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
