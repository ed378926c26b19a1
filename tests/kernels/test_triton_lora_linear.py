"""Triton fused LoRA linear vs the float64 reference: y and u forward, dx, dA, dB, dbias backward.

Cases are listed, not a cartesian product: together they cover M in {0, 1, 7, 33, 129}, K and N not powers
of two (K % 4 != 0 takes the one-word-per-call mask path), r in {1, 7, 16, 24, 64, 128} (every R_PAD),
bias on/off, dropout 0 and 0.1 with seeds past 2**32, transposed x and strided grad_y, fp32/fp16/bf16 with
adapters in x's dtype or fp32, and every code path the launchers plan (checked below): TMA descriptors for
aligned operands and pointer loads otherwise, both GEMM tiles, persistent programs with several tiles,
one and several partials per reduction. Under the interpreter bf16 dots run in fp32 (UPCAST); on a GPU the
same tests run natively.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import assert_close_to_reference, make_lora_inputs, to_float64  # noqa: E402
from lowcost.reference import lora_linear_backward, lora_linear_forward  # noqa: E402

try:
    from lowcost.kernels import lora_linear as triton_lora
except ImportError:  # source tree without the installed package: kernels/ is lowcost.kernels
    from kernels import lora_linear as triton_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL = (True, True, True, True)

# id: (M, K, N, r, dtype, adapter dtype, bias, dropout, non-contiguous x and grad_y, seed)
CASES = {
    "fp32": (129, 100, 200, 7, F32, None, True, 0.0, False, 0),
    "fp32-dropout-strided": (129, 200, 100, 16, F32, None, False, 0.1, True, 2**40 + 3),
    "fp32-r1": (7, 48, 100, 1, F32, None, True, 0.1, False, 5),
    "fp32-oddK-strided": (33, 45, 48, 7, F32, None, True, 0.1, True, 2**63 - 1),
    "fp32-r128": (7, 100, 48, 128, F32, None, True, 0.1, False, 11),
    "fp32-M1-strided": (1, 200, 200, 16, F32, None, False, 0.1, True, 2**32),
    "fp16-strided": (129, 200, 48, 64, F16, None, True, 0.0, True, 0),
    "fp16-dropout": (7, 100, 200, 16, F16, None, False, 0.1, False, 77),
    "fp16-fp32adapters-strided": (129, 48, 100, 7, F16, F32, True, 0.1, True, 2**33 + 1),
    "fp16-r24": (33, 48, 100, 24, F16, None, True, 0.1, False, 8),
    "bf16": (129, 100, 48, 16, BF16, None, False, 0.0, False, 0),
    "bf16-dropout-strided": (33, 200, 100, 64, BF16, None, True, 0.1, True, 2**45),
    "bf16-fp32adapters": (129, 100, 200, 7, BF16, F32, True, 0.1, False, 123),
    "bf16-fp32adapters-r1-M1-strided": (1, 48, 48, 1, BF16, F32, False, 0.0, True, 0),
    "bf16-oddK-r64": (129, 50, 100, 64, BF16, None, True, 0.1, False, 9),
    "bf16-tma-wide-dropout": (129, 264, 264, 16, BF16, None, True, 0.1, False, 2**40 + 1),
    "fp16-tma-fp32adapters-r24": (129, 96, 80, 24, F16, F32, True, 0.0, False, 0),
}


def _inputs(M, K, N, r, dtype, adapter_dtype, bias, noncontiguous):
    return make_lora_inputs(M, K, N, r, dtype, adapter_dtype=adapter_dtype, bias=bias,
                            noncontiguous=noncontiguous, seed=M * 7 + K + r, device=DEVICE)


def _forward(inp, scale, dropout, seed, impl):
    return impl(inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["bias"], scale, dropout, seed)


def _backward(inp, u, scale, dropout, seed, needs, impl):
    return impl(inp["grad_y"], inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], u, scale, dropout, seed,
                needs)


def _check_grads(grads, expected, inp, needs):
    dtypes = (inp["x"].dtype, inp["lora_a"].dtype, inp["lora_b"].dtype, inp["x"].dtype)
    for name, got, want, dtype, needed in zip(("dx", "dA", "dB", "dbias"), grads, expected, dtypes, needs):
        if not needed:
            assert got is None, f"{name} returned although not needed"
            continue
        assert got.dtype == dtype, f"{name} dtype {got.dtype}, expected {dtype}"
        assert_close_to_reference(name, got, want, inp["x"].dtype)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_float64_reference(case):
    M, K, N, r, dtype, adapter_dtype, bias, dropout, noncontiguous, seed = case
    inp = _inputs(M, K, N, r, dtype, adapter_dtype, bias, noncontiguous)
    assert inp["x"].is_contiguous() != noncontiguous or M <= 1
    scale = 2.0 / r
    y, u = _forward(inp, scale, dropout, seed, triton_lora.lora_linear_fwd)
    y64, u64 = _forward(to_float64(inp), scale, dropout, seed, lora_linear_forward)
    assert y.dtype == dtype and y.is_contiguous() and u.dtype == F32 and u.is_contiguous()
    assert_close_to_reference("u", u, u64, dtype)
    assert_close_to_reference("y", y, y64, dtype)
    grads = _backward(inp, u, scale, dropout, seed, ALL, triton_lora.lora_linear_bwd)
    expected = _backward(to_float64(inp), u64, scale, dropout, seed, ALL, lora_linear_backward)
    _check_grads(grads, expected, inp, ALL)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, True), (True, True, False, False)],
                         ids=lambda n: "".join(name for name, on in zip(("dx", "dA", "dB", "db"), n) if on))
def test_backward_subsets(needs):
    """Only the requested gradients come back, each still right (dA alone skips the dgrad GEMM)."""
    inp = _inputs(33, 100, 48, 7, F32, None, True, True)
    y, u = _forward(inp, 0.5, 0.1, 42, triton_lora.lora_linear_fwd)
    y64, u64 = _forward(to_float64(inp), 0.5, 0.1, 42, lora_linear_forward)
    grads = _backward(inp, u, 0.5, 0.1, 42, needs, triton_lora.lora_linear_bwd)
    expected = _backward(to_float64(inp), u64, 0.5, 0.1, 42, ALL, lora_linear_backward)
    _check_grads(grads, expected, inp, needs)


def test_empty_batch():
    inp = _inputs(0, 48, 100, 7, F32, None, True, False)
    y, u = _forward(inp, 1.0, 0.1, 1, triton_lora.lora_linear_fwd)
    assert y.shape == (0, 100) and u.shape == (0, 7) and u.dtype == F32
    dx, da, db, dbias = _backward(inp, u, 1.0, 0.1, 1, ALL, triton_lora.lora_linear_bwd)
    assert dx.shape == (0, 48)
    for got, shape in ((da, (7, 48)), (db, (100, 7)), (dbias, (100,))):
        assert got.shape == shape and not got.any()


def test_dropout_through_forward():
    """u = x̃ Aᵀ with x = 1 and A = [I 0]: u is D itself, so the drop fraction and keep scale are visible."""
    M, K, r, p = 256, 96, 64, 0.3
    x = torch.ones(M, K, device=DEVICE)
    lora_a = torch.eye(r, K, device=DEVICE)
    weight, lora_b = torch.zeros(16, K, device=DEVICE), torch.zeros(16, r, device=DEVICE)
    _, u = triton_lora.lora_linear_fwd(x, weight, lora_a, lora_b, None, 1.0, p, 31337)
    keep_scale = float(torch.tensor(1 / (1 - p), dtype=F32))
    assert set(u.unique().tolist()) <= {0.0, keep_scale}, "kept values must be exactly x * float32(1/(1-p))"
    dropped = (u == 0).float().mean().item()
    sigma = (p * (1 - p) / u.numel()) ** 0.5
    assert abs(dropped - p) <= 5 * sigma, f"dropped fraction {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"
    mask = triton_lora.dropout_keep_mask(M, K, 31337, p, DEVICE)
    assert torch.equal(u != 0, mask[:, :r]), "forward mask differs from dropout_keep_mask"


def _planned(case) -> list:
    """The launches the launchers plan for a case (forward, then backward with every gradient)."""
    M, K, N, r, dtype, adapter_dtype, bias, dropout, noncontiguous, seed = case
    inp = _inputs(M, K, N, r, dtype, adapter_dtype, bias, noncontiguous)
    sms = triton_lora.sm_count(torch.device(DEVICE))
    fwd, _, u = triton_lora.plan_forward(inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["bias"], 1.0,
                                         dropout, seed, sms)
    bwd, _ = triton_lora.plan_backward(inp["grad_y"], inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], u,
                                       1.0, dropout, seed, ALL, sms)
    return fwd + bwd


def test_cases_reach_every_code_path():
    """The listed shapes make the launchers plan every path the kernel report compiles: TMA and pointer
    operands for every kernel, both GEMM tiles, the low-rank K-steps on and off, every R_PAD, both mask
    paths, several partials per reduction and persistent programs that own more than one tile."""
    if torch.device(DEVICE).type == "cuda":
        pytest.skip("the plans depend on the GPU's SM count")
    seen = set()
    for case in CASES.values():
        if case[0] == 0:
            continue
        for launch in _planned(case):
            meta, kind = launch.constexprs, launch.label
            seen.add((kind, "TMA", meta.get("TMA")))
            seen.update((kind, flag, meta[flag]) for flag in ("R_PAD", "MASK_VEC4", "LOWRANK", "DX_LOWRANK",
                                                              "BLOCK_N") if flag in meta)
            if kind.startswith("reduce"):
                seen.add((kind, "parts>1", launch.args["n_parts"] > 1))
            if launch.persistent:
                tiles = -(-launch.args["M"] // meta["BLOCK_M"]) * -(-launch.args["K" if kind == "bwd_dx" else "N"]
                                                                    // meta["BLOCK_N"])
                seen.add((kind, "tiles>programs", tiles > launch.grid[0]))
    wide, narrow = (c.block_n for c in triton_lora.block_configs("gemm", BF16))
    expected = {(k, "TMA", v) for k in ("fwd_u", "fwd_y", "bwd_g", "bwd_dx", "bwd_x") for v in (True, False)}
    expected |= {("fwd_u", "R_PAD", p) for p in triton_lora.AOT_RANKS} | {("bwd_x", "MASK_VEC4", v) for v in (0, 1)}
    expected |= {("bwd_dx", "LOWRANK", v) for v in (0, 1)} | {("bwd_x", "DX_LOWRANK", v) for v in (0, 1)}
    expected |= {(k, "BLOCK_N", n) for k in ("fwd_y", "bwd_dx") for n in (wide, narrow)}
    expected |= {(f"reduce_{n}", "parts>1", True) for n in ("u", "du", "dB", "dbias", "dA")}
    expected |= {(k, "tiles>programs", True) for k in ("fwd_y", "bwd_dx")}
    assert not expected - seen, f"paths no case reaches: {sorted(expected - seen, key=str)}"


def test_tma_only_for_aligned_operands():
    """Contiguous operands with 16-byte rows go through TMA descriptors; a transposed x, an odd K in bf16
    or a strided grad_y fall back to pointer loads (and still match the reference: the cases above)."""
    def tma_of(case):
        return {launch.label: launch.constexprs["TMA"] for launch in _planned(case) if "TMA" in launch.constexprs}
    assert all(tma_of(CASES["bf16-tma-wide-dropout"]).values())
    assert not any(tma_of(CASES["bf16-oddK-r64"]).values())  # K = 50: 100-byte rows
    strided = tma_of(CASES["fp32-dropout-strided"])          # x transposed, grad_y every other column
    assert not strided["fwd_u"] and not strided["bwd_g"] and not strided["bwd_dx"]


def test_backward_is_bitwise_reproducible():
    """Two backward runs give bitwise equal gradients (no atomics: per-block partials summed in a fixed
    order). On a GPU this is what catches atomics; on the interpreter programs run in order, so the test
    below adds the CPU-side guard that every partial is written before it is summed."""
    case = CASES["bf16-tma-wide-dropout"]
    M, K, N, r, dtype, adapter_dtype, bias, dropout, noncontiguous, seed = case
    inp = _inputs(M, K, N, r, dtype, adapter_dtype, bias, noncontiguous)
    _, u = _forward(inp, 0.5, dropout, seed, triton_lora.lora_linear_fwd)
    first = _backward(inp, u, 0.5, dropout, seed, ALL, triton_lora.lora_linear_bwd)
    second = _backward(inp, u, 0.5, dropout, seed, ALL, triton_lora.lora_linear_bwd)
    for name, a, b in zip(("dx", "dA", "dB", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two backward runs"


def test_every_partial_is_written_before_it_is_summed(monkeypatch):
    """With every float buffer the launchers allocate pre-filled with NaN, results are unchanged: no kernel
    reads memory that another has not written (an unwritten partial would turn a gradient into NaN)."""
    case = CASES["fp16-tma-fp32adapters-r24"]
    M, K, N, r, dtype, adapter_dtype, bias, dropout, noncontiguous, seed = case
    inp = _inputs(M, K, N, r, dtype, adapter_dtype, bias, noncontiguous)
    clean_y, clean_u = _forward(inp, 0.5, 0.1, seed, triton_lora.lora_linear_fwd)
    clean = _backward(inp, clean_u, 0.5, 0.1, seed, ALL, triton_lora.lora_linear_bwd)
    empty = torch.empty

    def poisoned(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", poisoned)
    y, u = _forward(inp, 0.5, 0.1, seed, triton_lora.lora_linear_fwd)
    grads = _backward(inp, u, 0.5, 0.1, seed, ALL, triton_lora.lora_linear_bwd)
    assert torch.equal(y, clean_y) and torch.equal(u, clean_u)
    for name, a, b in zip(("dx", "dA", "dB", "dbias"), grads, clean):
        assert torch.equal(a, b), f"{name} changed when fresh buffers held NaN"


def test_no_atomics_in_the_kernels():
    """The kernel sources contain no atomic operation (the kernel report checks the compiled SASS too)."""
    import inspect
    from lowcost.kernels import lora_linear_bwd, lora_linear_fwd, reduce
    for module in (lora_linear_fwd, lora_linear_bwd, reduce):
        assert "atomic" not in inspect.getsource(module).replace("no atomics", ""), module.__name__
