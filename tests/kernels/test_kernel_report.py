"""tools/kernel_report.py: occupancy arithmetic, SASS parsing, the issue #9 target checks, and one
end-to-end compile of a small shape for sm_90a (a subprocess: the tool compiles for the GPU, so it must not
inherit this process's Triton interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from kernel_report_compile import occupancy, sass_opcodes  # noqa: E402
from kernel_report_targets import violations  # noqa: E402

JSON_KEYS = {"kernel", "backend", "role", "grid", "persistent", "regs", "spills", "smem", "ctas_per_sm", "mma",
             "tma", "atomics", "barriers"}


@pytest.mark.parametrize("regs,warps,smem,expected", [
    (104, 8, 98304, (2, "regs")),      # 104 regs -> 3328 per warp -> 4 warps per sub-partition -> 16 warps
    (64, 4, 0, (8, "regs")),           # 2048 regs per warp -> 8 per sub-partition -> 32 warps -> 8 CTAs
    (24, 4, 0, (16, "threads")),       # 2048 threads / 128 (registers would allow 21)
    (32, 1, 0, (32, "blocks")),        # the 32-CTA cap
    (40, 4, 100 * 1024, (2, "smem")),  # (100 KiB + 1 KiB reserved) x 2 <= 228 KiB
    (40, 4, 233 * 1024, (0, "smem")),  # over the 227 KiB a CTA may use: cannot launch
])
def test_occupancy(regs, warps, smem, expected):
    assert occupancy(regs, warps, smem) == expected


def test_sass_opcodes_ignore_predicates_and_modifiers():
    sass = """
        /*0090*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*00a0*/              @!P0 RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;
        /*00b0*/               @P1 UTMALDG.2D [UR8], [UR10] ;
        /*00c0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00d0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12], R24 ;
    """
    ops = sass_opcodes(sass)
    assert (ops["HGMMA"], ops["RED"], ops["UTMALDG"], ops["BAR"]) == (2, 1, 1, 1)


def _row(**overrides):
    row = {"kernel": "fwd_y", "backend": "triton", "role": "gemm", "grid": 132, "persistent": True, "regs": 160,
           "spills": 0, "smem": 1000, "ctas_per_sm": 1, "mma": "wgmma", "tma": True, "atomics": 0, "barriers": 20,
           "shape": "8192,4096,4096,16", "dropout": 0.05, "dtype": "bf16", "ok": True}
    return {**row, **overrides}


def test_targets_hold_for_a_clean_report():
    rows = [_row(), _row(kernel="reference GEMM (fwd_y)", reference=True, regs=156),
            _row(kernel="bwd_g", role="pass", persistent=False, grid=256, mma="mma.sync")]
    assert violations(rows, 132) == []


@pytest.mark.parametrize("overrides,reference_regs,message", [
    ({"regs": 200}, 156, "registers 200 > 1.1 x 156"),
    ({"mma": "mma.sync"}, 156, "MMA is mma.sync, target wgmma"),
    ({"tma": False}, 156, "do not use TMA"),
    ({"persistent": False, "grid": 4096}, 156, "not persistent"),
    ({"spills": 8}, 156, "8 bytes of spills"),
    ({"kernel": "bwd_g", "role": "pass", "persistent": False, "grid": 256, "atomics": 3}, 156, "3 atomic"),
    ({"kernel": "fwd_u", "role": "pass", "persistent": False, "grid": 128}, 156, "launches 128 programs"),
    ({"ok": False, "error": "CompileError: boom"}, 156, "does not compile: CompileError: boom"),
])
def test_each_violated_target_is_named(overrides, reference_regs, message):
    rows = [_row(**overrides), _row(kernel="reference GEMM (fwd_y)", reference=True, regs=reference_regs)]
    found = violations(rows, 132)
    assert any(message in line and line.startswith(overrides.get("kernel", "fwd_y")) for line in found), found


def test_report_compiles_a_small_shape_for_sm90a(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "tools" / "kernel_report.py"), "--shape", "256,128,192,16", "--dropout",
           "0.05", "--backend", "triton", "--json", "--jobs", "2", "--check"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert all(JSON_KEYS <= set(row) and row["backend"] == "triton" for row in rows)
    kernels = {row["kernel"] for row in rows}
    assert {"fwd_u", "fwd_y", "bwd_g", "bwd_dx", "bwd_x", "reference GEMM (fwd_y)"} <= kernels
    assert all(row["reference"] for row in rows if row["kernel"].startswith("reference"))
    gemms = [row for row in rows if row["role"] == "gemm" and not row.get("reference") and row["op"] == "lora_linear"]
    assert gemms and all(row["mma"] == "wgmma" and row["tma"] and row["persistent"] for row in gemms)
    assert all(row["atomics"] == 0 and row["spills"] == 0 for row in rows)
    fused = {row["op"]: set() for row in rows}
    for row in rows:
        fused[row["op"]].add(row["kernel"])
    assert fused["lora_gated_mlp"] == {"mlp_down_u", "mlp_down_y", "mlp_dh", "mlp_da", "reduce_mlp_dA"}
    assert fused["linear_cross_entropy"] == {"xent_rows", "xent_rows_grad"}
    assert all(row["mma"] == "wgmma" for row in rows if row["op"] == "lora_gated_mlp" and row["role"] == "gemm")


def test_fused_ops_all_configs_cover_every_kernel_once_with_the_benchmark_launches():
    """--all-configs takes the fused MLP's and loss's launches from their planners: every kernel, each
    configuration once, and the launches at the benchmark shapes (Llama-3-8B's MLP, vocab 128256)."""
    sys.path.insert(0, str(REPO))
    from kernels.fused_launches import aot_launches
    launches = list(aot_launches())
    labels = [launch.label for launch in launches]
    assert len(labels) == len(set(labels))
    assert {getattr(launch.kernel, "fn", launch.kernel).__name__ for launch in launches} >= {
        "_gated_down_u_kernel", "_gated_down_y_kernel", "_gated_dh_kernel", "_gated_da_kernel", "_xent_rows_kernel"}
    bench = [launch for launch in launches if "bench" in launch.label]
    assert any(launch.label.startswith("mlp_dh") and launch.grid == (128 * 224,) for launch in bench)
    assert any(launch.label.startswith("xent_rows_grad") and launch.grid == (264,) for launch in bench)


def test_quantized_mlp_all_configs_cover_every_format_dtype_and_dropout_once():
    """--all-configs takes the quantized fused MLP's down-projection GEMMs (issue #13) from their planner: both
    kernels for every format and x dtype, the dh kernel with dropout off and on, each configuration once."""
    sys.path.insert(0, str(REPO))
    from kernels.qlora_dequant import FORMAT_IDS
    from kernels.qlora_gated_mlp import aot_launches
    launches = list(aot_launches())
    labels = [launch.label for launch in launches]
    assert len(labels) == len(set(labels))
    seen = {(launch.label.split()[0], launch.constexprs["FMT"], launch.label.split()[2],
             launch.constexprs.get("HAS_DROPOUT")) for launch in launches}
    for fmt in FORMAT_IDS.values():
        for dtype in ("bfloat16", "float16", "float32"):
            assert ("qmlp_down_y", fmt, dtype, None) in seen
            assert {("qmlp_dh", fmt, dtype, True), ("qmlp_dh", fmt, dtype, False)} <= seen


def test_quantized_mlp_report_compiles_for_sm90a(tmp_path):
    """--op qlora_gated_mlp: the two dequantizing GEMMs per --scheme, compiled, with wgmma and no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "tools" / "kernel_report.py"), "--op", "qlora_gated_mlp", "--scheme", "q4_k",
           "--shape", "256,256,512,16", "--dropout", "0.05", "--backend", "triton", "--json", "--jobs", "2",
           "--check"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert {row["kernel"] for row in rows} == {"qmlp_down_y q4_k", "qmlp_dh q4_k"}
    assert all(row["op"] == "qlora_gated_mlp:q4_k" and row["mma"] == "wgmma" and row["spills"] == 0 for row in rows)


def test_cuda_rows_come_from_the_cuda_module_or_say_why_not(monkeypatch):
    """--backend cuda|all takes the CUDA kernels' rows from tools/kernel_report_cuda.py (another module's
    job); its RuntimeError (a missing toolchain) becomes a printed reason, not a crash."""
    import types
    import kernel_report

    fake = types.ModuleType("kernel_report_cuda")
    fake.cuda_kernel_rows = lambda M, K, N, r, dtype, dropout, arch: [
        {"kernel": "lora_down", "backend": "cuda", "role": "pass", "grid": 264, "persistent": False, "regs": 40,
         "spills": 0, "smem": 0, "ctas_per_sm": 8, "mma": "mma.sync", "tma": False, "atomics": 0, "barriers": 2}]
    monkeypatch.setitem(sys.modules, "kernel_report_cuda", fake)
    rows, error = kernel_report.cuda_rows([(8192, 4096, 4096, 16)], "bf16", [0.05], "sm_90a")
    assert error == "" and rows[0]["kernel"] == "lora_down" and rows[0]["shape"] == "8192,4096,4096,16"
    assert violations(rows, 132) == []

    def missing(*args):
        raise RuntimeError("nvcc not found")
    fake.cuda_kernel_rows = missing
    rows, error = kernel_report.cuda_rows([(8192, 4096, 4096, 16)], "bf16", [0.05], "sm_90a")
    assert rows == [] and "nvcc not found" in error


def test_quantized_grouped_report_lists_every_launch_of_the_op_without_compiling():
    """--op qlora_grouped_linear: the planners' launches of one forward + backward of q/k/v on a quantized base at
    Llama-3-8B's attention input, each labelled by its projection, the dequantizing GEMMs by format, and the dgrads
    after the first (which add into dx) as ACCUMULATE; dropout swaps the grouped dA pass for per-projection x-passes.
    Planning only (placeholder tensors): a broken planner or label breaks this, not just the compile."""
    import kernel_report

    def kernels(p):
        jobs = kernel_report.report_jobs(None, "bf16", (p,), 132, ("qlora_grouped_linear:q6_k",))
        assert all(job["op"] == "qlora_grouped_linear:q6_k" and job["shape"] == "8192,4096,4096,16" for job in jobs)
        labels = [job["kernel"] for job in jobs]
        assert len(labels) == len(set(labels)), labels   # the target check keys rows by label
        return {job["kernel"]: job for job in jobs}

    per_projection = {f"{name} ({x})" for name in ("bwd_g", "reduce_du", "reduce_dB") for x in "qkv"}
    gemms = {"qfwd_y q6_k (q)", "qfwd_y q6_k (k)", "qfwd_y q6_k (v)", "qbwd_dx q6_k (q)", "qbwd_dx q6_k (k, ACCUMULATE)",
             "qbwd_dx q6_k (v, ACCUMULATE)"}
    plain, dropout = kernels(0.0), kernels(0.05)
    assert set(plain) == {"grouped_u", "grouped_da", *gemms, *per_projection,
                          *(f"reduce_grouped_dA ({x})" for x in "qkv")}
    assert set(dropout) == {"grouped_u", *gemms, *per_projection, *(f"{k} ({x})" for k in ("bwd_x", "reduce_dA")
                                                                     for x in "qkv")}
    for jobs in (plain, dropout):
        assert {label for label, job in jobs.items() if job["role"] == "gemm"} == gemms
        accumulating = {label for label, job in jobs.items() if job["launch"].constexprs.get("ACCUMULATE")}
        assert accumulating == {"qbwd_dx q6_k (k, ACCUMULATE)", "qbwd_dx q6_k (v, ACCUMULATE)"}
        assert [jobs[f"qfwd_y q6_k ({x})"]["launch"].args["N"] for x in "qkv"] == [4096, 1024, 1024]
    assert plain["qbwd_dx q6_k (k, ACCUMULATE)"]["launch"].constexprs["LOWRANK"]        # du A inline at p = 0
    assert not dropout["qbwd_dx q6_k (k, ACCUMULATE)"]["launch"].constexprs["LOWRANK"]  # in the x-pass with dropout


def test_quantized_grouped_all_configs_add_the_accumulating_dgrad_once_per_configuration():
    """--all-configs adds the configurations only the quantized grouped op launches: the dgrad with ACCUMULATE,
    every x dtype, tile and du A flag on nf4 and every other format once (the epilogue is decode-independent)."""
    sys.path.insert(0, str(REPO))
    from kernels.qlora_dequant import FORMAT_IDS
    from kernels.qlora_grouped_linear import aot_launches
    launches = list(aot_launches())
    labels = [launch.label for launch in launches]
    assert len(labels) == len(set(labels)) == 12 + len(FORMAT_IDS) - 1
    assert all(launch.constexprs["ACCUMULATE"] and label.startswith("qbwd_dx") and label.endswith("ACCUMULATE")
               for launch, label in zip(launches, labels))
    assert {launch.constexprs["FMT"] for launch in launches} == set(FORMAT_IDS.values())
    nf4 = {(label.split()[2], launch.config_text(), launch.constexprs["LOWRANK"])
           for launch, label in zip(launches, labels) if label.startswith("qbwd_dx nf4 ")}
    assert len(nf4) == 12 and {dtype for dtype, _, _ in nf4} == {"bfloat16", "float16", "float32"}  # x 2 tiles x du A
