"""The ``cuda`` backend of lowcost.ops.lora_gated_mlp on CPU tensors (issue #12): its two elementwise ops
(``gated_act_mul``, ``gated_act_mul_backward``) against torch in float64, and the whole composition
(lowcost/ops/_cuda_gated_mlp.py) against float64 autograd of the unfused MLP, output and every gradient.

The composition's ops have C++ CPU kernels, so it runs here exactly as on a GPU, minus the CUDA kernels
themselves (csrc/tests/test_cuda_emulated.cpp runs those on the host; tests/gpu on a GPU). The public
``lora_gated_mlp(backend='cuda')`` needs CUDA tensors; the ``cuda_on_cpu`` fixture lets the backend choice pass
on CPU tensors so the public call (seeds=None, autograd, the saved set) is exercised end to end.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import lowcost
from lowcost._extension import has_kernel
from helpers import assert_close_to_reference, max_normalized_error
from test_lora_gated_mlp import (ACTS, ADAPTERS, assert_same_masks_as_three_lora_linears, check, make_inputs,
                                 projections, run_op)

pytestmark = pytest.mark.skipif(not has_kernel("gated_act_mul", "CPU"),
                                reason="lowcost._C is not built (pip install --no-build-isolation -e .)")
ops = torch.ops.lowcost
gated_mlp_module = importlib.import_module("lowcost.ops.lora_gated_mlp")   # lowcost.ops.lora_gated_mlp is the function
ACT_GRADS = {"silu": lambda dy, g: torch.ops.aten.silu_backward(dy, g),
             "gelu_tanh": lambda dy, g: torch.ops.aten.gelu_backward(dy, g, approximate="tanh"),
             "gelu": lambda dy, g: torch.ops.aten.gelu_backward(dy, g)}


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """backend='cuda' resolves on CPU tensors (the C++ CPU kernels stand in for the CUDA ones)."""
    real = gated_mlp_module.resolve_backend
    monkeypatch.setattr(gated_mlp_module, "resolve_backend",
                        lambda name, device, rank: "cuda" if name == "cuda" else real(name, device, rank))


# ------------------------------------------------------------------------------------------- elementwise ops
def _operands(M, I, dtype, strided, seed=0):
    """gate, up, dh (M, I); ``strided``: transposed views (column-major) and a column-sliced one."""
    gen = torch.Generator().manual_seed(seed)

    def rand(scale=3.0):
        t = torch.randn(I, M, generator=gen, dtype=torch.float64).t() if strided else \
            torch.randn(M, I, generator=gen, dtype=torch.float64)
        return (t * scale).to(dtype)

    gate, up, dh = rand(), rand(1.0), rand(1.0)
    if strided and I > 1:   # a view with row stride != I and an odd column offset
        wide = (torch.randn(M, 2 * I + 1, generator=gen, dtype=torch.float64) * 3).to(dtype)
        gate = wide[:, 1:I + 1]
    return gate, up, dh


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I,strided", [(0, 7, False), (1, 1, False), (1, 13, True), (37, 129, False),
                                         (37, 129, True), (5, 4, False)])
def test_elementwise_ops_match_torch_in_float64(act, dtype, M, I, strided):
    """h, d_gate and d_up: fp32 math rounded once to the dtype, so within one rounding of float64 (fp32: a few
    ulp of expf/tanhf/erff, 2e-5 normalised; 16-bit: half an ulp of the output, the dtype's tolerance)."""
    gate, up, dh = _operands(M, I, dtype, strided, seed=M + I)
    g64, u64, dh64 = gate.double(), up.double(), dh.double()
    h = ops.gated_act_mul(gate, up, act)
    d_gate, d_up = ops.gated_act_mul_backward(dh, gate, up, act)
    for name, t in (("h", h), ("d_gate", d_gate), ("d_up", d_up)):
        assert t.dtype == dtype and t.shape == (M, I) and t.is_contiguous(), name
    assert_close_to_reference("h", h, ACTS[act](g64) * u64, dtype)
    assert_close_to_reference("d_gate", d_gate, ACT_GRADS[act](dh64 * u64, g64), dtype)
    assert_close_to_reference("d_up", d_up, dh64 * ACTS[act](g64), dtype)


@pytest.mark.parametrize("act", list(ACTS))
def test_elementwise_ops_round_once_like_the_triton_backend(act):
    """bf16: each output is the fp32 value rounded once, as the Triton kernels store them, not torch's rounding of
    act(gate) before the product. Against torch's fp32 math rounded once: bit-identical for nearly every element
    (the rest are rounding ties moved by an ulp of fp32 expf/tanhf/erff, or 1 + tanh cancelling near -inf), while
    torch's twice-rounded h differs in about a quarter of them."""
    gate, up, dh = _operands(64, 96, torch.bfloat16, False, seed=3)
    g32, u32, dh32 = gate.float(), up.float(), dh.float()
    h = ops.gated_act_mul(gate, up, act)
    d_gate, d_up = ops.gated_act_mul_backward(dh, gate, up, act)
    wants = (ACTS[act](g32) * u32, ACT_GRADS[act](dh32 * u32, g32), dh32 * ACTS[act](g32))
    for name, got, want in zip(("h", "d_gate", "d_up"), (h, d_gate, d_up), wants):
        same = (got == want.to(torch.bfloat16)).float().mean().item()
        assert same > 0.95, (name, same)
        assert max_normalized_error(got, want)[0] <= 2 ** -8, name     # half a bf16 ulp of the largest element
    twice_rounded = (ACTS[act](gate) * up == wants[0].to(torch.bfloat16)).float().mean().item()
    assert twice_rounded < 0.9 < (h == wants[0].to(torch.bfloat16)).float().mean().item()


def test_elementwise_ops_extreme_inputs():
    """Large |gate|: no NaN or inf from exp overflow (silu(-100) = -0, gelu(±20) = relu)."""
    gate = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]])
    up = torch.ones_like(gate)
    for act in ACTS:
        h = ops.gated_act_mul(gate, up, act)
        d_gate, d_up = ops.gated_act_mul_backward(up, gate, up, act)
        assert torch.isfinite(h).all() and torch.isfinite(d_gate).all() and torch.isfinite(d_up).all(), act
        torch.testing.assert_close(h, ACTS[act](gate), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_gate, ACT_GRADS[act](up, gate), rtol=1e-6, atol=1e-6)


def test_elementwise_opcheck():
    gate, up, dh = _operands(9, 11, torch.float32, True, seed=1)
    for op, args in ((ops.gated_act_mul.default, (gate, up, "gelu_tanh")),
                     (ops.gated_act_mul_backward.default, (dh, gate, up, "silu"))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


BAD = [
    ("activation", dict(act="relu"), "activation must be 'silu', 'gelu_tanh' or 'gelu', got 'relu'"),
    ("shape", dict(up=torch.zeros(3, 5)), "up must have gate's shape"),
    ("dtype", dict(up=torch.zeros(3, 4, dtype=torch.float16)), "up must have gate's dtype"),
    ("rank", dict(gate=torch.zeros(12)), "gate must be a 2-D \\(M, I\\) tensor"),
    ("float64", dict(gate=torch.zeros(3, 4, dtype=torch.float64), up=torch.zeros(3, 4, dtype=torch.float64)),
     "gate must be float32, float16 or bfloat16"),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_elementwise_bad_input(case, change, message):
    args = dict(gate=torch.zeros(3, 4), up=torch.zeros(3, 4), act="silu")
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.gated_act_mul(args["gate"], args["up"], args["act"])
    with pytest.raises(RuntimeError, match=message.replace("gated_act_mul", "gated_act_mul_backward")):
        ops.gated_act_mul_backward(torch.zeros(args["gate"].shape, dtype=args["gate"].dtype), args["gate"],
                                   args["up"], args["act"])


def test_backward_op_checks_dh():
    with pytest.raises(RuntimeError, match="gated_act_mul_backward: dh must have gate's shape"):
        ops.gated_act_mul_backward(torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(3, 4), "silu")
    with pytest.raises(RuntimeError, match="gated_act_mul_backward: dh must have gate's dtype"):
        ops.gated_act_mul_backward(torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(3, 4), torch.zeros(3, 4),
                                   "gelu")


# ------------------------------------------------------------------------------------------- the composition
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("M,H,inter,ranks", [(1, 24, 40, (1, 5, 7)), (13, 20, 37, (16, 5, 17)),
                                             (0, 8, 12, (2, 2, 2)), (70, 33, 101, (17, 3, 5))])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cuda_composition_fp32_matches_float64(cuda_on_cpu, act, M, H, inter, ranks, dropout):
    check(make_inputs(M, H, inter, ranks, seed=M + len(act)), act, (dropout,) * 3, backend="cuda")


def test_each_projection_has_its_own_dropout(cuda_on_cpu):
    check(make_inputs(9, 16, 70, seed=4), "silu", (0.0, 0.3, 0.15), backend="cuda")


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("act", list(ACTS))
def test_cuda_composition_low_precision(cuda_on_cpu, dtype, adapter_dtype, act):
    """16-bit: the dtype's tolerance (2e-3 fp16, 1e-2 bf16), as every backend: gate, up, h, dh, dgate and dup
    each carry one rounding to the dtype, the GEMMs accumulate in fp32."""
    inputs = make_inputs(17, 32, 45, ranks=(5, 17, 3), dtype=dtype, adapter_dtype=adapter_dtype, seed=2)
    check(inputs, act, (0.1, 0.1, 0.1), dtype=dtype, backend="cuda")


@pytest.mark.parametrize("seeds", [(5, 6, 7), None])
def test_same_dropped_elements_as_three_lora_linears(cuda_on_cpu, seeds):
    """The same seeds (explicit, or drawn from torch's generator in the unfused order) give the unfused model's
    masks: every output and gradient within fp32 rounding of three lowcost.lora_linear calls (a mask that
    differs in one element is O(1) off)."""
    assert_same_masks_as_three_lora_linears("cuda", seeds)


def test_dropped_elements_of_h_are_the_unfused_down_projections():
    """x-independent check of the down projection's mask: with A_d = I (r = I) u_d is D_d ⊙ h itself, so its
    zero pattern is the Philox mask of (M, I) for the down seed."""
    from lowcost.reference import dropout_keep_mask
    M, H, inter = 19, 8, 12
    d = make_inputs(M, H, inter, ranks=(2, 2, inter), seed=6)
    d["a_down"] = torch.eye(inter)
    d["b_down"] = torch.zeros(H, inter)
    params = [t for p in projections(d) for t in p]
    *_, u_d = gated_mlp_module._gated_mlp_op(d["x"], *params, [1.0] * 3, [0.3] * 3, torch.tensor([1, 2, 99]),
                                             "silu", "cuda")
    assert torch.equal(u_d != 0, dropout_keep_mask(M, inter, 99, 0.3))


def test_saves_x_gate_up_and_the_u_only(cuda_on_cpu):
    """The saved set does not depend on the backend: x (the caller's), gate, up, the three u's and the seeds."""
    M, H, inter = 32, 16, 40
    d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS)
         for k, v in make_inputs(M, H, inter, ranks=(4, 4, 4), seed=1).items()}
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = lowcost.ops.lora_gated_mlp(d["x"], *projections(d), scales=(1.0,) * 3, dropouts=(0.1,) * 3,
                                       seeds=(1, 2, 3), backend="cuda")
    params = {t.data_ptr() for k, t in d.items() if k not in ("x", "grad_y")}
    activations = [t for t in packed if t.data_ptr() not in params]
    assert activations[0].data_ptr() == d["x"].data_ptr()
    assert sorted(tuple(t.shape) for t in activations[1:]) == sorted([(M, inter)] * 2 + [(M, 4)] * 3 + [(3,)])
    y.sum().backward()


def test_cuda_composition_is_bitwise_reproducible(cuda_on_cpu):
    inputs = make_inputs(33, 24, 50, seed=9)
    runs = [run_op(inputs, (1.5, 0.5, 2.0), (0.1,) * 3, (1, 2, 3), "gelu", backend="cuda") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), name


def test_public_cuda_backend_needs_cuda_tensors():
    d = make_inputs(3, 8, 12, seed=0)
    with pytest.raises(ValueError, match="backend='cuda' is not available: the CUDA kernels need CUDA tensors"):
        lowcost.ops.lora_gated_mlp(d["x"], *projections(d), scales=(1.0,) * 3, backend="cuda")


def test_float64_is_refused_on_cuda(cuda_on_cpu):
    d = {k: v.double() for k, v in make_inputs(3, 8, 12, seed=0).items()}
    with pytest.raises(TypeError, match="float64 runs only on backend='torch' \\(got backend='cuda'\\)"):
        lowcost.ops.lora_gated_mlp(d["x"], *projections(d), scales=(1.0,) * 3, backend="cuda")
