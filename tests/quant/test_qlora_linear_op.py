"""lowcost.ops.lora_linear with a quantized weight, against the float64 reference on the dequantized dense weight
(output and every gradient), on odd shapes: M = 0 and 1, N odd, a K the NF4 block does not divide."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lowcost
from lowcost.reference import lora_linear_backward, lora_linear_forward
from lowcost.reference import qlora_linear as qref
from lowcost.ops import _quant_backends as qb
from lowcost.ops._quant_backends import TRITON_FORMATS
from lowcost.ops.backend import triton_usable
from helpers import assert_close_to_reference
from quant_cases import SCHEMES, k_for, make_quantized

HAS_TRITON = triton_usable(torch.device("cpu"))
CASES = [(scheme, "torch") for scheme in SCHEMES] + [
    pytest.param(scheme, "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
    for scheme in TRITON_FORMATS]

GRADS = ("x", "lora_a", "lora_b", "bias")


def _inputs(M, K, N, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    return {"x": rand(M, K), "lora_a": rand(r, K, std=K ** -0.5), "lora_b": rand(N, r, std=r ** -0.5),
            "bias": rand(N), "grad_y": rand(M, N)}


def _truth(t: dict, weight64: torch.Tensor, scale: float, dropout: float, seed: int) -> dict:
    """Float64 output and gradients of LoRA on the dense dequantized weight."""
    t64 = {k: v.double() for k, v in t.items()}
    y, u = lora_linear_forward(t64["x"], weight64, t64["lora_a"], t64["lora_b"], t64["bias"], scale, dropout, seed)
    dx, da, db, dbias = lora_linear_backward(t64["grad_y"], t64["x"], weight64, t64["lora_a"], t64["lora_b"], u,
                                             scale, dropout, seed)
    return {"y": y, "x": dx, "lora_a": da, "lora_b": db, "bias": dbias}


def _run(t: dict, weight, scale, dropout, seed, backend="torch", **kwargs) -> dict:
    leaves = {k: t[k].clone().requires_grad_() for k in GRADS}
    y = lowcost.ops.lora_linear(leaves["x"], weight, leaves["lora_a"], leaves["lora_b"], scale, bias=leaves["bias"],
                                dropout=dropout, seed=seed, backend=backend, **kwargs)
    y.backward(t["grad_y"])
    return {"y": y.detach(), **{k: leaves[k].grad for k in GRADS}}


@pytest.mark.parametrize("scheme, backend", CASES)
@pytest.mark.parametrize("M, K, N, r, dropout", [(7, 100, 37, 5, 0.0), (1, 260, 19, 16, 0.1), (0, 70, 13, 3, 0.1),
                                                 (33, 320, 65, 7, 0.25)])
def test_quantized_weight_matches_float64_reference(scheme, backend, M, K, N, r, dropout):
    """Output and every gradient; K = 100, 260, 70, 320 with NF4's 64-element blocks (padded rows), GGUF K
    rounded down to whole blocks; the Triton cases dequantize inside the GEMMs (p = 0: du A in the dgrad GEMM,
    p > 0: in the x-pass)."""
    K = k_for(scheme, K)
    weight = make_quantized(scheme, N, K, seed=1)
    t = _inputs(M, K, N, r, torch.float32)
    got = _run(t, weight, 0.75, dropout, 11, backend=backend)
    truth = _truth(t, weight.dequantize(torch.float64), 0.75, dropout, 11)
    for name, expected in truth.items():
        assert_close_to_reference(f"{scheme} {name}", got[name], expected, torch.float32)


@pytest.mark.parametrize("scheme, backend", [("nf4", "torch"), ("q4_k", "torch"), pytest.param(
    "nf4-dq", "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")), pytest.param(
    "q4_1", "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))])
@pytest.mark.parametrize("dtype, adapter", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_low_precision_activations(scheme, backend, dtype, adapter):
    K = k_for(scheme, 300)
    weight = make_quantized(scheme, 41, K, seed=2)
    t = _inputs(9, K, 41, 8, dtype)
    t["lora_a"], t["lora_b"] = t["lora_a"].to(adapter), t["lora_b"].to(adapter)
    got = _run(t, weight, 2.0, 0.1, 5, backend=backend)
    truth = _truth(t, weight.dequantize(torch.float64), 2.0, 0.1, 5)
    for name, expected in truth.items():
        assert_close_to_reference(f"{scheme} {name}", got[name], expected, dtype)
    assert got["y"].dtype == dtype and got["lora_a"].dtype == adapter


def test_float64_is_the_dense_reference_exactly():
    weight = make_quantized("nf4-dq", 23, 130, seed=4)
    t = {k: v.double() for k, v in _inputs(6, 130, 23, 4, torch.float64).items()}
    got = _run(t, weight, 0.5, 0.2, 9)
    truth = _truth(t, weight.dequantize(torch.float64), 0.5, 0.2, 9)
    for name, expected in truth.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-12, atol=1e-12)


def test_transient_weight_is_one_row_chunk(monkeypatch):
    """The torch path never dequantizes more than ROW_CHUNK_ELEMENTS (≥ one row) at a time, forward or backward,
    and the chunked result equals the one-chunk result."""
    weight = make_quantized("q4_1", 50, 96, seed=3)
    t = _inputs(5, 96, 50, 4, torch.float32)
    whole = _run(t, weight, 1.0, 0.0, 0)
    seen = []
    real = qref.row_chunks

    def spy(N, K, limit=None):
        for rows in real(N, K, limit):
            seen.append(rows.stop - rows.start)
            yield rows
    monkeypatch.setattr(qref, "ROW_CHUNK_ELEMENTS", 96 * 7)
    monkeypatch.setattr(qref, "row_chunks", spy)
    chunked = _run(t, weight, 1.0, 0.0, 0)
    assert seen and max(seen) == 7 and sum(seen) == 2 * 50      # forward and dgrad each walk all 50 rows
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_blocks_share_one_workspace_and_equal_one_block(scheme, monkeypatch):
    """Every format, chunked into blocks of 7 rows (N = 50: a last block of one row) with K = 100 (NF4 pads it):
    one workspace per op call (forward, dgrad) sized for one block of rows, and the chunked output and gradients
    match the one-block run (float32 GEMMs on other shapes: summation order only, so the tolerance is float32
    rounding relative to the tensor's magnitude; the random Q4_K / Q6_K blocks decode to large weights)."""
    K = k_for(scheme, 100)
    weight = make_quantized(scheme, 50, K, seed=3)
    t = _inputs(5, K, 50, 4, torch.float32)
    whole = _run(t, weight, 1.0, 0.0, 0)
    sizes = []
    real = qb.workspace_elements
    monkeypatch.setattr(qb, "workspace_elements", lambda *a: sizes.append(real(*a)) or real(*a))
    monkeypatch.setattr(qref, "ROW_CHUNK_ELEMENTS", K * 7)
    chunked = _run(t, weight, 1.0, 0.0, 0)
    assert sizes == [real(scheme, 7, K, weight.block_size)] * 2
    for name in ("y",) + GRADS:
        magnitude = float(whole[name].abs().max()) if whole[name].numel() else 1.0
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-5 * magnitude)


def test_no_dgrad_decode_when_x_needs_no_gradient(monkeypatch):
    """The first layer's input (a frozen embedding's output) needs no gradient: backward then decodes nothing,
    it only forms dA and dB."""
    weight = make_quantized("q4_1", 40, 64, seed=2)
    t = _inputs(3, 64, 40, 2, torch.float32)
    decodes = []
    real = qb.workspace_elements
    monkeypatch.setattr(qb, "workspace_elements", lambda *a: decodes.append(a) or real(*a))
    a, b = t["lora_a"].clone().requires_grad_(), t["lora_b"].clone().requires_grad_()
    lowcost.ops.lora_linear(t["x"], weight, a, b, 1.0).backward(t["grad_y"])
    assert len(decodes) == 1 and a.grad is not None and b.grad is not None


def test_saves_x_u_seed_and_the_stored_tensors_only():
    """No dequantized weight, no mask, no dropped copy of x is kept for backward."""
    weight = make_quantized("nf4", 40, 128, seed=1)
    t = _inputs(8, 128, 40, 4, torch.float32)
    saved = []
    leaves = {k: t[k].clone().requires_grad_() for k in GRADS}
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        lowcost.ops.lora_linear(leaves["x"], weight, leaves["lora_a"], leaves["lora_b"], 1.0, bias=leaves["bias"],
                                dropout=0.1, seed=1)
    shapes = sorted((tuple(s.shape), s.dtype) for s in saved)
    expected = sorted([((8, 128), torch.float32), ((4, 128), torch.float32), ((40, 4), torch.float32),
                       ((8, 4), torch.float32), ((), torch.int64), ((40, 64), torch.uint8), ((40, 2), torch.float32)])
    assert shapes == expected


@pytest.mark.parametrize("scheme, backend", [("nf4", "torch"), ("int8", "torch"), ("q6_k", "torch"), pytest.param(
    "q8_0", "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))])
def test_frozen_quantized_linear(scheme, backend):
    """quantized_linear: y = x Wᵀ + b and dx = g W, dbias = Σ g against float64."""
    K = k_for(scheme, 200)
    weight = make_quantized(scheme, 29, K, seed=6)
    t = _inputs(11, K, 29, 1, torch.float32)
    x, bias = t["x"].clone().requires_grad_(), t["bias"].clone().requires_grad_()
    y = lowcost.ops.quantized_linear(x.reshape(1, 11, K), weight, bias, backend=backend)
    y.backward(t["grad_y"].reshape(1, 11, 29))
    w64 = weight.dequantize(torch.float64)
    assert_close_to_reference("y", y.reshape(11, 29), t["x"].double() @ w64.t() + t["bias"].double(), torch.float32)
    assert_close_to_reference("dx", x.grad, t["grad_y"].double() @ w64, torch.float32)
    assert_close_to_reference("dbias", bias.grad, t["grad_y"].double().sum(0), torch.float32)


def test_opcheck():
    from lowcost.ops.qlora_linear import _qlora_linear_op, _quantized_linear_op
    weight = make_quantized("nf4", 12, 64, seed=1)
    t = _inputs(3, 64, 12, 2, torch.float32)
    args = (t["x"].requires_grad_(), weight.packed, "nf4", 12, 64, t["lora_a"].requires_grad_(),
            t["lora_b"].requires_grad_(), t["bias"], 1.5, 0.1, torch.tensor(3), "torch")
    torch.library.opcheck(_qlora_linear_op, args)
    torch.library.opcheck(_quantized_linear_op, (t["x"], weight.packed, "nf4", 12, 64, t["bias"], "torch"))


def test_backend_without_the_format_is_a_clear_error(monkeypatch):
    """Every backend takes every format today; a backend that lacked one would refuse it by name (format, the
    formats the backend takes, the module), listing exactly QUANT_SUPPORT: checked with cuda's list shortened."""
    monkeypatch.setitem(qb.QUANT_SUPPORT, "cuda", tuple(f for f in qb.CUDA_FORMATS if f != "q6_k"))
    weight = make_quantized("q6_k", 8, 256)
    t = _inputs(2, 256, 8, 2, torch.float32)
    takes = r"\(it takes: nf4, nf4-dq, int8, q8_0, q4_0, q4_1, q4_k\)"
    with pytest.raises(ValueError, match=rf"backend='cuda' has no kernel for a 'q6_k' weight \(model.q\) {takes}"):
        qb.resolve_quant_backend("cuda", torch.device("cuda"), 2, "q6_k", where="model.q")
    with pytest.raises(ValueError, match=rf"backend='cuda' has no kernel for a 'q6_k' weight {takes}"):
        lowcost.ops.lora_linear(t["x"], weight, t["lora_a"], t["lora_b"], 1.0, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' has no kernel for a 'q6_k' weight"):
        lowcost.ops.quantized_linear(t["x"], weight, backend="cuda")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_takes_its_formats_but_needs_cuda_tensors(scheme):
    """Every format passes cuda's format check (the k-quants since their CUDA tile, issue #13); on CPU tensors the
    device is what is refused."""
    assert scheme in qb.QUANT_SUPPORT["cuda"]
    weight = make_quantized(scheme, 8, 256)
    t = _inputs(2, 256, 8, 2, torch.float32)
    with pytest.raises(ValueError, match=r"backend='cuda' is not available: the CUDA kernels need CUDA tensors"):
        lowcost.ops.lora_linear(t["x"], weight, t["lora_a"], t["lora_b"], 1.0, backend="cuda")


def test_cuda_formats_match_the_registered_ops():
    """QUANT_SUPPORT['cuda'] is exactly what the dequant_gemm ops of lowcost._C decode: both ops have a schema
    taking the packed tensors (stored tensors, then code books), and the formats are a subset of the formats
    lowcost stores. (The CUDA kernels themselves: tests/gpu/test_qlora_linear_gpu.py, and the emulated C++
    test csrc/tests/test_dequant_gemm_emulated.cpp, which also checks that other schemes are refused.)"""
    import lowcost._C  # noqa: F401  registers the schemas
    from lowcost.reference.quant import FORMATS
    assert qb.QUANT_SUPPORT["cuda"] == qb.CUDA_FORMATS == ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k",
                                                           "q6_k")
    assert set(qb.CUDA_FORMATS) <= set(FORMATS) and set(qb.CUDA_FORMATS) <= set(qb.TRITON_FORMATS)
    for op, size in (("dequant_gemm", "n_rows"), ("dequant_gemm_dgrad", "n_cols")):
        schema = str(getattr(torch.ops.lowcost, op).default._schema)
        assert f"Tensor[] packed, str scheme, int {size}, int block_size, Tensor? c) -> Tensor" in schema, schema
    counts = {"nf4": 3, "nf4-dq": 6, "int8": 2, "q8_0": 1, "q4_0": 1, "q4_1": 1, "q4_k": 1,
              "q6_k": 1}   # csrc/checks.cpp's packed_count
    for scheme in qb.CUDA_FORMATS:
        packed = qb._with_code_books(make_quantized(scheme, 8, 256).packed, scheme)
        assert len(packed) == counts[scheme], scheme


def test_cuda_formats_match_the_ops_refusal():
    """The C++ ops parse exactly CUDA_FORMATS and their refusal of any other scheme lists exactly them, in order
    (csrc/checks.cpp's parse_quant_scheme; the refusal itself runs in the emulated C++ test and in
    tests/gpu, as the ops have no CPU kernel to reach it from here)."""
    source = (Path(__file__).resolve().parents[2] / "csrc" / "checks.cpp").read_text()
    body = source[source.index("QuantScheme parse_quant_scheme("):]
    body = body[:body.index("\n}\n")]
    assert tuple(re.findall(r'name == "([^"]+)"', body)) == qb.CUDA_FORMATS
    message = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body[body.index("TORCH_CHECK(false"):]))
    listed = message[message.index("scheme must be"):message.index("(the")]
    assert tuple(re.findall(r"'([^']+)'", listed)) == qb.CUDA_FORMATS, listed


def test_bad_shapes_name_the_argument():
    weight = make_quantized("int8", 8, 64)
    t = _inputs(2, 64, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="x must have last dimension K=64"):
        lowcost.ops.lora_linear(t["x"][:, :60], weight, t["lora_a"], t["lora_b"], 1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(N=8, r=2\)"):
        lowcost.ops.lora_linear(t["x"], weight, t["lora_a"], t["lora_b"][:5], 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        lowcost.ops.lora_linear(t["x"], weight, t["lora_a"], t["lora_b"], 1.0, bias=torch.zeros(8).double())
