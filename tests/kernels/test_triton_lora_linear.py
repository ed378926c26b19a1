"""Triton fused LoRA linear vs the float64 reference: y and u forward, dx, dA, dB, dbias backward.

Cases are listed, not a cartesian product: together they cover M in {0, 1, 7, 33, 129}, K and N not powers
of two (K % 4 != 0 takes the one-word-per-call mask path), r in {1, 7, 16, 24, 64, 128} (every R_PAD),
bias on/off, dropout 0 and 0.1 with seeds past 2**32, transposed x and strided grad_y, fp32/fp16/bf16 with
adapters in x's dtype or fp32, and every block configuration the launchers pick (checked below). Under
the interpreter bf16 dots run in fp32 (UPCAST); on a GPU the same tests run natively.
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


def test_cases_reach_every_block_config():
    """The listed shapes make the launchers pick every block configuration and every R_PAD that the AOT
    check compiles (on the interpreter, whose SM count is fixed at 2)."""
    device = torch.device(DEVICE)
    if device.type == "cuda":
        pytest.skip("the config choice depends on the GPU's SM count")
    outputs = {"fwd_u": lambda M, K, N, r: (M, r), "bwd_g": lambda M, K, N, r: (M, r),
               "fwd_y": lambda M, K, N, r: (M, N), "bwd_dx": lambda M, K, N, r: (M, K)}
    for kind, shape in outputs.items():
        picked = {triton_lora.pick_config(kind, *shape(M, K, N, r), dtype, device).name
                  for M, K, N, r, dtype, *_ in CASES.values() if M > 0}
        assert picked == {c.name for c in triton_lora.block_configs(kind, F32)}, kind
    assert {triton_lora.rank_pad(case[3]) for case in CASES.values()} == set(triton_lora.AOT_RANKS)
