"""The fused gated MLP on quantized weights, ``cuda`` backend (issues #12 + #13), on CPU tensors: the wiring of the
composition (lowcost/ops/_cuda_gated_mlp.py with ``_cuda_backend.quant_forward`` / ``quant_backward`` per
projection) against float64 autograd of the unfused MLP on the dequantized weights, output and every gradient,
nf4 / int8 / GGUF formats, M = 0 and 1, odd sizes and ranks; the unfused layers' masks; the saved set; the
backend choice and its refusals; the "mlp" fusion of lowcost.apply on a quantized base with backend cuda.

The dequantizing GEMMs ``dequant_gemm`` / ``dequant_gemm_dgrad`` have no CPU kernel (their CUDA kernels are
tested on the host by csrc/tests/test_dequant_gemm_emulated.cpp and on a GPU by tests/gpu), so here they are a
float64 torch stand-in with their contract: W decoded to the operand's dtype (as the CUDA tile decodes it), the
product plus c summed in float64, rounded once. Every other op of the composition (lora_down, lora_up,
lora_grad_pass, lora_dx_da, gated_act_mul and its backward) is lowcost._C's own C++ CPU kernel. The
``cuda_here`` fixture lets backend 'cuda' pass its availability check on CPU tensors.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import lowcost
from lowcost._extension import has_kernel
from lowcost.ops import _cuda_backend, _quant_backends
from lowcost.ops import backend as backend_module
from lowcost.reference.quant import dequantize_packed
from helpers import TOLERANCE, assert_close_to_reference, max_normalized_error
from quant_cases import k_for
from test_qlora_gated_mlp import ADAPTERS, ROLES, make, run, truth64

qgated = sys.modules["lowcost.ops.qlora_gated_mlp"]   # lowcost.ops.qlora_gated_mlp is also the function's name
pytestmark = pytest.mark.skipif(not (has_kernel("lora_down", "CPU") and has_kernel("gated_act_mul", "CPU")),
                                reason="lowcost._C is not built (pip install --no-build-isolation -e .)")
SETTINGS = ((1.5, 0.5, 2.0), (11, 22, 33))   # scales, seeds


class DequantGemmStandIn:
    """``torch.ops.lowcost`` with its two dequantizing GEMMs replaced by float64 torch (every other op is the real
    one). Records (op, scheme) per call, so a test can tell that the composition went through them."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(torch.ops.lowcost, name)

    def dequant_gemm(self, x, packed, scheme, n_rows, block_size, c):
        """c + x deq(W)ᵀ (M, N); W (n_rows, K) from its stored tensors (the code books after them are ignored)."""
        self.calls.append(("dequant_gemm", scheme))
        w = dequantize_packed(scheme, packed, x.shape[1], block_size, dtype=x.dtype)
        assert tuple(w.shape) == (n_rows, x.shape[1]), "n_rows or K does not match the stored weight"
        return _plus_c(x.double() @ w.double().t(), c).to(x.dtype)

    def dequant_gemm_dgrad(self, grad, packed, scheme, n_cols, block_size, c):
        """c + g deq(W) (M, K); W (N, n_cols)."""
        self.calls.append(("dequant_gemm_dgrad", scheme))
        w = dequantize_packed(scheme, packed, n_cols, block_size, dtype=grad.dtype)
        assert tuple(w.shape) == (grad.shape[1], n_cols), "n_cols or N does not match the stored weight"
        return _plus_c(grad.double() @ w.double(), c).to(grad.dtype)


def _plus_c(product, c):
    return product if c is None else product + c.double()


@pytest.fixture
def cuda_here(monkeypatch):
    """backend 'cuda' can run on CPU tensors, with the dequantizing GEMMs stood in for. Returns the stand-in."""
    monkeypatch.setattr(backend_module, "cuda_kernels_usable", lambda device: True)
    stand_in = DequantGemmStandIn()
    monkeypatch.setattr(_cuda_backend, "ops", stand_in)
    monkeypatch.delenv("LOWCOST_BACKEND", raising=False)
    return stand_in


# ----------------------------------------------------------------------------------------------- the composition
# M = 0 and 1, K (H = 100, I = 70) that NF4's 64-blocks do not divide, ranks not multiples of 16 (17, 20), every
# activation, dropout on and off; GGUF sizes rounded to whole blocks (32, or 256 for the k-quants)
CASES = [("nf4", 13, 100, 70, "silu", 0.1, (3, 5, 7)),
         ("nf4", 1, 100, 70, "gelu_tanh", 0.0, (17, 1, 4)),
         ("nf4-dq", 0, 100, 70, "silu", 0.1, (3, 5, 7)),
         ("int8", 9, 40, 36, "gelu", 0.1, (17, 3, 5)),
         ("q8_0", 6, 64, 96, "silu", 0.0, (3, 5, 7)),
         ("q4_0", 1, 96, 64, "silu", 0.1, (3, 5, 7)),
         ("q4_1", 7, 96, 64, "gelu_tanh", 0.1, (20, 3, 5)),
         ("q4_k", 5, 256, 256, "silu", 0.1, (3, 5, 7)),
         ("q6_k", 3, 256, 256, "gelu", 0.1, (7, 16, 2))]


def check_cuda(scheme, M, H, inter, act, dropout, dtype=torch.float32, ranks=(3, 5, 7)):
    d, weights = make(scheme, M, k_for(scheme, H), k_for(scheme, inter), ranks, dtype)
    args = (SETTINGS[0], (dropout,) * 3, SETTINGS[1], act)
    y, grads = run(d, weights, *args, backend="cuda")
    y64, grads64 = truth64(d, weights, *args)
    assert y.dtype == dtype
    assert_close_to_reference(f"{scheme} y", y, y64, dtype)
    for name, g64 in grads64.items():
        assert grads[name].dtype == d[name].dtype, name
        assert_close_to_reference(f"{scheme} d{name}", grads[name], g64, dtype)


@pytest.mark.parametrize("scheme, M, H, inter, act, dropout, ranks", CASES, ids=[f"{c[0]}-M{c[1]}" for c in CASES])
def test_cuda_composition_matches_float64(cuda_here, scheme, M, H, inter, act, dropout, ranks):
    """fp32: the fp32 tolerance of float64 autograd, output and the gradients of x and the six adapters; the
    composition made three forward GEMMs and three dgrad GEMMs, each on its projection's format."""
    check_cuda(scheme, M, H, inter, act, dropout, ranks=ranks)
    assert cuda_here.calls == [("dequant_gemm", scheme)] * 3 + [("dequant_gemm_dgrad", scheme)] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_composition_low_precision(cuda_here, dtype):
    """16-bit: the dtype's tolerance (gate, up, h, dh, dgate, dup each rounded once to the dtype)."""
    check_cuda("q4_1", 7, 64, 96, "silu", 0.1, dtype=dtype)
    check_cuda("nf4", 5, 100, 70, "gelu_tanh", 0.1, dtype=dtype, ranks=(16, 3, 5))


def test_mixed_formats(cuda_here):
    """Each projection is decoded with its own format (gate nf4, up q8_0, down q6_k)."""
    H, inter = 256, 256
    d, weights = make("nf4", 4, H, inter)
    _, gguf = make("q8_0", 4, H, inter, seed=1)
    _, kquant = make("q6_k", 4, H, inter, seed=2)
    weights = {"gate": weights["gate"], "up": gguf["up"], "down": kquant["down"]}
    args = (SETTINGS[0], (0.1,) * 3, SETTINGS[1], "silu")
    y, grads = run(d, weights, *args, backend="cuda")
    y64, grads64 = truth64(d, weights, *args)
    assert_close_to_reference("y", y, y64, torch.float32)
    for name, g64 in grads64.items():
        assert_close_to_reference(f"d{name}", grads[name], g64, torch.float32)
    assert [s for _, s in cuda_here.calls] == ["nf4", "q8_0", "q6_k", "q6_k", "nf4", "q8_0"]


@pytest.mark.parametrize("seeds", [(5, 6, 7), None])
def test_same_dropped_elements_as_three_qlora_linears(cuda_here, seeds):
    """The same seeds (explicit, or drawn from torch's generator in the unfused order) give the unfused quantized
    layers' masks: within fp32 rounding of three lowcost.ops.lora_linear(backend='cuda') calls on the same
    quantized weights (a mask that differs in one element is O(1) off)."""
    d, weights = make("nf4", 21, 100, 70, ranks=(4, 4, 4))
    scales, dropouts = (2.0, 1.0, 0.5), (0.2, 0.3, 0.25)
    results = []
    for fused in (True, False):
        t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
        torch.manual_seed(1234)
        if fused:
            y = lowcost.ops.lora_gated_mlp(t["x"], *[(weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES],
                                           scales=scales, dropouts=dropouts, seeds=seeds, backend="cuda")
        else:
            unfused_seeds = seeds or (None,) * 3

            def proj(z, i):
                r = ROLES[i]
                return lowcost.ops.lora_linear(z, weights[r], t[f"a_{r}"], t[f"b_{r}"], scales[i], dropout=dropouts[i],
                                               seed=unfused_seeds[i], backend="cuda")
            y = proj(F.silu(proj(t["x"], 0)) * proj(t["x"], 1), 2)
        y.backward(t["grad_y"])
        results.append((y.detach(), {k: t[k].grad for k in ("x",) + ADAPTERS}))
    (y, grads), (y_ref, grads_ref) = results
    assert max_normalized_error(y, y_ref)[0] <= TOLERANCE[torch.float32]
    for name, grad in grads_ref.items():
        assert max_normalized_error(grads[name], grad)[0] <= TOLERANCE[torch.float32], name


def test_saves_what_the_torch_backend_saves(cuda_here):
    """x (the caller's), gate, up, the three u's, the seeds and the stored tensors: the same set as torch."""
    M, H, inter = 16, 64, 96
    d, weights = make("q8_0", M, H, inter, ranks=(4, 4, 4))
    shapes = {}
    for backend in ("cuda", "torch"):
        t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = lowcost.ops.lora_gated_mlp(t["x"], *[(weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES],
                                           scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3), backend=backend)
        known = {p.data_ptr() for w in weights.values() for p in w.packed} | {t[k].data_ptr() for k in ADAPTERS}
        activations = [s for s in saved if s.data_ptr() not in known]
        assert activations[0].data_ptr() == t["x"].data_ptr(), backend
        shapes[backend] = sorted(tuple(s.shape) for s in activations[1:])
        y.sum().backward()
    assert shapes["cuda"] == shapes["torch"] == sorted([(M, inter)] * 2 + [(M, 4)] * 3 + [(3,)])


def test_cuda_composition_is_bitwise_reproducible(cuda_here):
    d, weights = make("q4_k", 9, 256, 256)
    args = (SETTINGS[0], (0.1,) * 3, SETTINGS[1], "gelu")
    first, second = run(d, weights, *args, backend="cuda"), run(d, weights, *args, backend="cuda")
    assert torch.equal(first[0], second[0])
    for name, grad in first[1].items():
        assert torch.equal(grad, second[1][name]), name


# ----------------------------------------------------------------------------------------------- the choice
def test_cuda_needs_cuda_tensors():
    """Without the fixture: CPU tensors are refused, naming the choice's source and the projection."""
    d, weights = make("nf4", 3, 64, 32)
    projections = [(weights[r], d[f"a_{r}"], d[f"b_{r}"]) for r in ROLES]
    with pytest.raises(ValueError, match=r"backend='cuda' is not available \(the gate projection\): the CUDA "
                                         r"kernels need CUDA tensors"):
        lowcost.ops.lora_gated_mlp(d["x"], *projections, scales=(1.0,) * 3, backend="cuda")


def test_cuda_refuses_a_format_it_does_not_decode(cuda_here, monkeypatch):
    """Every stored format has a CUDA tile today; a format without one is named with its projection and the
    formats cuda takes (cuda's list shortened to simulate it)."""
    monkeypatch.setitem(_quant_backends.QUANT_SUPPORT, "cuda", ("nf4", "int8"))
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"backend='cuda' has no kernel for a 'q6_k' weight \(the down projection\) "
                                         r"\(it takes: nf4, int8\)"):
        qgated._resolve("cuda", x, ["nf4", "int8", "q6_k"], 4)
    assert qgated._resolve("cuda", x, ["nf4", "int8", "nf4"], 4) == "cuda"


def test_cuda_refuses_float64(cuda_here):
    d, weights = make("int8", 3, 40, 36)
    projections = [(weights[r], d[f"a_{r}"], d[f"b_{r}"]) for r in ROLES]
    with pytest.raises(TypeError, match=r"float64 runs only on backend='torch' \(got backend='cuda'\)"):
        lowcost.ops.lora_gated_mlp(d["x"].double(), *projections, scales=(1.0,) * 3, backend="cuda")


def test_default_prefers_triton_then_cuda_then_torch(monkeypatch):
    """None on CUDA tensors: Triton when it can run and takes every format, else cuda likewise, else torch."""
    monkeypatch.delenv("LOWCOST_BACKEND", raising=False)
    usable = {"triton": True, "cuda": True}
    monkeypatch.setattr(qgated, "unavailable_reason", lambda name, device, rank: None if usable[name] else "no")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    schemes = ["nf4", "q8_0", "q6_k"]
    assert qgated._resolve(None, on_gpu, schemes, 16) == "triton"
    monkeypatch.setitem(_quant_backends.QUANT_SUPPORT, "triton", ("nf4", "q8_0"))
    assert qgated._resolve(None, on_gpu, schemes, 16) == "cuda"          # Triton lacks q6_k
    monkeypatch.setitem(_quant_backends.QUANT_SUPPORT, "triton", _quant_backends.TRITON_FORMATS)
    usable["triton"] = False
    assert qgated._resolve(None, on_gpu, schemes, 16) == "cuda"          # Triton cannot run
    usable["cuda"] = False
    assert qgated._resolve(None, on_gpu, schemes, 16) == "torch"
    usable["cuda"] = True
    assert qgated._resolve(None, on_gpu, ["nf4", "q8_0", "q5_k"], 16) == "torch"   # neither decodes q5_k
    assert qgated._resolve(None, torch.zeros(1), schemes, 16) == "torch"           # CPU tensors


# ----------------------------------------------------------------------------------------------- the fusion
def test_apply_fuses_the_quantized_mlp_on_cuda(cuda_here, monkeypatch):
    """LOWCOST_BACKEND=cuda: lowcost.apply takes the "mlp" fusion on a quantized base (no refusal) and one LoRA
    step gives the unfused quantized cuda layers' loss and adapter gradients, with the same dropout draws.
    (apply's own check that this machine has a GPU is the one thing skipped.)"""
    from test_quantized_model import _frozen, _fused_step
    from lowcost.quant import quantize
    monkeypatch.setattr(sys.modules["lowcost.api"], "_check_backend_here", lambda config: None)
    monkeypatch.setenv("LOWCOST_BACKEND", "cuda")
    model = _frozen()
    quantize(model, "nf4")
    twin = copy.deepcopy(model)
    report, loss, grads = _fused_step(model, ("mlp",))
    assert [f for f in report.fusion.taken if f.kind == "mlp"]
    assert not [f for f in report.fusion.refused if f.kind == "mlp"]
    assert ("dequant_gemm", "nf4") in cuda_here.calls
    _, loss_ref, grads_ref = _fused_step(twin, None)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
