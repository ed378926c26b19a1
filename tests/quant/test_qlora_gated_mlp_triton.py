"""The fused gated MLP on quantized weights, Triton backend (lowcost.kernels.qlora_gated_mlp; under the Triton
interpreter here): output and every gradient against float64 autograd of the unfused MLP on the dequantized
weights and against the torch backend, per format, on odd shapes; the same dropped elements as the torch
backend; the same saved tensors as the dense fused op; opcheck; the backend choice and its errors."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import lowcost
from lowcost.ops.backend import triton_usable
from lowcost.ops.qlora_gated_mlp import _qgated_backward_op, _qgated_op
from helpers import TOLERANCE, assert_close_to_reference, max_normalized_error
from quant_cases import k_for
from test_qlora_gated_mlp import ADAPTERS, ROLES, make, run, truth64

qgated = sys.modules["lowcost.ops.qlora_gated_mlp"]   # lowcost.ops.qlora_gated_mlp is also the function's name
pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                reason="triton not installed (the kernels run under TRITON_INTERPRET=1 here)")
SETTINGS = ((1.5, 0.5, 2.0), (11, 22, 33))   # scales, seeds


def check_triton(scheme, M, H, inter, act, dropout, dtype=torch.float32, ranks=(3, 5, 7)):
    """Triton vs float64 (the dtype's tolerance) and vs the torch backend (twice it: both are that close to the
    truth), output and the gradients of x and of the six adapters. Returns the Triton results."""
    d, weights = make(scheme, M, k_for(scheme, H), k_for(scheme, inter), ranks, dtype)
    args = (SETTINGS[0], (dropout,) * 3, SETTINGS[1], act)
    y, grads = run(d, weights, *args, backend="triton")
    y_torch, grads_torch = run(d, weights, *args, backend="torch")
    y64, grads64 = truth64(d, weights, *args)
    assert y.dtype == dtype
    assert_close_to_reference(f"{scheme} y", y, y64, dtype)
    _assert_near(f"{scheme} y vs torch", y, y_torch, dtype)
    for name, g64 in grads64.items():
        assert grads[name].dtype == d[name].dtype, name
        assert_close_to_reference(f"{scheme} d{name}", grads[name], g64, dtype)
        _assert_near(f"{scheme} d{name} vs torch", grads[name], grads_torch[name], dtype)
    return y, grads


def _assert_near(name, actual, other, dtype):
    if actual.numel():
        err, index = max_normalized_error(actual, other)
        assert err <= 2 * TOLERANCE[dtype], f"{name}: normalised difference {err:.3e} at {index}"


# M = 0 and 1, K (H = 100, I = 70) that NF4's 64-blocks do not divide (padded rows), ranks not multiples of 16
# (17, 20), both activations, dropout on and off; GGUF sizes rounded to whole blocks (32, or 256 for k-quants)
CASES = [("nf4", 13, 100, 70, "silu", 0.1, (3, 5, 7)),
         ("nf4", 1, 100, 70, "gelu_tanh", 0.0, (17, 1, 4)),
         ("nf4-dq", 5, 100, 70, "gelu_tanh", 0.1, (3, 20, 5)),
         ("nf4-dq", 0, 100, 70, "silu", 0.1, (3, 5, 7)),
         ("int8", 9, 40, 36, "gelu_tanh", 0.1, (17, 3, 5)),
         ("int8", 0, 40, 36, "silu", 0.0, (3, 5, 7)),
         ("q8_0", 6, 64, 96, "silu", 0.0, (3, 5, 7)),
         ("q4_0", 1, 96, 64, "silu", 0.1, (3, 5, 7)),
         ("q4_1", 7, 96, 64, "gelu_tanh", 0.1, (20, 3, 5)),
         ("q4_k", 3, 256, 256, "silu", 0.1, (3, 5, 7)),
         ("q6_k", 2, 256, 256, "gelu_tanh", 0.0, (3, 5, 7))]


@pytest.mark.parametrize("scheme, M, H, inter, act, dropout, ranks", CASES,
                         ids=[f"{c[0]}-M{c[1]}-{c[4]}-p{c[5]}" for c in CASES])
def test_triton_matches_float64_and_the_torch_backend(scheme, M, H, inter, act, dropout, ranks):
    check_triton(scheme, M, H, inter, act, dropout, ranks=ranks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["nf4", "q4_1"])
def test_triton_low_precision(scheme, dtype):
    if dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is broken under the Triton interpreter (TOOLCHAIN.md); covered on a GPU")
    check_triton(scheme, 7, 100, 70, "silu", 0.1, dtype=dtype)


def test_triton_drops_the_torch_backends_elements():
    """p = 0.5 on all three projections: the Triton and torch backends agree to rounding for the same seeds (and
    both match float64 with ``dropout_keep_mask``'s masks, above), while other seeds give an O(1) difference, so
    the agreement is the masks' and not the dropout's insensitivity."""
    d, weights = make("nf4", 11, 100, 70)
    scales = SETTINGS[0]
    y, grads = run(d, weights, scales, (0.5,) * 3, (4, 5, 6), "silu", backend="triton")
    y_torch, grads_torch = run(d, weights, scales, (0.5,) * 3, (4, 5, 6), "silu", backend="torch")
    for name, a, b in [("y", y, y_torch)] + [(f"d{k}", grads[k], grads_torch[k]) for k in grads]:
        _assert_near(name, a, b, torch.float32)
    for seeds in ((7, 5, 6), (4, 8, 6), (4, 5, 9)):        # each projection's mask changes y on its own
        y_other, _ = run(d, weights, scales, (0.5,) * 3, seeds, "silu", backend="triton")
        assert max_normalized_error(y_other, y)[0] > 0.05, seeds


def _saved(mlp_weights, d, backend):
    """(shape, dtype) of every saved tensor that is not a weight's storage or an adapter, in saving order, and
    whether the first is the caller's x."""
    t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = lowcost.ops.lora_gated_mlp(t["x"], *[(mlp_weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES],
                                       scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3), backend=backend)
    weights = [p for w in mlp_weights.values() for p in (w.packed if hasattr(w, "packed") else [w])]
    known = {p.data_ptr() for p in weights} | {t[k].data_ptr() for k in ADAPTERS}
    activations = [s for s in saved if s.data_ptr() not in known]
    y.sum().backward()
    return [(tuple(s.shape), s.dtype) for s in activations], activations[0].data_ptr() == t["x"].data_ptr()


def test_triton_saves_what_the_dense_fused_op_saves():
    """x, gate, up, the three u's and the seeds, as the dense fused MLP (Triton) on the dequantized weights:
    no dense W (only the stored codes and scales, by reference) and no act(gate) or h."""
    d, weights = make("nf4", 16, 64, 48, ranks=(4, 4, 4))
    quantized, x_first = _saved(weights, d, "triton")
    dense, _ = _saved({r: w.dequantize(torch.float32) for r, w in weights.items()}, d, "triton")
    assert x_first and quantized == dense
    assert sorted(shape for shape, _ in quantized) == sorted([(16, 64)] + [(16, 48)] * 2 + [(16, 4)] * 3 + [(3,)])


def test_triton_opcheck():
    d, weights = make("q8_0", 5, 64, 32)
    w = [weights[r] for r in ROLES]
    stored = (*(x.packed for x in w), *(x.scheme for x in w), [x.block_size for x in w])
    settings = ([1.0, 2.0, 0.5], [0.2] * 3, torch.tensor([1, 2, 3]), "silu")
    args = (d["x"].requires_grad_(), *stored, *(d[k].requires_grad_() for k in ADAPTERS), *settings, "triton")
    result = torch.library.opcheck(_qgated_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    outputs = _qgated_op(*args)[1:]
    bargs = (d["grad_y"], d["x"].detach(), *stored, *(d[k].detach() for k in ADAPTERS), *outputs, *settings,
             [True] * 7, "triton")
    result = torch.library.opcheck(_qgated_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


# ----------------------------------------------------------------------------------------------- the choice
def _mlp_args():
    d, weights = make("int8", 3, 40, 36)
    return d, [(weights[r], d[f"a_{r}"], d[f"b_{r}"]) for r in ROLES]


@pytest.mark.parametrize("backend, env, error, match", [
    ("cuda", None, ValueError, r"backend='cuda' is not available \(the gate projection\): .*need CUDA tensors"),
    (None, "cuda", ValueError, r"LOWCOST_BACKEND='cuda' is not available \(the gate projection\)"),
    ("cudnn", None, ValueError, r"backend must be one of"),
])
def test_bad_backend(backend, env, error, match, monkeypatch):
    if env is not None:
        monkeypatch.setenv("LOWCOST_BACKEND", env)
    d, projections = _mlp_args()
    with pytest.raises(error, match=match):
        lowcost.ops.lora_gated_mlp(d["x"], *projections, scales=(1.0,) * 3, backend=backend)


def test_triton_refuses_float64():
    d, projections = _mlp_args()
    x = d["x"].double()
    with pytest.raises(TypeError, match="float64 runs only on backend='torch'"):
        lowcost.ops.lora_gated_mlp(x, *projections, scales=(1.0,) * 3, backend="triton")


def test_triton_refuses_a_format_without_a_tile():
    """Every stored format has a Triton tile today; a format without one is named, with its projection."""
    x = torch.zeros(2, 4)
    refusal = r"backend='triton' has no kernel for a 'q5_k' weight \(the down projection\)"
    with pytest.raises(ValueError, match=refusal):
        qgated._resolve("triton", x, ["nf4", "nf4", "q5_k"], 4)


def test_default_backend(monkeypatch):
    """None: Triton for CUDA tensors when it takes every format (and not for float64), else torch; on the CPU
    torch (the interpreter is for tests only, as for every op)."""
    monkeypatch.delenv("LOWCOST_BACKEND", raising=False)
    monkeypatch.setattr(qgated, "unavailable_reason", lambda name, device, rank: None)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    assert qgated._resolve(None, on_gpu, ["nf4", "int8", "q6_k"], 16) == "triton"
    assert qgated._resolve(None, on_gpu, ["nf4", "int8", "q5_k"], 16) == "torch"
    assert qgated._resolve(None, types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64),
                           ["nf4"] * 3, 16) == "torch"
    assert qgated._resolve(None, torch.zeros(1), ["nf4"] * 3, 16) == "torch"
