// Runs the CUDA kernels of csrc/cuda/*_kernels.cuh on the host and compares them with the CPU ops.
//
// The machines that build lowcost in CI have no GPU, so the kernels are compiled here as plain C++
// under the emulated execution model of cuda_emulation.h: one cooperative fiber per CUDA thread,
// barriers, dynamic shared memory filled with NaN, cp.async queued until its wait, and the warp-level
// mma.sync computed from the lanes' fragments exactly as the PTX ISA lays them out. This checks the
// kernels' index arithmetic, tiling, fragment layouts, masks, pipelines, barriers and fixed-order
// reductions, not their speed. The ops' host side (checks, allocation, workspaces, early exits,
// dispatch, launch plans) is csrc/cuda/host_launchers.h, the same code the .cu files run; outputs and
// workspaces the GPU would leave uninitialised start as NaN here, so an element no thread writes is
// caught. A first test checks the emulated mma and the operand loaders against plain matrix products.
#include "../checks.h"
#include "../cpu/ops_cpu.h"
#include "../dispatch.h"
#include "../philox.h"
#include "cuda_emulation.h"

#include "../cuda/host_launchers.h"  // the kernels' headers and the ops' host side, as the .cu files use them
#include "emulated_exec.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using lowcost::cuda::LaunchGrid;
using lowcost_emu::EmuExec;

// ---- the ops, through the same host code as csrc/cuda/*.cu ----------------------------------------
// `sms` sets the SM count the launch plans fill: 132 (H200) splits small problems into many blocks and
// partials; 1 gives few blocks with several tiles each.
at::Tensor emu_philox_dropout(const at::Tensor& x, int64_t seed, double p, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_philox_dropout(x, seed, p, exec);
}

at::Tensor emu_lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_down(x, lora_a, seed, p, exec);
}

at::Tensor emu_lora_down_grouped(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks,
                                 at::IntArrayRef seeds, at::ArrayRef<double> p, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_down_grouped(x, lora_a, ranks, seeds, p, exec);
}

at::Tensor emu_lora_up(const at::Tensor& u, const at::Tensor& lora_b, const std::optional<at::Tensor>& bias,
                       double scale, c10::ScalarType dtype) {
  EmuExec exec;
  return lowcost::cuda::run_lora_up(u, lora_b, bias, scale, dtype, exec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_lora_grad_pass(const at::Tensor& grad_y, const at::Tensor& u,
                                                                  const at::Tensor& lora_b, double scale,
                                                                  bool need_dbias, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_grad_pass(grad_y, u, lora_b, scale, need_dbias, exec);
}

std::tuple<at::Tensor, at::Tensor> emu_lora_dx_da(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                                                  int64_t seed, double p, bool need_dx, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_dx_da(x, du, lora_a, seed, p, need_dx, exec);
}

std::tuple<at::Tensor, at::Tensor> emu_lora_dx_da_grouped(const at::Tensor& x, const at::Tensor& du,
                                                          const at::Tensor& lora_a, at::IntArrayRef ranks,
                                                          at::IntArrayRef seeds, at::ArrayRef<double> p, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_dx_da_grouped(x, du, lora_a, ranks, seeds, p, exec);
}

at::Tensor emu_gated_act_mul(const at::Tensor& gate, const at::Tensor& up, const char* act, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_gated_act_mul(gate, up, act, exec);
}

std::tuple<at::Tensor, at::Tensor> emu_gated_act_mul_backward(const at::Tensor& dh, const at::Tensor& gate,
                                                              const at::Tensor& up, const char* act, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_gated_act_mul_backward(dh, gate, up, act, exec);
}

at::Tensor emu_softmax_xent_rows(at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& row_weight,
                                 int64_t ignore_index, double smoothing, double softcap, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_softmax_xent_rows(z, labels, row_weight, ignore_index, smoothing, softcap, exec);
}

// ---- checks ------------------------------------------------------------------------------------
int g_failures = 0;
int g_checks = 0;

double tolerance(c10::ScalarType t) {
  return t == at::kFloat ? 2e-5 : (t == at::kHalf ? 2e-3 : 1e-2);
}

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, c10::ScalarType tol_type) {
  ++g_checks;
  if (!got.sizes().equals(want.sizes()) || got.scalar_type() != want.scalar_type()) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: shape/dtype %s %s vs %s %s\n", what.c_str(), c10::str(got.sizes()).c_str(),
                 c10::toString(got.scalar_type()), c10::str(want.sizes()).c_str(), c10::toString(want.scalar_type()));
    return;
  }
  if (got.numel() == 0) return;
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (!at::isfinite(g).all().item<bool>()) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: non-finite elements (unwritten outputs start as NaN)\n", what.c_str());
    return;
  }
  const double denom = std::max(w.abs().max().item<double>(), 1e-30);
  const double err = (g - w).abs().max().item<double>() / denom;
  if (err > tolerance(tol_type)) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: max normalised error %.3e > %.1e\n", what.c_str(), err, tolerance(tol_type));
  }
}

void expect_equal(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  ++g_checks;
  if (!got.sizes().equals(want.sizes()) || !at::equal(got, want)) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s: not identical\n", what.c_str());
  }
}

std::string name(const char* op, int64_t a, int64_t b, int64_t c, c10::ScalarType dt, c10::ScalarType adt,
                 bool transposed, double p) {
  return std::string(op) + "(" + std::to_string(a) + "," + std::to_string(b) + "," + std::to_string(c) + ") " +
         c10::toString(dt) + "/" + c10::toString(adt) + (transposed ? " strided" : " contiguous") +
         " p=" + std::to_string(p);
}

// (rows, cols) in dtype; transposed: a (cols, rows) tensor viewed as (rows, cols).
at::Tensor make(int64_t rows, int64_t cols, c10::ScalarType dt, bool transposed) {
  at::Tensor t = transposed ? at::randn({cols, rows}, at::kDouble).t() : at::randn({rows, cols}, at::kDouble);
  return t.to(dt);  // .to keeps the strides of a transposed view
}

struct DtypePair {
  c10::ScalarType act, adapter;
};
const DtypePair kPairs[] = {{at::kFloat, at::kFloat},
                            {at::kBFloat16, at::kBFloat16},
                            {at::kHalf, at::kHalf},
                            {at::kBFloat16, at::kFloat}};

// ---- the warp-level mma and its operands --------------------------------------------------------
// Element i of a lane's fragments, written from the PTX ISA's text for mma.m16n8k16 (.bf16, fp32
// accumulators) independently of mma.cuh: (row, column) of a_i (i < 8), b_i (i < 4) and c_i (i < 4).
int isa_a_row(int lane, int i) { return (lane >> 2) + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8); }
int isa_a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
int isa_b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
int isa_b_col(int lane, int) { return lane >> 2; }
int isa_c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int isa_c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

uint32_t bf16_pair(const c10::BFloat16* m, int ld, int r0, int c0, int r1, int c1) {
  return static_cast<uint32_t>(m[r0 * ld + c0].x) | (static_cast<uint32_t>(m[r1 * ld + c1].x) << 16);
}

// D = C + A B (16 x 16 times 16 x 8) by one emulated mma whose fragments follow the ISA text.
void test_mma_fragment_layout() {
  const at::Tensor A = at::randn({16, 16}, at::kDouble).to(at::kBFloat16);
  const at::Tensor B = at::randn({16, 8}, at::kDouble).to(at::kBFloat16);
  const at::Tensor C = at::randn({16, 8}, at::kFloat);
  at::Tensor D = at::full({16, 8}, std::numeric_limits<float>::quiet_NaN(), at::kFloat);
  const auto* a = A.data_ptr<c10::BFloat16>();
  const auto* b = B.data_ptr<c10::BFloat16>();
  lowcost_emu::run_grid({1, 1, 1}, 0, [&] {
    const int lane = static_cast<int>(threadIdx.x);
    if (lane >= 32) return;  // warp 0 only (warp-uniform)
    lowcost::cuda::FragA fa;
    lowcost::cuda::FragB fb;
    lowcost::cuda::FragC fc;
    for (int k = 0; k < 4; ++k) {
      fa.x[k] = bf16_pair(a, 16, isa_a_row(lane, 2 * k), isa_a_col(lane, 2 * k), isa_a_row(lane, 2 * k + 1),
                          isa_a_col(lane, 2 * k + 1));
    }
    for (int k = 0; k < 2; ++k) {
      fb.x[k] = bf16_pair(b, 8, isa_b_row(lane, 2 * k), isa_b_col(lane, 2 * k), isa_b_row(lane, 2 * k + 1),
                          isa_b_col(lane, 2 * k + 1));
    }
    for (int i = 0; i < 4; ++i) fc.x[i] = C.data_ptr<float>()[isa_c_row(lane, i) * 8 + isa_c_col(lane, i)];
    lowcost::cuda::mma_bf16_16816(fc, fa, fb);
    for (int i = 0; i < 4; ++i) D.data_ptr<float>()[isa_c_row(lane, i) * 8 + isa_c_col(lane, i)] = fc.x[i];
  });
  expect_close("mma.m16n8k16 fragments (PTX ISA layout)", D, (C.to(at::kDouble) + at::mm(A.to(at::kDouble), B.to(at::kDouble))).to(at::kFloat), at::kFloat);
}

// The operand loaders of mma.cuh: a 16 x 16 A block and a 16 x 8 B block of T staged row-major or
// transposed with padded leading dimensions, multiplied by mma() (tensor-core terms, or FMAs when
// Mma is false), against the float64 product of the same values.
template <typename T, bool Mma, bool TransA, bool TransB>
void check_operands(c10::ScalarType dt) {
  constexpr int LD = 24;  // padded leading dimension of both staged blocks
  const at::Tensor A = at::randn({16, 16}, at::kDouble).to(dt), B = at::randn({16, 8}, at::kDouble).to(dt);
  std::vector<T> sa(16 * LD), sb(16 * LD);
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) sa[TransA ? k * LD + i : i * LD + k] = A.data_ptr<T>()[i * 16 + k];
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) sb[TransB ? n * LD + k : k * LD + n] = B.data_ptr<T>()[k * 8 + n];
  at::Tensor D = at::full({16, 8}, std::numeric_limits<float>::quiet_NaN(), at::kFloat);
  lowcost_emu::run_grid({1, 1, 1}, 0, [&] {
    if (threadIdx.x >= 32) return;
    lowcost::cuda::FragC acc;
    lowcost::cuda::zero(acc);
    const auto op_a = lowcost::cuda::load_operand_a<Mma, TransA ? 1 : LD, TransA ? LD : 1>(sa.data());
    const auto op_b = lowcost::cuda::load_operand_b<Mma, TransB ? 1 : LD, TransB ? LD : 1>(sb.data());
    lowcost::cuda::mma(acc, op_a, op_b);
    for (int i = 0; i < 4; ++i) D.data_ptr<float>()[lowcost::cuda::frag_c_row(i) * 8 + lowcost::cuda::frag_c_col(i)] = acc.x[i];
  });
  const std::string what = std::string("operands ") + c10::toString(dt) + (Mma ? " mma" : " fma") +
                           (TransA ? " A^T" : " A") + (TransB ? " B^T" : " B");
  expect_close(what, D, at::mm(A.to(at::kDouble), B.to(at::kDouble)).to(at::kFloat), at::kFloat);
}

void test_mma_operands() {
  check_operands<c10::BFloat16, true, false, false>(at::kBFloat16);
  check_operands<c10::BFloat16, true, true, true>(at::kBFloat16);
  check_operands<c10::Half, true, false, true>(at::kHalf);
  check_operands<c10::Half, true, true, false>(at::kHalf);
  check_operands<float, true, false, false>(at::kFloat);  // fp32 split into bf16 hi + lo
  check_operands<float, true, true, true>(at::kFloat);
  check_operands<float, false, true, false>(at::kFloat);  // the FMA path
  check_operands<float, false, false, true>(at::kFloat);
}

void test_philox_dropout() {
  const int64_t seeds[] = {0, (int64_t{1} << 32) + 17};
  const int64_t shapes[][2] = {{1, 1}, {7, 13}, {129, 33}, {3, 1000}, {64, 64}};
  for (c10::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& s : shapes) {
      for (bool transposed : {false, true}) {
        for (int64_t seed : seeds) {
          const at::Tensor x = make(s[0], s[1], dt, transposed);
          // sms = 1 forces a grid-stride loop with several trips on the larger shapes.
          expect_equal(name("philox_dropout", s[0], s[1], seed, dt, dt, transposed, 0.3),
                       emu_philox_dropout(x, seed, 0.3, 1), lowcost::cpu::philox_dropout(x, seed, 0.3));
        }
      }
    }
  }
}

// Shapes: M = 0 and 1, ranks 1, 7, 16, 20, 64 and 70 (two rank chunks), K and N off the tiles,
// odd K (rows not 16-byte aligned: the scalar staging path) and K a multiple of 8 with a partial last
// tile (16-byte chunks, zero-filled past K).
void test_lora_down() {
  const int64_t cases[][3] = {{0, 13, 4},   {1, 13, 1},    {7, 45, 7},   {129, 33, 16},
                              {64, 136, 64}, {70, 24, 70}, {130, 200, 20}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool transposed : {false, true}) {
        for (double p : {0.0, 0.3}) {
          const at::Tensor x = make(c[0], c[1], dp.act, transposed);
          const at::Tensor a = make(c[2], c[1], dp.adapter, false);
          const int64_t seed = (int64_t{5} << 32) + 3;
          const at::Tensor want = lowcost::cpu::lora_down(x, a, seed, p);
          for (int64_t sms : {1, 132}) {  // one K split; several (partials + sum_partials)
            expect_close(name("lora_down", c[0], c[1], c[2], dp.act, dp.adapter, transposed, p) + " sms " +
                             std::to_string(sms),
                         emu_lora_down(x, a, seed, p, sms), want, at::kFloat);
          }
        }
      }
    }
  }
}

// P projections over one x: the emulated grouped kernel equals, to the bit, the emulated lora_down of each
// projection concatenated (same K splits and K-term order per fragment; every r_i <= 64), and the CPU op (itself
// bitwise the CPU lora_down calls) within the fp32 tolerance. Ranks 5 and 16 mixed (several projections in one
// rank chunk, a projection across two chunks, a rank-0 projection), dropout 0 on some projections; M = 0 and 1,
// K = 100 (odd tiles), strided x, 1 SM (one split) and 132 (partials + sum_partials).
void test_lora_down_grouped() {
  struct Group {
    std::vector<int64_t> ranks;
    std::vector<double> p;
  };
  const Group groups[] = {{{5, 16, 5}, {0.1, 0.0, 0.3}},
                          {{16, 16, 16, 16, 5}, {0.2, 0.0, 0.5, 0.1, 0.25}},  // 9 fragments: 2 chunks
                          {{7, 0, 64}, {0.3, 0.2, 0.1}},
                          {{20}, {0.0}}};
  const int64_t shapes[][2] = {{0, 13}, {1, 100}, {7, 100}, {129, 33}, {70, 136}};
  for (const DtypePair& dp : kPairs) {
    for (const Group& grp : groups) {
      int64_t total = 0;
      for (int64_t r : grp.ranks) total += r;
      std::vector<int64_t> seeds;
      for (size_t i = 0; i < grp.ranks.size(); ++i) seeds.push_back((int64_t{7} << 32) + 11 * static_cast<int64_t>(i));
      for (const auto& s : shapes) {
        for (bool transposed : {false, true}) {
          const at::Tensor x = make(s[0], s[1], dp.act, transposed);
          const at::Tensor a = make(total, s[1], dp.adapter, false);
          const at::Tensor want_cpu = lowcost::cpu::lora_down_grouped(x, a, grp.ranks, seeds, grp.p);
          const std::string n = name("lora_down_grouped", s[0], s[1], total, dp.act, dp.adapter, transposed,
                                     grp.p[0]) + " P " + std::to_string(grp.ranks.size());
          for (int64_t sms : {1, 132}) {
            std::vector<at::Tensor> parts;
            int64_t row = 0;
            for (size_t i = 0; i < grp.ranks.size(); ++i) {
              parts.push_back(emu_lora_down(x, a.narrow(0, row, grp.ranks[i]), seeds[i], grp.p[i], sms));
              row += grp.ranks[i];
            }
            const at::Tensor got = emu_lora_down_grouped(x, a, grp.ranks, seeds, grp.p, sms);
            const std::string ns = n + " sms " + std::to_string(sms);
            expect_equal(ns + " vs P emulated lora_down", got, at::cat(parts, 1));
            expect_close(ns + " vs CPU", got, want_cpu, at::kFloat);
          }
        }
      }
    }
  }
}

// lora_dx_da_grouped against P emulated lora_dx_da calls (dA_i bitwise for r_i <= 64, close beyond) and the CPU op
// (t and dA within the dtype's tolerance, t's zeros where every projection dropped the element).
void test_lora_dx_da_grouped() {
  struct Group {
    std::vector<int64_t> ranks;
    std::vector<double> p;
  };
  const Group groups[] = {{{5, 16, 5}, {0.1, 0.0, 0.3}},
                          {{7, 0, 64}, {0.3, 0.2, 0.1}},  // a rank 0, RT 64
                          {{20}, {0.0}},
                          {{70, 16}, {0.2, 0.4}}};  // r > 64: two rank chunks
  const int64_t shapes[][2] = {{0, 13}, {1, 100}, {7, 100}, {129, 33}, {200, 72}};
  for (const DtypePair& dp : kPairs) {
    for (const Group& grp : groups) {
      int64_t total = 0;
      for (int64_t r : grp.ranks) total += r;
      std::vector<int64_t> seeds;
      for (size_t i = 0; i < grp.ranks.size(); ++i) seeds.push_back((int64_t{5} << 32) + 13 * static_cast<int64_t>(i));
      for (const auto& s : shapes) {
        for (bool transposed : {false, true}) {
          const at::Tensor x = make(s[0], s[1], dp.act, transposed);
          const at::Tensor du = make(s[0], total, at::kFloat, true);
          const at::Tensor a = make(total, s[1], dp.adapter, false);
          at::Tensor t_c, dA_c, t, dA;
          std::tie(t_c, dA_c) = lowcost::cpu::lora_dx_da_grouped(x, du, a, grp.ranks, seeds, grp.p);
          const std::string n = name("lora_dx_da_grouped", s[0], s[1], total, dp.act, dp.adapter, transposed,
                                     grp.p[0]) + " P " + std::to_string(grp.ranks.size());
          for (int64_t sms : {1, 132}) {  // several row tiles per block (dA carried in shared memory), and one
            std::tie(t, dA) = emu_lora_dx_da_grouped(x, du, a, grp.ranks, seeds, grp.p, sms);
            const std::string ns = n + " sms " + std::to_string(sms);
            int64_t row = 0;
            for (size_t i = 0; i < grp.ranks.size(); ++i) {
              const int64_t r = grp.ranks[i];
              const at::Tensor dA_i = std::get<1>(
                  emu_lora_dx_da(x, du.narrow(1, row, r), a.narrow(0, row, r), seeds[i], grp.p[i], false, sms));
              const std::string ni = ns + " dA_" + std::to_string(i);
              if (r <= 64) {
                expect_equal(ni + " vs emulated lora_dx_da", dA.narrow(0, row, r), dA_i);
              } else {
                expect_close(ni + " vs emulated lora_dx_da", dA.narrow(0, row, r), dA_i, at::kFloat);
              }
              row += r;
            }
            expect_close(ns + " t vs CPU", t, t_c, dp.act);
            expect_equal(ns + " t zero pattern", t == 0, t_c == 0);
            expect_close(ns + " dA vs CPU", dA, dA_c, at::kFloat);
          }
        }
      }
    }
  }
}

void test_lora_up() {
  const int64_t cases[][3] = {{0, 9, 4}, {1, 9, 1}, {7, 33, 7}, {129, 50, 16}, {65, 136, 20}, {3, 64, 70}, {70, 200, 64}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool with_bias : {false, true}) {
        const at::Tensor u = make(c[0], c[2], at::kFloat, true);
        const at::Tensor b = make(c[1], c[2], dp.adapter, false);
        std::optional<at::Tensor> bias;
        if (with_bias) bias = at::randn({c[1]}, at::kDouble).to(dp.act);
        expect_close(name("lora_up", c[0], c[1], c[2], dp.act, dp.adapter, with_bias, 0.0),
                     emu_lora_up(u, b, bias, 0.75, dp.act), lowcost::cpu::lora_up(u, b, bias, 0.75, dp.act), dp.act);
      }
    }
  }
}

void test_lora_grad_pass() {
  const int64_t cases[][3] = {{0, 9, 4},     {1, 9, 1},    {7, 33, 7},     {129, 50, 16},
                              {65, 20, 64},  {9, 11, 70},  {130, 200, 16}, {300, 136, 20}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool transposed : {false, true}) {
        const at::Tensor g = make(c[0], c[1], dp.act, transposed);
        const at::Tensor u = make(c[0], c[2], at::kFloat, false);
        const at::Tensor b = make(c[1], c[2], dp.adapter, false);
        at::Tensor du, dB, dbias, du_c, dB_c, dbias_c;
        std::tie(du_c, dB_c, dbias_c) = lowcost::cpu::lora_grad_pass(g, u, b, 1.5, true);
        const std::string n = name("lora_grad_pass", c[0], c[1], c[2], dp.act, dp.adapter, transposed, 0.0);
        for (int64_t sms : {1, 132}) {  // few segments (several tiles each); many (partials)
          const std::string ns = n + " sms " + std::to_string(sms);
          std::tie(du, dB, dbias) = emu_lora_grad_pass(g, u, b, 1.5, true, sms);
          expect_close(ns + " du", du, du_c, at::kFloat);
          expect_close(ns + " dB", dB, dB_c, at::kFloat);
          expect_close(ns + " dbias", dbias, dbias_c, at::kFloat);
        }
        std::tie(du, dB, dbias) = emu_lora_grad_pass(g, u, b, 1.5, false, 132);
        expect_close(n + " dB without dbias", dB, dB_c, at::kFloat);
        ++g_checks;
        if (dbias.numel() != 0) {
          ++g_failures;
          std::fprintf(stderr, "FAIL %s: dbias must be empty when need_dbias is false\n", n.c_str());
        }
      }
    }
  }
}

void test_lora_dx_da() {
  const int64_t cases[][3] = {{0, 13, 4},   {1, 13, 1},   {7, 45, 7},    {129, 33, 16},
                              {300, 100, 64}, {5, 24, 70}, {200, 64, 20}, {130, 136, 16}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool transposed : {false, true}) {
        for (double p : {0.0, 0.3}) {
          const at::Tensor x = make(c[0], c[1], dp.act, transposed);
          const at::Tensor du = make(c[0], c[2], at::kFloat, true);
          const at::Tensor a = make(c[2], c[1], dp.adapter, false);
          const int64_t seed = (int64_t{9} << 32) + 1;
          at::Tensor dx, dA, dx_c, dA_c;
          std::tie(dx_c, dA_c) = lowcost::cpu::lora_dx_da(x, du, a, seed, p, true);
          const std::string n = name("lora_dx_da", c[0], c[1], c[2], dp.act, dp.adapter, transposed, p);
          for (int64_t sms : {1, 132}) {  // several row tiles per block, and one
            std::tie(dx, dA) = emu_lora_dx_da(x, du, a, seed, p, true, sms);
            expect_close(n + " dx", dx, dx_c, dp.act);
            expect_equal(n + " dx zero pattern", dx == 0, dx_c == 0);
            expect_close(n + " dA", dA, dA_c, at::kFloat);
          }
          std::tie(dx, dA) = emu_lora_dx_da(x, du, a, seed, p, false, 4);
          expect_close(n + " dA without dx", dA, dA_c, at::kFloat);
          ++g_checks;
          if (dx.numel() != 0) {
            ++g_failures;
            std::fprintf(stderr, "FAIL %s: dx must be empty when need_dx is false\n", n.c_str());
          }
        }
      }
    }
  }
}

// The fused MLP's elementwise kernels against the CPU ops (csrc/gated_act.h's math on both sides, so equal to
// the bit): M = 0 and 1, sizes off the 4-element groups (the scalar tail), strided and contiguous inputs (the
// scalar and the 4-wide paths), 1 SM (a grid-stride loop with several trips) and 132.
void test_gated_act() {
  const int64_t shapes[][2] = {{0, 7}, {1, 1}, {7, 13}, {129, 33}, {3, 1000}, {64, 64}};
  for (c10::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const char* act : {"silu", "gelu_tanh", "gelu"}) {
      for (const auto& s : shapes) {
        for (bool transposed : {false, true}) {
          const at::Tensor gate = make(s[0], s[1], dt, transposed) * 3, up = make(s[0], s[1], dt, false);
          const at::Tensor dh = make(s[0], s[1], dt, transposed);
          const at::Tensor h_c = lowcost::cpu::gated_act_mul(gate, up, act);
          at::Tensor dg_c, du_c, dg, du;
          std::tie(dg_c, du_c) = lowcost::cpu::gated_act_mul_backward(dh, gate, up, act);
          const std::string n = name("gated_act_mul", s[0], s[1], 0, dt, dt, transposed, 0.0) + " " + act;
          for (int64_t sms : {1, 132}) {
            const std::string ns = n + " sms " + std::to_string(sms);
            expect_equal(ns + " h", emu_gated_act_mul(gate, up, act, sms), h_c);
            std::tie(dg, du) = emu_gated_act_mul_backward(dh, gate, up, act, sms);
            expect_equal(ns + " d_gate", dg, dg_c);
            expect_equal(ns + " d_up", du, du_c);
          }
        }
      }
    }
  }
}

// One (C, V) chunk of the row pass, emulated at each SM count, against the CPU op to the bit: loss and, with row
// weights, dz over the logits; without them the logits untouched. Every third row ignored, and an all-ignored
// chunk; `sliced`: the chunk is a column slice of a wider buffer (unaligned rows).
void check_xent_rows_case(int64_t C, int64_t V, c10::ScalarType dt, bool sliced, const double st[2],
                          std::initializer_list<int64_t> sm_counts) {
  at::Tensor base = sliced ? (at::randn({C, V + 3}, at::kDouble) * 4).to(dt).narrow(1, 1, V)
                           : (at::randn({C, V}, at::kDouble) * 4).to(dt);
  at::Tensor labels = at::randint(0, std::max<int64_t>(V, 1), {C}, at::kLong);
  if (C > 2) labels.index_put_({at::indexing::Slice(0, C, 3)}, -100);  // every third row ignored
  const at::Tensor all_ignored = at::full({C}, -100, at::kLong);
  const at::Tensor weight = at::rand({C}, at::kFloat) + 0.5;
  const std::string n = name("softmax_xent_rows", C, V, 0, dt, dt, sliced, st[0]) + " softcap=" + std::to_string(st[1]);
  for (const at::Tensor* lab : {static_cast<const at::Tensor*>(&labels), &all_ignored}) {
    at::Tensor z_cpu = base.clone();
    const at::Tensor loss_cpu = lowcost::cpu::softmax_xent_rows(z_cpu, *lab, weight, -100, st[0], st[1]);
    at::Tensor z_fwd = base.clone();
    const at::Tensor loss_fwd = lowcost::cpu::softmax_xent_rows(z_fwd, *lab, std::nullopt, -100, st[0], st[1]);
    for (int64_t sms : sm_counts) {
      const std::string ns = n + (lab == &labels ? "" : " all ignored") + " sms " + std::to_string(sms) + " slices " +
                             std::to_string(lowcost::cuda::plan_xent_rows(C, V, sms).slices);
      at::Tensor z = base.clone();
      expect_equal(ns + " loss", emu_softmax_xent_rows(z, *lab, weight, -100, st[0], st[1], sms), loss_cpu);
      expect_equal(ns + " dz", z, z_cpu);
      at::Tensor z_keep = base.clone();
      expect_equal(ns + " loss (no grad)", emu_softmax_xent_rows(z_keep, *lab, std::nullopt, -100, st[0], st[1], sms),
                   loss_fwd);
      expect_equal(ns + " z untouched without row_weight", z_keep, base);
    }
  }
}

// The fused cross-entropy's row pass against the CPU op (csrc/xent_rows.h's math, pieces and lane order on both
// sides, so equal to the bit). Rows of one piece: C = 0 and 1, V below one group, odd (unaligned rows: the
// element-by-element path), a multiple of 4 (the 4-wide path) and longer than one sweep of the block's lanes;
// smoothing and soft-capping; 1 SM (blocks loop over rows) and 132. Rows of several pieces (8192 columns each):
// one column past a piece (P = 2: S = 2) and 3 pieces, on 1 SM (target 8 blocks: 9 rows fill it, S = 1; 5 rows
// do not, S = 2 slices of 1 and 2 pieces) and 132 SMs (S = P), so the one launch and the split launches (S dividing
// P or not) all meet the CPU op; without and with smoothing and soft-capping.
void test_softmax_xent_rows() {
  const int64_t shapes[][2] = {{0, 5}, {1, 1}, {1, 3}, {7, 1001}, {5, 1024}, {3, 4099}, {19, 37}};
  const double settings[][2] = {{0.0, 0.0}, {0.1, 0.0}, {0.0, 3.0}, {0.25, 1.5}};
  for (c10::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& s : shapes) {
      for (bool sliced : {false, true}) {
        for (const auto& st : settings) check_xent_rows_case(s[0], s[1], dt, sliced, st, {1, 132});
      }
    }
  }
  const int64_t piece_cols = lowcost::kXentPieceGroups * lowcost::kXentGroup;
  const int64_t long_shapes[][2] = {{1, piece_cols + 1}, {5, 2 * piece_cols + 3623}, {9, 2 * piece_cols + 4}};
  int split = 0, single = 0;
  for (const auto& s : long_shapes) {
    for (int64_t sms : {1, 132}) (lowcost::cuda::plan_xent_rows(s[0], s[1], sms).slices > 1 ? split : single) += 1;
  }
  ++g_checks;
  if (split < 3 || single < 1) {
    ++g_failures;
    std::fprintf(stderr, "FAIL softmax_xent_rows: the long shapes must cover both plans (%d split, %d single)\n",
                 split, single);
  }
  for (c10::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& s : long_shapes) {
      for (bool sliced : {false, true}) {
        for (int k : {0, 3}) check_xent_rows_case(s[0], s[1], dt, sliced, settings[k], {1, 132});
      }
    }
  }
}

// Two runs of the backward ops give bitwise identical results (no atomics: fixed reduction order).
void test_backward_bitwise_reproducible() {
  const at::Tensor g = make(300, 136, at::kBFloat16, false), u = make(300, 16, at::kFloat, false);
  const at::Tensor b = make(136, 16, at::kBFloat16, false), x = make(300, 200, at::kBFloat16, false);
  const at::Tensor a = make(16, 200, at::kBFloat16, false);
  const auto grads1 = emu_lora_grad_pass(g, u, b, 2.0, true, 132);
  const auto grads2 = emu_lora_grad_pass(g, u, b, 2.0, true, 132);
  expect_equal("lora_grad_pass du run to run", std::get<0>(grads1), std::get<0>(grads2));
  expect_equal("lora_grad_pass dB run to run", std::get<1>(grads1), std::get<1>(grads2));
  expect_equal("lora_grad_pass dbias run to run", std::get<2>(grads1), std::get<2>(grads2));
  const auto dx_da1 = emu_lora_dx_da(x, std::get<0>(grads1), a, 3, 0.1, true, 132);
  const auto dx_da2 = emu_lora_dx_da(x, std::get<0>(grads1), a, 3, 0.1, true, 132);
  expect_equal("lora_dx_da dx run to run", std::get<0>(dx_da1), std::get<0>(dx_da2));
  expect_equal("lora_dx_da dA run to run", std::get<1>(dx_da1), std::get<1>(dx_da2));
}

}  // namespace

// test_cuda_emulated [NAME]: every test, or those whose name contains NAME.
int main(int argc, char** argv) {
  at::manual_seed(0);
  at::set_num_threads(1);  // the emulation runs on one host thread
  const std::pair<const char*, void (*)()> tests[] = {
      {"mma_fragment_layout", test_mma_fragment_layout}, {"mma_operands", test_mma_operands},
      {"philox_dropout", test_philox_dropout},           {"lora_down", test_lora_down},
      {"lora_down_grouped", test_lora_down_grouped},     {"lora_up", test_lora_up},
      {"lora_grad_pass", test_lora_grad_pass},           {"lora_dx_da", test_lora_dx_da},
      {"lora_dx_da_grouped", test_lora_dx_da_grouped},
      {"bitwise_reproducible", test_backward_bitwise_reproducible},
      {"gated_act", test_gated_act},                     {"softmax_xent_rows", test_softmax_xent_rows}};
  for (const auto& test : tests) {
    if (argc < 2 || std::string(test.first).find(argv[1]) != std::string::npos) test.second();
  }
  if (g_failures != 0) {
    std::fprintf(stderr, "%d of %d check(s) failed\n", g_failures, g_checks);
    return EXIT_FAILURE;
  }
  std::printf("test_cuda_emulated: all %d checks passed\n", g_checks);
  return EXIT_SUCCESS;
}
