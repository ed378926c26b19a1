// The emulator's side of the CUDA ops' host code (csrc/cuda/host_launchers.h, dequant_launchers.h): the hooks
// mma.cuh declares for the emulator and EmuExec, the `Exec` that runs launches on fibers. Include once per
// test program, after cuda_emulation.h and the kernels' headers.
#pragma once

#include "cuda_emulation.h"

#include "../cuda/common.cuh"
#include "../cuda/mma.cuh"

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

// ---- the hooks mma.cuh declares for the emulator ------------------------------------------------
namespace lowcost {
namespace cuda {

MmaLaneOperands* emulated_warp_slots() {
  static MmaLaneOperands slots[kWarps][2][32];
  lowcost_emu::Fiber& f = lowcost_emu::self();
  return slots[f.thread_idx.x / 32][f.mma_calls++ % 2];
}
void emulated_cp_async(void* smem, const void* gmem, int src_bytes) { lowcost_emu::cp_async(smem, gmem, src_bytes); }
void emulated_cp_async_commit() { lowcost_emu::cp_async_commit(); }
void emulated_cp_async_wait(int pending) { lowcost_emu::cp_async_wait(pending); }

}  // namespace cuda
}  // namespace lowcost

namespace lowcost_emu {

// CPU tensors, outputs the GPU would leave uninitialised start as NaN (so an element no thread writes is
// caught), a chosen SM count, and launches on fibers.
struct EmuExec {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  int64_t sm_count = 132;

  int guard(const c10::Device&) const { return 0; }

  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) const {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }

  int64_t sms() const { return sm_count; }

  template <typename Kernel, typename... Args>
  void launch(const lowcost::cuda::LaunchGrid& grid, int64_t smem, const char* op, Kernel kernel,
              Args... args) const {
    lowcost::cuda::check_grid(grid, op);
    const Dim3 dims{static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)};
    run_grid(dims, static_cast<size_t>(smem), [&] { kernel(args...); });
  }
};

}  // namespace lowcost_emu
