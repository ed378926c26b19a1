"""tools/kernel_report_cuda.py: launch plans, parsers, occupancy and the target check.

The launch-plan tests need only a host C++ compiler; the end-to-end report needs nvcc and the CUDA build of
torch in .venv-cu (scripts/check_cuda_build.sh makes it) and skips with a reason without them. CI runs the
full report with --check in scripts/check_cuda_build.sh.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import kernel_report_cuda as krc  # noqa: E402

needs_cxx = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="no host C++ compiler to build csrc/tools/print_launch_plan.cpp")


def _toolchain_missing() -> str:
    try:
        krc._cuda_site_packages()
        krc._nvcc()
        krc._demangler()
    except RuntimeError as error:
        return str(error)
    return ""


@needs_cxx
@pytest.mark.parametrize("N", [4096, 14336])
def test_launch_plan_at_the_benchmark_shapes(N):
    """The backend's launches at M=8192: every one fills 2 blocks per SM of an H200 (132 SMs)."""
    launches = krc.launches(8192, 4096, N, 16, "bf16")
    ops = [launch["op"] for launch in launches]
    assert ops == ["lora_down", "sum_partials", "lora_up", "lora_grad_pass", "sum_partials", "lora_dx_da",
                   "sum_partials"]
    for launch in launches:
        blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
        assert blocks >= 2 * 132, launch
        assert launch["threads"] == 256 and 0 < launch["smem"] <= 232448, launch
    assert launches[0]["kernel"] == "lowcost::cuda::lora_down_kernel<c10::BFloat16, c10::BFloat16, 16>"


@needs_cxx
def test_launch_plan_small_and_unsplit():
    """One row tile and few K tiles: no split needs a reduction for dA; ranks above 64 use chunks."""
    launches = krc.launches(1, 64, 64, 70, "fp16", "fp32")
    down = launches[0]
    assert down["kernel"] == "lowcost::cuda::lora_down_kernel<c10::Half, float, 64>"
    assert down["grid"] == [1, 1, 2]  # one K tile: no split; two rank chunks on z
    assert [launch["op"] for launch in launches] == ["lora_down", "lora_up", "lora_grad_pass", "lora_dx_da"]


@needs_cxx
@pytest.mark.parametrize("ranks,rt,chunks", [((16, 16, 16), 64, 1), ((64, 64, 64), 64, 3), ((5, 16), 32, 1)])
def test_grouped_down_launch_plan(ranks, rt, chunks):
    """lora_down_grouped at M, K = 8192, 4096: the rank tile covers the projections' 8-column fragments (5 -> 8),
    chunks of 64 columns on z, lora_down's K split (one rank chunk): >= 2 blocks per SM, then sum_partials."""
    launches = krc.grouped_down_launches(8192, 4096, ranks, "bf16")
    assert [launch["op"] for launch in launches] == ["lora_down_grouped", "sum_partials"]
    down = launches[0]
    assert down["kernel"] == f"lowcost::cuda::lora_down_grouped_kernel<c10::BFloat16, c10::BFloat16, {rt}>"
    splits = krc.launches(8192, 4096, 4096, 16, "bf16")[0]["grid"][1]
    assert down["grid"] == [8192 // 64, splits, chunks]
    assert down["grid"][0] * down["grid"][1] * down["grid"][2] >= 2 * 132
    x_tile, a_tile = 64 * 72 * 2, rt * 72 * 2
    assert down["smem"] == max(3 * (x_tile + a_tile) + x_tile, 4 * 32 * (rt // 8) * 16)  # 3 stages + the masked tile


@needs_cxx
def test_grouped_down_small_unsplit_and_refusals():
    """One row tile and one K tile: no split, no sum_partials; the printer refuses bad ranks."""
    launches = krc.grouped_down_launches(1, 64, (3, 0, 70), "fp16", "fp32")
    assert [launch["op"] for launch in launches] == ["lora_down_grouped"]
    assert launches[0]["grid"] == [1, 1, 2]   # 1 + 0 + 9 fragments: two chunks of 8
    with pytest.raises(RuntimeError):
        krc.grouped_down_launches(8, 64, (0, 0), "bf16")
    with pytest.raises(ValueError, match="ranks must be 1 to 8"):
        krc.grouped_down_rows(8, 64, tuple([1] * 9), "bf16")


@needs_cxx
@pytest.mark.parametrize("ranks,rt", [((16, 16, 16), 16), ((64, 64, 64), 64), ((5, 16, 70), 64)])
def test_grouped_dx_da_launch_plan(ranks, rt):
    """lora_dx_da_grouped at M, K = 8192, 4096: lora_dx_da's grid and row segments at the largest rank (so each dA_i
    adds the row tiles as its own lora_dx_da does), rank tile of the largest rank; shared memory: lora_dx_da's
    layout, a masked x tile and one 16 x 64 fp32 accumulator per 16 rows of each projection; then sum_partials."""
    launches = krc.grouped_dx_da_launches(8192, 4096, ranks, "bf16")
    assert [launch["op"] for launch in launches] == ["lora_dx_da_grouped", "sum_partials"]
    dx_da = launches[0]
    assert dx_da["kernel"] == f"lowcost::cuda::lora_dx_da_grouped_kernel<c10::BFloat16, c10::BFloat16, {rt}>"
    single = [launch for launch in krc.launches(8192, 4096, 4096, max(ranks), "bf16") if launch["op"] == "lora_dx_da"]
    assert dx_da["grid"] == single[0]["grid"] and dx_da["grid"][0] * dx_da["grid"][1] >= 2 * 132
    x_tile, du_tile, a_strip, dx_stage = 64 * 72 * 2, 64 * (rt + 4) * 4, rt * 72 * 2, 64 * 68 * 4
    fragments = sum(-(-r // 16) for r in ranks)
    assert dx_da["smem"] == 3 * (x_tile + du_tile) + a_strip + dx_stage + x_tile + fragments * 16 * 64 * 4


@needs_cxx
def test_grouped_dx_da_small_unsplit_and_refusals():
    """One row tile: one row segment, no sum_partials; bad ranks are refused by the printer and the report."""
    launches = krc.grouped_dx_da_launches(1, 64, (3, 0, 70), "fp16", "fp32")
    assert [launch["op"] for launch in launches] == ["lora_dx_da_grouped"]
    assert launches[0]["grid"] == [1, 1, 1]
    with pytest.raises(RuntimeError):
        krc.grouped_dx_da_launches(8, 64, (0, 0), "bf16")
    with pytest.raises(ValueError, match="ranks must be 1 to 8"):
        krc.grouped_dx_da_rows(8, 64, tuple([1] * 9), "bf16")
    with pytest.raises(ValueError, match="rounded up to 16 must sum to at most 256"):
        krc.grouped_dx_da_rows(8, 64, (130, 130), "bf16")


@needs_cxx
@pytest.mark.parametrize("quant, fmt", [("nf4", 0), ("nf4-dq", 1), ("int8", 2), ("q8_0", 3), ("q4_0", 4), ("q4_1", 5),
                                        ("q4_k", 6), ("q6_k", 7)])
def test_launch_plan_on_a_quantized_weight(quant, fmt):
    """With a quantized weight the base GEMMs are lowcost's dequantizing kernels (forward after lora_up, dgrad
    last), 64 x 64 output tiles: N/64 x M/64 and K/64 x M/64 blocks, well above 2 per SM."""
    launches = krc.launches(8192, 4096, 14336, 16, "bf16", quant=quant)
    ops = [launch["op"] for launch in launches]
    assert ops == ["lora_down", "sum_partials", "lora_up", "dequant_gemm", "lora_grad_pass", "sum_partials",
                   "lora_dx_da", "sum_partials", "dequant_gemm_dgrad"]
    fwd, dgrad = launches[3], launches[-1]
    assert fwd["kernel"] == f"lowcost::cuda::dequant_gemm_kernel<c10::BFloat16, {fmt}, false>"
    assert dgrad["kernel"] == f"lowcost::cuda::dequant_gemm_kernel<c10::BFloat16, {fmt}, true>"
    assert fwd["grid"] == [14336 // 64, 8192 // 64, 1] and dgrad["grid"] == [4096 // 64, 8192 // 64, 1]
    assert fwd["smem"] == dgrad["smem"] == 2 * 2 * 64 * 72 * 2 + 272 * 4  # 2 stages of x and W tiles, code books


def test_quant_formats_are_the_cuda_backends():
    """The report covers exactly the formats the cuda backend takes (lowcost.ops._quant_backends.CUDA_FORMATS)."""
    from lowcost.ops._quant_backends import CUDA_FORMATS
    assert krc.QUANT_FORMATS == CUDA_FORMATS


def test_occupancy_on_sm90():
    assert krc.occupancy(128, 256, 0) == (2, "regs")
    assert krc.occupancy(61, 256, 67584) == (3, "smem")
    assert krc.occupancy(40, 256, 512) == (6, "regs")
    assert krc.occupancy(24, 256, 0) == (8, "threads")
    assert krc.occupancy(32, 256, 240 * 1024) == (0, "smem")


def test_ptxas_and_sass_parsers():
    log = """ptxas info    : Compiling entry function '_Z1fv' for 'sm_90a'
ptxas info    : Function properties for _Z1fv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90a'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""
    assert krc._ptxas_resources(log) == {"_Z1fv": {"regs": 96, "spills": 8, "static_smem": 512},
                                         "_Z1gv": {"regs": 40, "spills": 0, "static_smem": 0}}
    sass = """	code for sm_90a
		Function : _Z1fv
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/              @!P0 RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
		Function : _Z1gv
        /*0000*/                   EXIT ;
"""
    counts = krc._sass_counts(sass)
    assert counts["_Z1fv"]["HMMA"] == 1 and counts["_Z1fv"]["RED"] == 1 and counts["_Z1fv"]["BAR"] == 1
    assert krc._mma_kind(counts["_Z1fv"]) == "mma.sync" and krc._mma_kind(counts["_Z1gv"]) == "none"


def test_check_flags_each_target():
    good = {"kernel": "lora_dx_da_kernel<bf16, bf16, 16>", "config": "", "op": "lora_dx_da", "spills": 0,
            "atomics": 0, "mma": "mma.sync", "grid": 320, "persistent": False}
    assert krc.check_rows([good], 8192, "bf16") == []
    bad = dict(good, spills=8, atomics=4, mma="none", grid=128)
    failures = krc.check_rows([bad], 8192, "bf16")
    assert len(failures) == 4 and any("atomic" in f for f in failures) and any("HMMA" in f for f in failures)
    assert krc.check_rows([dict(good, mma="none")], 8192, "fp32") == []  # fp32 keeps FMAs by design
    assert krc.check_rows([dict(good, grid=10)], 64, "bf16") == []  # the grid target is for M >= 8192


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        krc.cuda_kernel_rows(8, 8, 8, 4, "fp64", 0.0, "sm_90a")
    with pytest.raises(ValueError, match="dropout must lie in"):
        krc.cuda_kernel_rows(8, 8, 8, 4, "bf16", 1.0, "sm_90a")
    with pytest.raises(SystemExit):  # argparse: --shape must be M,K,N,r
        krc.main(["--shape", "8,8,8"])


@pytest.mark.skipif(bool(_toolchain_missing()), reason=f"CUDA toolchain for the report: {_toolchain_missing()}")
def test_report_rows_and_targets_at_the_benchmark_shape():
    """Compiles csrc/cuda/*.cu for sm_90a (cached by the sources' hash) and checks the issue's targets."""
    rows = krc.cuda_kernel_rows(8192, 4096, 4096, 16, "bf16", 0.05, "sm_90a")
    assert all(tuple(row) == krc.KEYS for row in rows)
    skinny = [row for row in rows if not row["kernel"].startswith("sum_partials")]
    assert len(skinny) == 4 and all(row["mma"] == "mma.sync" for row in skinny)
    assert all(row["atomics"] == 0 and row["spills"] == 0 and row["grid"] >= 264 for row in rows)
    assert all(row["backend"] == "cuda" and row["role"] == "pass" and not row["persistent"] for row in rows)


@needs_cxx
@pytest.mark.parametrize("act, code", [("silu", 0), ("gelu_tanh", 1), ("gelu", 2)])
def test_launch_plan_of_the_fused_mlp_elementwise_steps(act, code):
    """The fused MLP's own launches (issue #12): h forward, h again and its gradients backward, grid-stride."""
    launches = krc.gated_act_launches(8192, 14336, "bf16", act)
    assert [launch["op"] for launch in launches] == ["gated_act_mul", "gated_act_mul", "gated_act_mul_backward"]
    assert launches[0]["kernel"] == f"lowcost::cuda::gated_act_mul_kernel<c10::BFloat16, {code}>"
    assert launches[2]["kernel"] == f"lowcost::cuda::gated_act_mul_backward_kernel<c10::BFloat16, {code}>"
    assert all(launch["grid"] == [132 * 16, 1, 1] and launch["smem"] == 0 for launch in launches)
    assert krc.gated_act_launches(3, 5, "fp32", act)[0]["grid"] == [1, 1, 1]   # 15 elements: one block


def test_check_flags_local_memory_of_the_elementwise_kernels():
    row = {"kernel": "gated_act_mul_kernel<bf16, 0>", "config": "", "op": "gated_act_mul", "spills": 0,
           "atomics": 0, "mma": "none", "grid": 2112, "persistent": False, "local": 0}
    assert krc.check_rows([row], 8192, "bf16") == []          # no MMA target for an elementwise kernel
    failures = krc.check_rows([dict(row, local=6)], 8192, "bf16")
    assert len(failures) == 1 and "local-memory" in failures[0]


@pytest.mark.skipif(bool(_toolchain_missing()), reason=f"CUDA toolchain for the report: {_toolchain_missing()}")
def test_report_rows_of_the_fused_mlp_elementwise_steps():
    rows = krc.gated_act_rows(8192, 14336, "bf16", "gelu_tanh")
    assert krc.check_rows(rows, 8192, "bf16") == []
    assert all(row["mma"] == "none" and row["local"] == 0 and row["barriers"] == 0 for row in rows)


@needs_cxx
def test_launch_plan_of_the_cross_entropy_row_pass():
    """softmax_xent_rows (issue #12): at the default chunk (264 rows of 128,256 logits, 16 pieces) each row is split
    over 4 blocks, 8 per SM, partials then finish; rows that fill the GPU run one block per row in one launch; few
    rows split into at most one slice per piece."""
    split = krc.xent_rows_launches(264, 128256, "bf16")
    assert [launch["kernel"] for launch in split] == [
        "lowcost::cuda::xent_partials_kernel<c10::BFloat16>", "lowcost::cuda::xent_finish_kernel<c10::BFloat16, false>",
        "lowcost::cuda::xent_partials_kernel<c10::BFloat16>", "lowcost::cuda::xent_finish_kernel<c10::BFloat16, true>"]
    assert [launch["grid"] for launch in split] == [[264, 4, 1], [264, 1, 1], [264, 4, 1], [264, 4, 1]]
    assert "51744 B fp32 workspace" in split[0]["config"]   # 264 rows x (3 x 16 + 1) floats
    whole = krc.xent_rows_launches(2048, 32000, "fp16")
    assert [launch["kernel"] for launch in whole] == ["lowcost::cuda::xent_rows_kernel<c10::Half, false>",
                                                      "lowcost::cuda::xent_rows_kernel<c10::Half, true>"]
    assert all(launch["grid"] == [8 * 132, 1, 1] for launch in whole)   # grid-stride over the 2048 rows
    few = krc.xent_rows_launches(3, 20007, "fp32")
    assert few[0]["grid"] == [3, 3, 1] and few[3]["grid"] == [3, 3, 1]   # 3 pieces: at most 3 slices
    assert krc.xent_rows_launches(1, 8192, "fp32")[0]["kernel"].startswith("lowcost::cuda::xent_rows_kernel")
    assert [krc.xent_pieces(v) for v in (1, 8192, 8193, 20007, 128256)] == [1, 1, 2, 3, 16]


def test_check_flags_an_underfilled_row_pass():
    row = {"kernel": "xent_partials_kernel<bf16>", "config": "", "op": "softmax_xent_rows", "spills": 0,
           "atomics": 0, "mma": "none", "grid": 1056, "persistent": False, "local": 0}
    fold = dict(row, kernel="xent_finish_kernel<bf16, false>", grid=264)   # reads no logits: one block per row
    assert krc.check_xent_rows([row, fold], 264, 128256) == []
    failures = krc.check_xent_rows([dict(row, grid=264), dict(fold, kernel="xent_finish_kernel<bf16, true>")],
                                   264, 128256)
    assert len(failures) == 2 and all("target >= 1056" in f for f in failures)
    assert krc.check_xent_rows([dict(row, grid=3)], 3, 1001) == []   # one piece per row: 3 blocks is all there is


@pytest.mark.skipif(bool(_toolchain_missing()), reason=f"CUDA toolchain for the report: {_toolchain_missing()}")
def test_report_rows_of_the_cross_entropy_row_pass():
    rows = krc.xent_rows_rows(264, 128256, "bf16")
    assert krc.check_xent_rows(rows, 264, 128256) == []
    assert all(row["ctas_per_sm"] == 8 and row["spills"] == 0 and row["local"] == 0 for row in rows)
