// Runs the CUDA kernels of csrc/cuda/*_kernels.cuh on the host and compares them with the CPU ops.
//
// The machines that build lowcost in CI have no GPU, so the kernels are compiled here as plain C++
// with a minimal emulation of the CUDA execution model: each block runs as 256 std::threads that
// share the kernel's `__shared__` arrays (function statics; one block at a time), `__syncthreads()`
// is a barrier, `atomicAdd` takes a lock, and threadIdx / blockIdx / blockDim / gridDim are
// (thread-local) globals. This checks the kernels' index arithmetic, tiling, masks, barriers and
// reductions, not their speed or warp-level behaviour. The ops' host side (checks, allocation, early
// exits, dispatch, launch grids) is csrc/cuda/host_launchers.h, the same code the .cu files run;
// outputs the GPU would leave uninitialised start as NaN here, so an element no thread writes is caught.
#include "../checks.h"
#include "../cpu/ops_cpu.h"
#include "../dispatch.h"
#include "../philox.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

// ---- the emulated execution model --------------------------------------------------------------
namespace lowcost_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 thread_idx, block_idx;
Dim3 block_dim, grid_dim;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long long generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int waiting_ = 0;
  unsigned long long generation_ = 0;
};
thread_local Barrier* block_barrier = nullptr;
std::mutex atomic_mutex;

inline void syncthreads() { block_barrier->wait(); }

inline float atomic_add(float* address, float value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

}  // namespace lowcost_emu

#define LOWCOST_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::lowcost_emu::syncthreads()
#define atomicAdd ::lowcost_emu::atomic_add
#define threadIdx ::lowcost_emu::thread_idx
#define blockIdx ::lowcost_emu::block_idx
#define blockDim ::lowcost_emu::block_dim
#define gridDim ::lowcost_emu::grid_dim

#include "../cuda/host_launchers.h"  // the kernels' headers and the ops' host side, as the .cu files use them

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

namespace {

using lowcost::cuda::LaunchGrid;
using lowcost::cuda::kThreads;

// Runs `kernel()` for every block of `grid`, one block at a time, on kThreads host threads; a barrier
// after each block keeps the next block from touching shared memory early.
void run_blocks(const LaunchGrid& grid, const std::function<void()>& kernel) {
  lowcost_emu::block_dim = {static_cast<unsigned>(kThreads), 1, 1};
  lowcost_emu::grid_dim = {static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), 1};
  lowcost_emu::Barrier barrier(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      lowcost_emu::thread_idx = {static_cast<unsigned>(t), 1, 1};
      lowcost_emu::block_barrier = &barrier;
      for (int64_t by = 0; by < grid.y; ++by) {
        for (int64_t bx = 0; bx < grid.x; ++bx) {
          lowcost_emu::block_idx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 1};
          kernel();
          barrier.wait();
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
}

// The emulator's side of csrc/cuda/host_launchers.h: CPU tensors, outputs the GPU would leave
// uninitialised start as NaN (so an element no thread writes is caught), a chosen SM count, and
// launches on host threads.
struct EmuExec {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  int64_t sm_count = 132;

  int guard(const c10::Device&) const { return 0; }

  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) const {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }

  int64_t sms() const { return sm_count; }

  template <typename Kernel, typename... Args>
  void launch(const LaunchGrid& grid, const char* op, Kernel kernel, Args... args) const {
    lowcost::cuda::check_grid(grid, op);
    run_blocks(grid, [&] { kernel(args...); });
  }
};

// ---- the ops, through the same host code as csrc/cuda/*.cu ----------------------------------------
at::Tensor emu_philox_dropout(const at::Tensor& x, int64_t seed, double p, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_philox_dropout(x, seed, p, exec);
}

at::Tensor emu_lora_down(const at::Tensor& x, const at::Tensor& lora_a, int64_t seed, double p) {
  EmuExec exec;
  return lowcost::cuda::run_lora_down(x, lora_a, seed, p, exec);
}

at::Tensor emu_lora_up(const at::Tensor& u, const at::Tensor& lora_b, const std::optional<at::Tensor>& bias,
                       double scale, c10::ScalarType dtype) {
  EmuExec exec;
  return lowcost::cuda::run_lora_up(u, lora_b, bias, scale, dtype, exec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_lora_grad_pass(const at::Tensor& grad_y, const at::Tensor& u,
                                                                  const at::Tensor& lora_b, double scale,
                                                                  bool need_dbias) {
  EmuExec exec;
  return lowcost::cuda::run_lora_grad_pass(grad_y, u, lora_b, scale, need_dbias, exec);
}

std::tuple<at::Tensor, at::Tensor> emu_lora_dx_da(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_a,
                                                  int64_t seed, double p, bool need_dx, int64_t sms) {
  EmuExec exec{sms};
  return lowcost::cuda::run_lora_dx_da(x, du, lora_a, seed, p, need_dx, exec);
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

void test_lora_down() {
  const int64_t cases[][3] = {{1, 13, 1}, {7, 45, 7}, {129, 33, 16}, {64, 100, 64}, {70, 24, 70}, {130, 64, 20}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool transposed : {false, true}) {
        for (double p : {0.0, 0.3}) {
          const at::Tensor x = make(c[0], c[1], dp.act, transposed);
          const at::Tensor a = make(c[2], c[1], dp.adapter, false);
          const int64_t seed = (int64_t{5} << 32) + 3;
          expect_close(name("lora_down", c[0], c[1], c[2], dp.act, dp.adapter, transposed, p),
                       emu_lora_down(x, a, seed, p), lowcost::cpu::lora_down(x, a, seed, p), at::kFloat);
        }
      }
    }
  }
}

void test_lora_up() {
  const int64_t cases[][3] = {{1, 9, 1}, {7, 33, 7}, {129, 50, 16}, {65, 64, 20}, {3, 64, 70}};
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
  const int64_t cases[][3] = {{1, 9, 1}, {7, 33, 7}, {129, 50, 16}, {65, 20, 64}, {9, 11, 70}, {130, 64, 16}};
  for (const DtypePair& dp : kPairs) {
    for (const auto& c : cases) {
      for (bool transposed : {false, true}) {
        const at::Tensor g = make(c[0], c[1], dp.act, transposed);
        const at::Tensor u = make(c[0], c[2], at::kFloat, false);
        const at::Tensor b = make(c[1], c[2], dp.adapter, false);
        at::Tensor du, dB, dbias, du_c, dB_c, dbias_c;
        std::tie(du, dB, dbias) = emu_lora_grad_pass(g, u, b, 1.5, true);
        std::tie(du_c, dB_c, dbias_c) = lowcost::cpu::lora_grad_pass(g, u, b, 1.5, true);
        const std::string n = name("lora_grad_pass", c[0], c[1], c[2], dp.act, dp.adapter, transposed, 0.0);
        expect_close(n + " du", du, du_c, at::kFloat);
        expect_close(n + " dB", dB, dB_c, at::kFloat);
        expect_close(n + " dbias", dbias, dbias_c, at::kFloat);
        std::tie(du, dB, dbias) = emu_lora_grad_pass(g, u, b, 1.5, false);
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
  const int64_t cases[][3] = {{1, 13, 1}, {7, 45, 7}, {129, 33, 16}, {300, 100, 64}, {5, 24, 70}, {200, 64, 20}};
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

}  // namespace

int main() {
  at::manual_seed(0);
  at::set_num_threads(1);  // the emulation already runs 256 threads per block
  test_philox_dropout();
  test_lora_down();
  test_lora_up();
  test_lora_grad_pass();
  test_lora_dx_da();
  if (g_failures != 0) {
    std::fprintf(stderr, "%d of %d check(s) failed\n", g_failures, g_checks);
    return EXIT_FAILURE;
  }
  std::printf("test_cuda_emulated: all %d checks passed\n", g_checks);
  return EXIT_SUCCESS;
}
