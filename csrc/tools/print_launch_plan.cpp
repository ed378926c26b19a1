// Prints, as JSON, the CUDA kernel launches the `cuda` backend makes for one fused LoRA forward and
// backward (lowcost/ops/_cuda_backend.py: lora_down, lora_up, then lora_grad_pass, lora_dx_da, each
// followed by sum_partials when it split a reduction), from the plans of csrc/cuda/launch_plan.h that
// csrc/cuda/host_launchers.h launches with. Used by tools/kernel_report_cuda.py; plain C++17, no
// CUDA and no torch.
//
//   print_launch_plan M K N r X_DTYPE ADAPTER_DTYPE SMS HAS_BIAS [QUANT]
//   print_launch_plan gated_act M I DTYPE ACT SMS
//   print_launch_plan xent_rows C V DTYPE SMS
//   print_launch_plan down_grouped M K X_DTYPE ADAPTER_DTYPE SMS R0,R1,...
//   print_launch_plan dx_da_grouped M K X_DTYPE ADAPTER_DTYPE SMS R0,R1,...
//   (the second form: the fused gated MLP's own elementwise launches, lowcost/ops/_cuda_gated_mlp.py: h in the
//   forward, h again and the two input gradients in the backward; ACT: silu, gelu_tanh or gelu)
//   (the third form: the fused linear cross-entropy's row pass on the cuda backend, lowcost/ops/linear_cross_entropy.py,
//   for one chunk of C rows of V logits: softmax_xent_rows without dz (a forward that saves nothing) and with dz,
//   each one launch, or two (piece partials, then fold) when the plan splits rows into slices)
//   (the fourth form: the grouped linear's forward lora_down with dropout, lowcost/ops/_cuda_grouped_linear.py:
//   lora_down_grouped over one x (M, K) for projections of ranks R0, R1, ..., then sum_partials when K is split)
//   (the fifth form: its backward's low-rank terms with dropout: lora_dx_da_grouped over one x (M, K) for projections
//   of ranks R0, R1, ..., then sum_partials when rows are cut into segments)
//   (dtypes: bf16, fp16, fp32; the adapter dtype is fp32 or X_DTYPE; QUANT: nf4, nf4-dq, int8, q8_0, q4_0,
//   q4_1, q4_k, q6_k for a quantized weight, whose base GEMMs are lowcost's dequant_gemm / dequant_gemm_dgrad
//   instead of cuBLAS)
#include "../cuda/launch_plan.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

using namespace lowcost::cuda;

namespace {

struct Dtype {
  const char* cpp;  // the C++ type in the kernels' template arguments
  int bytes;
};

bool parse_dtype(const std::string& name, Dtype& out) {
  if (name == "bf16") out = {"c10::BFloat16", 2};
  else if (name == "fp16") out = {"c10::Half", 2};
  else if (name == "fp32") out = {"float", 4};
  else return false;
  return true;
}

bool g_first = true;

void print_launch(const std::string& op, const std::string& kernel, const LaunchGrid& grid, int64_t smem,
                  const std::string& config) {
  std::printf("%s\n  {\"op\": \"%s\", \"kernel\": \"%s\", \"grid\": [%lld, %lld, %lld], \"threads\": %d, "
              "\"smem\": %lld, \"config\": \"%s\"}",
              g_first ? "[" : ",", op.c_str(), kernel.c_str(), static_cast<long long>(grid.x),
              static_cast<long long>(grid.y), static_cast<long long>(grid.z), kThreads,
              static_cast<long long>(smem), config.c_str());
  g_first = false;
}

// The sum_partials launch host_launchers.h makes for these (n, count) jobs, if any.
void print_reduce(const std::string& after, std::initializer_list<std::pair<int64_t, int64_t>> jobs) {
  int64_t blocks = 0;
  std::string what;
  for (const auto& job : jobs) {
    if (!reduce_job_active(job.first, job.second)) continue;
    blocks += reduce_blocks(job.first);
    what += (what.empty() ? "" : " + ") + std::to_string(job.second) + " x " + std::to_string(job.first);
  }
  if (blocks > 0) {
    print_launch("sum_partials", "lowcost::cuda::sum_partials_kernel<3>", {blocks, 1, 1}, kReduceSmem,
                 "after " + after + ": " + what + " partials");
  }
}

std::string kernel_name(const char* name, std::initializer_list<std::string> args) {
  std::string out = std::string("lowcost::cuda::") + name + "<";
  bool first = true;
  for (const std::string& a : args) {
    out += (first ? "" : ", ") + a;
    first = false;
  }
  return out + ">";
}

// The kernel's format constant (csrc/cuda/dequant_tile.cuh) of a quantized format name, or -1.
int quant_format_id(const std::string& name) {
  if (name == "nf4") return 0;
  if (name == "nf4-dq") return 1;
  if (name == "int8") return 2;
  if (name == "q8_0") return 3;
  if (name == "q4_0") return 4;
  if (name == "q4_1") return 5;
  if (name == "q4_k") return 6;
  if (name == "q6_k") return 7;
  return -1;
}

void print_dequant_gemm(const char* op, const Dtype& x, int fmt, bool dgrad, int64_t M, int64_t P,
                        const std::string& scheme) {
  const DequantGemmPlan plan = plan_dequant_gemm(M, P, x.bytes);
  print_launch(op, kernel_name("dequant_gemm_kernel", {x.cpp, std::to_string(fmt), dgrad ? "true" : "false"}),
               plan.grid, plan.smem,
               "64x64 tiles, " + scheme + " W tile decoded to smem, " + std::to_string(kQgStages) + " stages");
}

// The kernels' ACT template argument (csrc/gated_act.h's GatedAct) of an activation name, or -1.
int gated_act_id(const std::string& name) {
  if (name == "silu") return 0;
  if (name == "gelu_tanh") return 1;
  if (name == "gelu") return 2;
  return -1;
}

int print_gated_act(int argc, char** argv) {
  Dtype x{};
  const int act = argc == 7 ? gated_act_id(argv[5]) : -1;
  if (argc != 7 || !parse_dtype(argv[4], x) || act < 0) {
    std::fprintf(stderr, "usage: %s gated_act M I DTYPE(bf16|fp16|fp32) ACT(silu|gelu_tanh|gelu) SMS\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[2]), I = std::atoll(argv[3]), sms = std::atoll(argv[6]);
  if (M < 1 || I < 1 || sms < 1) {
    std::fprintf(stderr, "M, I and SMS must be >= 1\n");
    return 2;
  }
  const LaunchGrid grid{gated_act_blocks(M * I, sms), 1, 1};
  const std::string config = "grid-stride, 4 elements per thread, " + std::string(argv[5]);
  const std::string fwd = kernel_name("gated_act_mul_kernel", {x.cpp, std::to_string(act)});
  print_launch("gated_act_mul", fwd, grid, 0, "forward: " + config);
  print_launch("gated_act_mul", fwd, grid, 0, "backward, h recomputed: " + config);
  print_launch("gated_act_mul_backward", kernel_name("gated_act_mul_backward_kernel", {x.cpp, std::to_string(act)}),
               grid, 0, "backward: " + config);
  std::printf("\n]\n");
  return 0;
}

int print_xent_rows(int argc, char** argv) {
  Dtype x{};
  if (argc != 6 || !parse_dtype(argv[4], x)) {
    std::fprintf(stderr, "usage: %s xent_rows C V DTYPE(bf16|fp16|fp32) SMS\n", argv[0]);
    return 2;
  }
  const int64_t C = std::atoll(argv[2]), V = std::atoll(argv[3]), sms = std::atoll(argv[5]);
  if (C < 1 || V < 1 || sms < 1) {
    std::fprintf(stderr, "C, V and SMS must be >= 1\n");
    return 2;
  }
  const XentRowsPlan plan = plan_xent_rows(C, V, sms);
  const std::string pieces = std::to_string(V) + " logits in " + std::to_string(plan.pieces) + " pieces of " +
                             std::to_string(lowcost::kXentPieceGroups * lowcost::kXentGroup) + ", 4 per thread per step";
  const int64_t blocks = plan.grid.x * plan.grid.y;
  const std::string filled = std::to_string(blocks) + " blocks, " + std::to_string(ceil_div(blocks, sms)) + " per SM";
  if (plan.slices == 1) {
    const std::string config = "one block per row (" + filled + "), " + pieces;
    print_launch("softmax_xent_rows", kernel_name("xent_rows_kernel", {x.cpp, "false"}), plan.grid, plan.smem,
                 "loss only: " + config);
    print_launch("softmax_xent_rows", kernel_name("xent_rows_kernel", {x.cpp, "true"}), plan.grid, plan.smem,
                 "loss and dz in place: " + config);
  } else {
    const std::string config = std::to_string(plan.slices) + " blocks per row (" + filled + "), " + pieces + ", " +
                               std::to_string(plan.workspace * 4) + " B fp32 workspace";
    const std::string partials = kernel_name("xent_partials_kernel", {x.cpp});
    print_launch("softmax_xent_rows", partials, plan.grid, plan.smem, "loss only, piece partials: " + config);
    print_launch("softmax_xent_rows", kernel_name("xent_finish_kernel", {x.cpp, "false"}), {plan.grid.x, 1, 1}, 0,
                 "loss only, fold and loss: one block per row, " + std::to_string(plan.pieces) + " piece partials");
    print_launch("softmax_xent_rows", partials, plan.grid, plan.smem, "loss and dz, piece partials: " + config);
    print_launch("softmax_xent_rows", kernel_name("xent_finish_kernel", {x.cpp, "true"}), plan.grid, 0,
                 "loss and dz, fold, loss and dz in place: " + config);
  }
  std::printf("\n]\n");
  return 0;
}

// Parses "R0,R1,..." (integers >= 0) into ranks; false on anything else.
bool parse_ranks(const char* text, std::vector<int64_t>& ranks) {
  for (const char* p = text; *p != '\0';) {
    char* end = nullptr;
    const long long r = std::strtoll(p, &end, 10);
    if (end == p || r < 0 || (*end != ',' && *end != '\0')) return false;
    ranks.push_back(r);
    p = *end == ',' ? end + 1 : end;
  }
  return !ranks.empty();
}

int print_down_grouped(int argc, char** argv) {
  Dtype x{}, a{};
  if (argc != 8 || !parse_dtype(argv[4], x) || !parse_dtype(argv[5], a)) {
    std::fprintf(stderr, "usage: %s down_grouped M K X_DTYPE(bf16|fp16|fp32) ADAPTER_DTYPE SMS R0,R1,...\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[2]), K = std::atoll(argv[3]), sms = std::atoll(argv[6]);
  std::vector<int64_t> ranks;
  const bool ranks_ok = parse_ranks(argv[7], ranks);
  int64_t fragments = 0, total = 0;
  const int64_t count = static_cast<int64_t>(ranks.size());
  for (const int64_t r : ranks) {
    fragments += down_fragments(r);
    total += r;
  }
  if (M < 1 || K < 1 || sms < 1 || !ranks_ok || total < 1 || count > 8 ||
      (a.bytes != 4 && std::string(argv[5]) != argv[4])) {
    std::fprintf(stderr, "M, K and SMS must be >= 1, the ranks 1 to 8 integers >= 0 (not all 0) and the adapter "
                 "dtype fp32 or the x dtype\n");
    return 2;
  }
  const DownPlan plan = plan_lora_down_grouped(M, K, fragments, sms, x.bytes, a.bytes);
  print_launch("lora_down_grouped", kernel_name("lora_down_grouped_kernel", {x.cpp, a.cpp, std::to_string(plan.rt)}),
               plan.grid, plan.smem,
               "64x64 x tiles, " + std::to_string(kDownStages) + " stages + a masked tile, " +
                   std::to_string(count) + " projections in " + std::to_string(plan.chunks) + " rank chunks, K split " +
                   std::to_string(plan.splits));
  print_reduce("lora_down_grouped", {{M * total, plan.splits}});
  std::printf("\n]\n");
  return 0;
}

int print_dx_da_grouped(int argc, char** argv) {
  Dtype x{}, a{};
  if (argc != 8 || !parse_dtype(argv[4], x) || !parse_dtype(argv[5], a)) {
    std::fprintf(stderr, "usage: %s dx_da_grouped M K X_DTYPE(bf16|fp16|fp32) ADAPTER_DTYPE SMS R0,R1,...\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[2]), K = std::atoll(argv[3]), sms = std::atoll(argv[6]);
  std::vector<int64_t> ranks;
  const bool ranks_ok = parse_ranks(argv[7], ranks);
  int64_t fragments = 0, total = 0, max_rank = 0;
  for (const int64_t r : ranks) {
    fragments += dx_da_fragments(r);
    total += r;
    max_rank = std::max(max_rank, r);
  }
  if (M < 1 || K < 1 || sms < 1 || !ranks_ok || total < 1 || ranks.size() > 8 ||
      (a.bytes != 4 && std::string(argv[5]) != argv[4])) {
    std::fprintf(stderr, "M, K and SMS must be >= 1, the ranks 1 to 8 integers >= 0 (not all 0) and the adapter "
                 "dtype fp32 or the x dtype\n");
    return 2;
  }
  const DxDaPlan plan = plan_lora_dx_da_grouped(M, K, max_rank, fragments, sms, x.bytes, a.bytes);
  print_launch("lora_dx_da_grouped",
               kernel_name("lora_dx_da_grouped_kernel", {x.cpp, a.cpp, std::to_string(plan.rt)}), plan.grid,
               plan.smem,
               "64x64 x tiles, " + std::to_string(kDxStages) + " stages + a masked tile, " +
                   std::to_string(ranks.size()) + " projections, " + std::to_string(fragments) +
                   " dA fragments in smem, " + std::to_string(plan.row_segments) + " row segments");
  print_reduce("lora_dx_da_grouped", {{total * K, plan.row_segments}});
  std::printf("\n]\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "gated_act") return print_gated_act(argc, argv);
  if (argc >= 2 && std::string(argv[1]) == "xent_rows") return print_xent_rows(argc, argv);
  if (argc >= 2 && std::string(argv[1]) == "down_grouped") return print_down_grouped(argc, argv);
  if (argc >= 2 && std::string(argv[1]) == "dx_da_grouped") return print_dx_da_grouped(argc, argv);
  Dtype x{}, a{};
  const std::string quant = argc == 10 ? argv[9] : "";
  const int fmt = quant.empty() ? -1 : quant_format_id(quant);
  if ((argc != 9 && argc != 10) || !parse_dtype(argv[5], x) || !parse_dtype(argv[6], a) ||
      (!quant.empty() && fmt < 0)) {
    std::fprintf(stderr, "usage: %s M K N r X_DTYPE(bf16|fp16|fp32) ADAPTER_DTYPE SMS HAS_BIAS(0|1) "
                 "[QUANT(nf4|nf4-dq|int8|q8_0|q4_0|q4_1|q4_k|q6_k)]\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), K = std::atoll(argv[2]), N = std::atoll(argv[3]), r = std::atoll(argv[4]);
  const int64_t sms = std::atoll(argv[7]);
  const bool bias = std::atoi(argv[8]) != 0;
  if (M < 1 || K < 1 || N < 1 || r < 1 || sms < 1 || (a.bytes != 4 && std::string(argv[6]) != argv[5])) {
    std::fprintf(stderr, "M, K, N, r and SMS must be >= 1 and the adapter dtype fp32 or the x dtype\n");
    return 2;
  }

  const DownPlan down = plan_lora_down(M, K, r, sms, x.bytes, a.bytes);
  print_launch("lora_down", kernel_name("lora_down_kernel", {x.cpp, a.cpp, std::to_string(down.rt)}), down.grid,
               down.smem, "64x64 x tiles, " + std::to_string(kDownStages) + " stages, K split " +
                              std::to_string(down.splits));
  print_reduce("lora_down", {{M * r, down.splits}});
  const UpPlan up = plan_lora_up(M, N, a.bytes);
  print_launch("lora_up", kernel_name("lora_up_kernel", {x.cpp, a.cpp}), up.grid, up.smem, "64x128 tiles");
  if (fmt >= 0) print_dequant_gemm("dequant_gemm", x, fmt, false, M, N, quant);

  const GradPassPlan gp = plan_lora_grad_pass(M, N, r, sms, x.bytes, a.bytes);
  print_launch("lora_grad_pass", kernel_name("lora_grad_pass_kernel", {x.cpp, a.cpp, std::to_string(gp.rt)}),
               gp.grid, gp.smem,
               "64x64 g tiles, " + std::to_string(kGpStages) + " stages, " + std::to_string(gp.col_segments) +
                   " column x " + std::to_string(gp.row_segments) + " row segments");
  print_reduce("lora_grad_pass", {{M * r, gp.col_segments}, {N * r, gp.row_segments}, {bias ? N : 0, gp.row_segments}});
  const DxDaPlan dxda = plan_lora_dx_da(M, K, r, sms, x.bytes, a.bytes);
  print_launch("lora_dx_da", kernel_name("lora_dx_da_kernel", {x.cpp, a.cpp, std::to_string(dxda.rt)}), dxda.grid,
               dxda.smem,
               "64x64 x tiles, " + std::to_string(kDxStages) + " stages, " + std::to_string(dxda.row_segments) +
                   " row segments");
  print_reduce("lora_dx_da", {{r * K, dxda.row_segments}});
  if (fmt >= 0) print_dequant_gemm("dequant_gemm_dgrad", x, fmt, true, M, K, quant);
  std::printf("\n]\n");
  return 0;
}
