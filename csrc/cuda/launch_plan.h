// Tile sizes, shared-memory layouts, splits and launch grids of the CUDA skinny kernels.
//
// Plain C++ (no CUDA, no torch; the constexpr helpers are also called from device code, which
// nvcc allows with --expt-relaxed-constexpr): the kernels take their tile constants and shared-memory layouts from
// here, the host launchers (host_launchers.h) their grids, splits and workspace sizes, and
// tools/kernel_report_cuda.py prints the same plans through csrc/tools/print_launch_plan.cpp, so the
// report describes exactly the launches the backend makes.
//
// Every kernel runs 256-thread blocks (8 warps). Shared-memory tiles pad each row by 16 bytes, which
// keeps rows 16-byte aligned for cp.async and spreads the fragment loads of a warp over all banks.
#pragma once

#include "../xent_rows.h"

#include <algorithm>
#include <cstdint>

namespace lowcost {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSm = 2;  // __launch_bounds__: at most 128 registers per thread

// A launch grid in blocks (z defaults to 1).
struct LaunchGrid {
  int64_t x = 1;
  int64_t y = 1;
  int64_t z = 1;
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Leading dimension (elements) of a shared tile with `cols` columns of `elem`-byte elements.
constexpr int padded_ld(int cols, int elem) { return cols + 16 / elem; }

// Bytes of a shared tile, rounded up to 16 so the next tile stays aligned.
constexpr int64_t tile_bytes(int rows, int cols, int elem) {
  return (static_cast<int64_t>(rows) * padded_ld(cols, elem) * elem + 15) / 16 * 16;
}

// The rank tile RT in {16, 32, 64} that covers r (ranks above 64 run in chunks of 64).
inline int rank_tile(int64_t r) { return r <= 16 ? 16 : (r <= 32 ? 32 : 64); }

// Integer split of `total` items into `parts` near-equal contiguous ranges: part p covers
// [range_begin(p), range_begin(p + 1)).
constexpr int64_t range_begin(int64_t total, int64_t parts, int64_t p) { return total * p / parts; }

// ---------------------------------------------------------------------------------------------
// lora_down: u = (D (.) x) A^T. Blocks of 64 rows x one split of K x one rank chunk; each walks its
// K range in 64-wide tiles through a 3-stage cp.async pipeline. Splits of K write fp32 partials of
// u that sum_partials adds in split order.
constexpr int kDownBM = 64;
constexpr int kDownBK = 64;
constexpr int kDownStages = 3;

struct DownLayout {
  int64_t x_tile;  // offset of the A-tile inside a stage (the x tile starts the stage)
  int64_t stage;   // bytes of one stage
  int64_t total;   // dynamic shared memory of the block
};

constexpr DownLayout down_layout(int rt, int x_elem, int a_elem) {
  const int64_t x = tile_bytes(kDownBM, kDownBK, x_elem);
  const int64_t stage = x + tile_bytes(rt, kDownBK, a_elem);
  const int64_t reduce = static_cast<int64_t>(kWarps / 2) * 32 * (rt / 8) * 4 * 4;  // fragments
  return {x, stage, std::max<int64_t>(stage * kDownStages, reduce)};
}

struct DownPlan {
  int rt = 16;
  int64_t chunks = 1;  // rank chunks (grid.z)
  int64_t splits = 1;  // K splits (grid.y); > 1 means u partials + sum_partials
  LaunchGrid grid;
  int64_t smem = 0;
};

// K splits of a lora_down launch with `chunks` rank chunks: enough blocks for 2 per SM, at most one per K tile.
inline int64_t down_splits(int64_t M, int64_t K, int64_t chunks, int64_t sms) {
  const int64_t row_tiles = ceil_div(M, kDownBM);
  const int64_t k_tiles = std::max<int64_t>(1, ceil_div(K, kDownBK));
  const int64_t want = ceil_div(2 * sms, std::max<int64_t>(1, row_tiles * chunks));
  return std::min<int64_t>({std::max<int64_t>(1, want), k_tiles, 65535});
}

inline DownPlan plan_lora_down(int64_t M, int64_t K, int64_t r, int64_t sms, int x_elem, int a_elem) {
  DownPlan p;
  p.rt = rank_tile(r);
  p.chunks = std::max<int64_t>(1, ceil_div(r, p.rt));
  p.splits = down_splits(M, K, p.chunks, sms);
  p.grid = {ceil_div(M, kDownBM), p.splits, p.chunks};
  p.smem = down_layout(p.rt, x_elem, a_elem).total;
  return p;
}

// lora_down_grouped: P projections' lora_down over one staged x tile. Projection i's r_i columns take
// ceil(r_i / 8) fragments of 8 (mma n = 8); the F fragments of all projections, in order, are cut into rank chunks
// of RT / 8 (grid.z; RT = rank_tile(8 F)), so a block's chunk may hold several projections and a projection may
// span chunks. Per K tile, each projection of the chunk with dropout copies the staged x tile through its mask into
// one more tile (after the stages) and multiplies its fragments with it; projections without dropout multiply the
// staged tile. The K splits are lora_down's with one rank chunk, so a projection with r_i <= 64 adds the same K
// tiles in the same order as its own lora_down: the grouped u is bitwise the P lora_down calls.
inline int64_t down_fragments(int64_t r) { return ceil_div(r, 8); }

constexpr DownLayout down_grouped_layout(int rt, int x_elem, int a_elem) {
  const DownLayout l = down_layout(rt, x_elem, a_elem);
  return {l.x_tile, l.stage, std::max<int64_t>(l.total, l.stage * kDownStages + l.x_tile)};  // + the masked tile
}

// The masked x tile's offset in the grouped kernel's shared memory (after the stages).
constexpr int64_t down_grouped_masked_tile(const DownLayout& l) { return l.stage * kDownStages; }

inline DownPlan plan_lora_down_grouped(int64_t M, int64_t K, int64_t fragments, int64_t sms, int x_elem,
                                       int a_elem) {
  DownPlan p;
  p.rt = rank_tile(8 * fragments);
  p.chunks = std::max<int64_t>(1, ceil_div(8 * fragments, p.rt));
  p.splits = down_splits(M, K, 1, sms);
  p.grid = {ceil_div(M, kDownBM), p.splits, p.chunks};
  p.smem = down_grouped_layout(p.rt, x_elem, a_elem).total;
  return p;
}

// ---------------------------------------------------------------------------------------------
// lora_up: c = s u B^T + bias. 64 x 128 output tiles; r walked in chunks of 32; the tile is staged
// through shared memory so rows leave as 16-byte stores.
constexpr int kUpBM = 64;
constexpr int kUpBN = 128;
constexpr int kUpRK = 32;

struct UpLayout {
  int64_t b_tile;  // offset of the B chunk (the u chunk starts the buffer)
  int64_t total;
};

constexpr UpLayout up_layout(int b_elem) {
  const int64_t u = tile_bytes(kUpBM, kUpRK, 4);
  const int64_t operands = u + tile_bytes(kUpBN, kUpRK, b_elem);
  return {u, std::max<int64_t>(operands, tile_bytes(kUpBM, kUpBN, 4))};
}

struct UpPlan {
  LaunchGrid grid;
  int64_t smem = 0;
};

inline UpPlan plan_lora_up(int64_t M, int64_t N, int b_elem) {
  return {{ceil_div(M, kUpBM), ceil_div(N, kUpBN), 1}, up_layout(b_elem).total};
}

// ---------------------------------------------------------------------------------------------
// lora_grad_pass: du = s g B, dB = s g^T u, dbias = sum_m g, one read of g. The (M, N) plane of g is
// cut into C column segments x R row segments (grid.x, grid.y; rank chunks on grid.z). A block walks
// its column tiles (outer) and row tiles (inner) of 64 x 64 through a 2-stage cp.async pipeline:
// dB and dbias of a column tile are complete after the row loop (registers), du of the segment's rows
// accumulates over the column tiles in shared memory. Column segments give du partials, row segments
// dB/dbias partials; sum_partials adds them in segment order.
constexpr int kGpBM = 64;
constexpr int kGpBN = 64;
constexpr int kGpStages = 2;
constexpr int kGpAccFloats = 8192;  // shared du accumulator: rows of the row segment x RT floats

struct GradPassLayout {
  int64_t b_tile;  // offsets inside a stage (the g tile starts the stage)
  int64_t u_tile;
  int64_t stage;
  int64_t du_acc;  // offset of the du accumulator (after the stages)
  int64_t total;
};

constexpr int gp_max_segment_rows(int rt) { return kGpAccFloats / rt; }

constexpr GradPassLayout grad_pass_layout(int rt, int g_elem, int b_elem) {
  const int64_t g = tile_bytes(kGpBM, kGpBN, g_elem);
  const int64_t b = tile_bytes(kGpBN, rt, b_elem);
  const int64_t u = tile_bytes(kGpBM, rt, 4);
  const int64_t stage = g + b + u;
  const int64_t acc = static_cast<int64_t>(gp_max_segment_rows(rt)) * rt * 4;
  return {g, g + b, stage, stage * kGpStages, stage * kGpStages + acc};
}

struct GradPassPlan {
  int rt = 16;
  int64_t chunks = 1;
  int64_t col_segments = 1;  // C: du partials when > 1
  int64_t row_segments = 1;  // R: dB / dbias partials when > 1
  LaunchGrid grid;
  int64_t smem = 0;
};

// Picks (C, R) with C * R * chunks >= 2 * sms where the shape allows, each row segment short enough
// for the shared du accumulator, and the fewest partial bytes (C * M + R * N floats per rank).
inline GradPassPlan plan_lora_grad_pass(int64_t M, int64_t N, int64_t r, int64_t sms, int g_elem,
                                        int b_elem) {
  GradPassPlan p;
  p.rt = rank_tile(r);
  p.chunks = std::max<int64_t>(1, ceil_div(r, p.rt));
  const int64_t row_tiles = std::max<int64_t>(1, ceil_div(M, kGpBM));
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(N, kGpBN));
  const int64_t min_r = ceil_div(row_tiles, gp_max_segment_rows(p.rt) / kGpBM);
  const int64_t want = ceil_div(2 * sms, p.chunks);
  int64_t best_cost = -1;
  for (int64_t c = 1; c <= std::min<int64_t>(col_tiles, 65535); ++c) {
    const int64_t rs = std::min<int64_t>({std::max(min_r, ceil_div(want, c)), row_tiles, 65535});
    const bool enough = c * rs >= want;
    const int64_t cost = (enough ? 0 : (int64_t{1} << 60)) + c * M + rs * N;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      p.col_segments = c;
      p.row_segments = rs;
    }
  }
  p.grid = {p.col_segments, p.row_segments, p.chunks};
  p.smem = grad_pass_layout(p.rt, g_elem, b_elem).total;
  return p;
}

// ---------------------------------------------------------------------------------------------
// lora_dx_da: dx = D (.) (du A) and dA = du^T (D (.) x). Blocks own a 64-column strip of K (grid.x) and
// a segment of 64-row tiles (grid.y); x and du tiles stream through a 3-stage cp.async pipeline, the
// mask is generated once per x tile and used for both outputs. Row segments give dA partials.
constexpr int kDxBM = 64;
constexpr int kDxBK = 64;
constexpr int kDxStages = 3;

struct DxDaLayout {
  int64_t du_tile;   // offset inside a stage (the x tile starts the stage)
  int64_t stage;
  int64_t a_strip;   // offset of the A strip (after the stages)
  int64_t dx_stage;  // offset of the fp32 dx staging tile
  int64_t total;
};

constexpr DxDaLayout dx_da_layout(int rt, int x_elem, int a_elem) {
  const int64_t x = tile_bytes(kDxBM, kDxBK, x_elem);
  const int64_t stage = x + tile_bytes(kDxBM, rt, 4);
  const int64_t a = stage * kDxStages;
  const int64_t dx = a + tile_bytes(rt, kDxBK, a_elem);
  return {x, stage, a, dx, dx + tile_bytes(kDxBM, kDxBK, 4)};
}

struct DxDaPlan {
  int rt = 16;
  int64_t chunks = 1;        // rank chunks, looped inside the block
  int64_t row_segments = 1;  // R: dA partials when > 1
  LaunchGrid grid;
  int64_t smem = 0;
};

inline DxDaPlan plan_lora_dx_da(int64_t M, int64_t K, int64_t r, int64_t sms, int x_elem, int a_elem) {
  DxDaPlan p;
  p.rt = rank_tile(r);
  p.chunks = std::max<int64_t>(1, ceil_div(r, p.rt));
  const int64_t strips = std::max<int64_t>(1, ceil_div(K, kDxBK));
  const int64_t row_tiles = std::max<int64_t>(1, ceil_div(M, kDxBM));
  p.row_segments = std::min<int64_t>({std::max<int64_t>(1, ceil_div(2 * sms, strips)), row_tiles, 65535});
  p.grid = {strips, p.row_segments, 1};
  p.smem = dx_da_layout(p.rt, x_elem, a_elem).total;
  return p;
}

// lora_dx_da_grouped: P projections' lora_dx_da over one staged x tile. lora_dx_da's blocks, tiles, pipeline (x
// tiles only) and row segments, with RT = rank_tile(max r_i); per row tile, each projection in turn stages its du
// and A chunks synchronously (as lora_dx_da's rank chunks past the first), masks the staged x tile into a second
// tile when it has dropout, and adds its masked dx tile into the block's fp32 t (registers) and its dA fragments into
// fp32 accumulators kept in shared memory across the row tiles (16 rows x 64 columns per 16-row fragment: the
// registers lora_dx_da keeps them in, stored exactly), so each dA_i sees its lora_dx_da's terms in the same order.
// The row segments are lora_dx_da's: for r_i <= 64 dA_i is bitwise its lora_dx_da's dA.
inline int64_t dx_da_fragments(int64_t r) { return ceil_div(r, 16); }

constexpr int64_t kDxDaAccFragBytes = int64_t{16} * kDxBK * 4;  // one 16-row fragment of a dA strip, fp32

// The masked x tile and the dA accumulators after lora_dx_da's layout.
constexpr int64_t dx_da_grouped_masked_tile(const DxDaLayout& l) { return l.total; }
constexpr int64_t dx_da_grouped_acc(const DxDaLayout& l, int x_elem) {
  return l.total + tile_bytes(kDxBM, kDxBK, x_elem);
}
constexpr int64_t dx_da_grouped_smem(int rt, int x_elem, int a_elem, int64_t acc_fragments) {
  return dx_da_grouped_acc(dx_da_layout(rt, x_elem, a_elem), x_elem) + acc_fragments * kDxDaAccFragBytes;
}

inline DxDaPlan plan_lora_dx_da_grouped(int64_t M, int64_t K, int64_t max_rank, int64_t acc_fragments, int64_t sms,
                                        int x_elem, int a_elem) {
  DxDaPlan p = plan_lora_dx_da(M, K, max_rank, sms, x_elem, a_elem);
  p.smem = dx_da_grouped_smem(p.rt, x_elem, a_elem, acc_fragments);
  return p;
}

// ---------------------------------------------------------------------------------------------
// dequant_gemm (out (M, N) = c + x deq(W)^T) and dequant_gemm_dgrad (out (M, K) = c + g deq(W)) on a
// quantized W (N, K): blocks own 64 x 64 output tiles (grid.x over the output columns, grid.y over the
// rows) and walk the reduction (K forward, N dgrad) in 64-wide steps through a 2-stage pipeline: the
// activation tile by cp.async, the 64 x 64 W tile decoded from its packed codes by the block's threads
// into shared memory in the compute dtype (rows of W x columns of W in both directions; the dgrad reads
// it transposed). The reduction is never split: no partials, no atomics. The code books (NF4's 16 values,
// the 256-value dynamic map of double quantization) sit after the stages.
constexpr int kQgBM = 64;
constexpr int kQgBN = 64;
constexpr int kQgBK = 64;
constexpr int kQgStages = 2;
constexpr int kQgTableFloats = 16 + 256;

struct DequantGemmLayout {
  int64_t w_tile;  // offset of the W tile inside a stage (the activation tile starts the stage)
  int64_t stage;
  int64_t tables;  // offset of the code books (after the stages)
  int64_t total;
};

constexpr DequantGemmLayout dequant_gemm_layout(int elem) {
  const int64_t a = tile_bytes(kQgBM, kQgBK, elem);
  const int64_t stage = a + tile_bytes(kQgBN, kQgBK, elem);
  return {a, stage, stage * kQgStages, stage * kQgStages + kQgTableFloats * 4};
}

struct DequantGemmPlan {
  LaunchGrid grid;
  int64_t smem = 0;
};

// M rows, P output columns (N forward, K dgrad), elem: bytes of the activation dtype.
inline DequantGemmPlan plan_dequant_gemm(int64_t M, int64_t P, int elem) {
  return {{ceil_div(P, kQgBN), ceil_div(M, kQgBM), 1}, dequant_gemm_layout(elem).total};
}

// ---------------------------------------------------------------------------------------------
// sum_partials: out[e] = sum over p of parts[p][e], p in increasing order, for up to three jobs in
// one launch. A block covers 128 elements of one job; its two thread halves add the first and the
// second half of the partials, then the first half's sum and the second's are added (a fixed order).
constexpr int kReduceElems = kThreads / 2;
constexpr int kReduceJobs = 3;

inline int64_t reduce_blocks(int64_t n) { return ceil_div(n, kReduceElems); }

// A job of `count` partials of `n` elements needs reducing only when it was split.
constexpr bool reduce_job_active(int64_t n, int64_t count) { return count > 1 && n > 0; }

constexpr int64_t kReduceSmem = kReduceElems * 4;

// ---------------------------------------------------------------------------------------------
// philox_dropout: grid-stride loop, one thread per 4 consecutive elements.
inline int64_t philox_dropout_blocks(int64_t numel, int64_t sm_count) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(ceil_div(numel, 4), kThreads), sm_count * 16));
}

// ---------------------------------------------------------------------------------------------
// gated_act_mul, gated_act_mul_backward: elementwise, the same grid-stride shape as philox_dropout (one
// thread per 4 consecutive elements, at most 16 blocks per SM; larger problems loop).
inline int64_t gated_act_blocks(int64_t numel, int64_t sm_count) { return philox_dropout_blocks(numel, sm_count); }

// ---------------------------------------------------------------------------------------------
// softmax_xent_rows (the fused linear cross-entropy's row pass) over a (C, V) logits chunk. A row is cut into
// xent_pieces(V) pieces of 8192 columns (csrc/xent_rows.h: the pieces and their fold fix the bits, whatever the
// launch). The plan fills the GPU with kXentBlocksPerSm resident blocks per SM (256 threads each: the SM's 2048
// threads) without a larger chunk: when the rows alone are fewer than that, each row's pieces are split into S
// slices (contiguous ranges of whole pieces, range_begin) with C * S >= the target where the pieces allow, S = 1
// when the rows fill the GPU. S depends on C, V and the SM count only (and the bits on V only).
//   S = 1: xent_rows_kernel, one block per row (grid-stride over rows): the pieces folded in registers, the loss,
//          then dz over the row.
//   S > 1: xent_partials_kernel, grid (rows, S): block (c, s) writes the partials of its slice's pieces, and
//          slice 0 the row's capped target logit, to an fp32 workspace of C x (3 P + 1) floats; then
//          xent_finish_kernel, grid (rows, S) with dz (rows x 1 without): every block folds the row's P partials in
//          piece order (no atomics, no inter-block sync), slice 0 stores the loss, block (c, s) writes dz over its
//          slice. The logits are read twice and written once, as with S = 1.
// Shared memory: the block's kThreads (max, sum, sum) partials for the tree merge. The three kernels are compiled
// for kXentBlocksPerSm resident blocks (__launch_bounds__: at most 32 registers per thread), so the target is met.
constexpr int64_t kXentBlocksPerSm = 8;

struct XentRowsPlan {
  int64_t pieces = 1;          // P, from V alone
  int64_t slices = 1;          // S: blocks per row
  int64_t workspace = 0;       // floats of the S > 1 workspace (C x (3 P + 1)), 0 when S = 1
  LaunchGrid grid;             // of every launch (xent_finish_kernel without dz: grid.y = 1)
  int64_t smem = 0;            // dynamic shared memory of every launch
};

// Floats of a row's workspace: (m, s, sum) of each piece, then the capped target logit.
constexpr int64_t xent_workspace_row(int64_t pieces) { return 3 * pieces + 1; }

inline XentRowsPlan plan_xent_rows(int64_t rows, int64_t V, int64_t sm_count) {
  XentRowsPlan p;
  const int64_t target = std::max<int64_t>(1, sm_count * kXentBlocksPerSm);
  p.pieces = xent_pieces(V);
  p.slices = std::min<int64_t>({p.pieces, std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(rows, 1))), 65535});
  p.grid = {std::max<int64_t>(1, std::min<int64_t>(rows, target)), p.slices, 1};
  p.workspace = p.slices > 1 ? rows * xent_workspace_row(p.pieces) : 0;
  p.smem = 3 * kThreads * static_cast<int64_t>(sizeof(float));
  return p;
}

}  // namespace cuda
}  // namespace lowcost
