// The emulated CUDA execution model under which csrc/tests/test_cuda_emulated.cpp runs the CUDA
// kernels (csrc/cuda/*_kernels.cuh) as plain host C++.
//
// A block runs as kThreads cooperative fibers on one host thread (ucontext; a fiber yields only while
// it waits at a barrier, so runs are deterministic). The kernels' CUDA vocabulary maps to:
//   threadIdx / blockIdx / blockDim / gridDim   the running fiber's / block's coordinates
//   __syncthreads()                             a barrier of all the block's fibers
//   __syncwarp()                                a barrier of the 32 fibers of the caller's warp
//   dynamic shared memory                       one buffer per block, filled with 0xFF bytes (NaN as
//                                               float and bf16) so a read of unwritten memory shows
//   cp.async                                    queued per fiber; a commit closes a group and
//                                               cp.async.wait_group performs the oldest groups, so
//                                               a tile read before its wait holds stale data
//   mma.sync (mma.cuh's host body)              lanes publish their fragments through per-warp
//                                               slots (two banks, alternating per call, so one
//                                               warp barrier per mma suffices)
// A barrier that can never complete (a fiber finished while others wait, or divergent barriers) and a
// cp.async still queued when a fiber ends abort the test with a message.
#pragma once

#include "../cuda/launch_plan.h"

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace lowcost { namespace cuda { struct MmaLaneOperands; } }

namespace lowcost_emu {

using lowcost::cuda::kThreads;
using lowcost::cuda::kWarps;

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct float4 {
  float x, y, z, w;
};

struct PendingCopy {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Dim3 thread_idx;
  bool done = false;
  uint64_t mma_calls = 0;
  std::vector<PendingCopy> open_group;
  std::vector<std::vector<PendingCopy>> committed;  // oldest first
};

struct Barrier {
  int count = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Block {
  std::vector<Fiber> fibers = std::vector<Fiber>(kThreads);
  ucontext_t scheduler;
  int current = 0;
  uint64_t progress = 0;  // arrivals and completions; a pass without progress is a deadlock
  Dim3 block_idx, block_dim, grid_dim;
  Barrier block_barrier{kThreads};
  Barrier warp_barrier[kWarps];
  std::vector<unsigned char> smem;
  std::function<void()> kernel;
};

inline Block& block() {
  static Block b;
  return b;
}
inline Fiber& self() { return block().fibers[block().current]; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s (block %u,%u,%u thread %u)\n", what, block().block_idx.x,
               block().block_idx.y, block().block_idx.z, self().thread_idx.x);
  std::abort();
}

inline void yield() { swapcontext(&self().context, &block().scheduler); }

inline void wait_at(Barrier& b) {
  ++block().progress;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline void syncthreads() { wait_at(block().block_barrier); }
inline void syncwarp() { wait_at(block().warp_barrier[self().thread_idx.x / 32]); }
inline unsigned char* dynamic_smem() { return block().smem.data(); }

// ---- cp.async ------------------------------------------------------------------------------------
inline void cp_async(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 != 0) fail("cp.async shared address not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(src) % 16 != 0) fail("cp.async global address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size outside [0, 16]");
  self().open_group.push_back({dst, src, src_bytes});
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const PendingCopy& c : f.committed.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
    }
    f.committed.erase(f.committed.begin());
  }
}

// ---- blocks --------------------------------------------------------------------------------------
inline void fiber_main() {
  block().kernel();
  Fiber& f = self();
  if (!f.open_group.empty()) fail("cp.async issued but never committed or waited for at kernel exit");
  for (const auto& group : f.committed) {
    if (!group.empty()) fail("cp.async group still in flight at kernel exit");
  }
  f.done = true;
  ++block().progress;
}  // returns to the scheduler (uc_link)

// Runs kernel() for one block on kThreads fibers until all have finished.
inline void run_block(Dim3 idx, size_t smem_bytes) {
  Block& b = block();
  b.block_idx = idx;
  b.smem.assign(smem_bytes + 16, 0xFF);
  for (int w = 0; w < kWarps; ++w) b.warp_barrier[w] = Barrier{32};
  b.block_barrier = Barrier{kThreads};
  for (int t = 0; t < kThreads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack.resize(256 * 1024);
    f.thread_idx = {static_cast<unsigned>(t), 0, 0};
    f.done = false;
    f.mma_calls = 0;
    f.open_group.clear();
    f.committed.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (int live = kThreads; live > 0;) {
    const uint64_t before = b.progress;
    live = 0;
    for (int t = 0; t < kThreads; ++t) {
      if (b.fibers[t].done) continue;
      b.current = t;
      swapcontext(&b.scheduler, &b.fibers[t].context);
      live += b.fibers[t].done ? 0 : 1;
    }
    if (live > 0 && b.progress == before) fail("deadlock: threads wait at a barrier that can never complete");
  }
}

inline void run_grid(Dim3 grid, size_t smem_bytes, std::function<void()> kernel) {
  Block& b = block();
  b.kernel = std::move(kernel);
  b.grid_dim = grid;
  b.block_dim = {static_cast<unsigned>(kThreads), 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block({x, y, z}, smem_bytes);
}

}  // namespace lowcost_emu

// The kernels' CUDA vocabulary, for the headers included after this one.
#define LOWCOST_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __syncthreads() ::lowcost_emu::syncthreads()
#define __syncwarp() ::lowcost_emu::syncwarp()
#define threadIdx (::lowcost_emu::self().thread_idx)
#define blockIdx (::lowcost_emu::block().block_idx)
#define blockDim (::lowcost_emu::block().block_dim)
#define gridDim (::lowcost_emu::block().grid_dim)
using lowcost_emu::float4;
