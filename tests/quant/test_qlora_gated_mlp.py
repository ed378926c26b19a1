"""lowcost.ops.lora_gated_mlp with quantized frozen weights (lowcost.ops.qlora_gated_mlp) against float64
autograd of the unfused gated MLP on the dequantized dense weights: output and every gradient, odd shapes
(M = 0 and 1, a K the NF4 block does not divide), every format; what backward keeps; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowcost
from lowcost.ops.qlora_gated_mlp import _qgated_backward_op, _qgated_op
from lowcost.reference import dropout_keep_mask, keep_scale
from helpers import assert_close_to_reference
from quant_cases import SCHEMES, k_for, make_quantized

ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
ADAPTERS = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
ROLES = ("gate", "up", "down")


def make(scheme, M, H, inter, ranks=(3, 5, 7), dtype=torch.float32, seed=0):
    """Inputs and three quantized weights: gate/up (inter, H), down (H, inter)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    d = {"x": rand(M, H), "grad_y": rand(M, H)}
    weights = {}
    for i, (role, (n_in, n_out), r) in enumerate(zip(ROLES, ((H, inter), (H, inter), (inter, H)), ranks)):
        weights[role] = make_quantized(scheme, n_out, n_in, seed=seed + i, dtype=dtype)
        d[f"a_{role}"] = rand(r, n_in, std=n_in ** -0.5)
        d[f"b_{role}"] = rand(n_out, r, std=r ** -0.5)
    return d, weights


def truth64(d, weights, scales, dropouts, seeds, act):
    t = {k: v.double().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    dense = {role: w.dequantize(torch.float64) for role, w in weights.items()}

    def proj(z, role, i):
        mask = dropout_keep_mask(*z.shape, seeds[i], dropouts[i]).double() * (keep_scale(dropouts[i]) or 1.0)
        return z @ dense[role].t() + scales[i] * ((z * mask) @ t[f"a_{role}"].t()) @ t[f"b_{role}"].t()

    y = proj(ACTS[act](proj(t["x"], "gate", 0)) * proj(t["x"], "up", 1), "down", 2)
    y.backward(t["grad_y"])
    return y.detach(), {k: t[k].grad for k in ("x",) + ADAPTERS}


def run(d, weights, scales, dropouts, seeds, act, **kwargs):
    t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    y = lowcost.ops.lora_gated_mlp(t["x"], *[(weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES], scales=scales,
                                   activation=act, dropouts=dropouts, seeds=seeds, **kwargs)
    y.backward(t["grad_y"])
    return y.detach(), {k: t[k].grad for k in ("x",) + ADAPTERS}


def check(scheme, M, H, inter, act, dropout, dtype=torch.float32, ranks=(3, 5, 7)):
    d, weights = make(scheme, M, k_for(scheme, H), k_for(scheme, inter), ranks, dtype)
    args = ((1.5, 0.5, 2.0), (dropout,) * 3, (11, 22, 33), act)
    y, grads = run(d, weights, *args)
    y64, grads64 = truth64(d, weights, *args)
    assert_close_to_reference(f"{scheme} y", y, y64, dtype)
    for name, g64 in grads64.items():
        assert grads[name].dtype == d[name].dtype, name
        assert_close_to_reference(f"{scheme} d{name}", grads[name], g64, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M, H, inter, dropout", [(13, 100, 70, 0.1), (1, 40, 36, 0.0), (0, 30, 20, 0.1)])
def test_every_format_matches_float64(scheme, M, H, inter, dropout):
    """K (100, 70, ...) that NF4's 64-element blocks do not divide (padded rows); GGUF K rounded to whole blocks."""
    check(scheme, M, H, inter, "silu", dropout)


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_geglu(act):
    check("nf4", 9, 48, 80, act, 0.1, ranks=(16, 1, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    check("q4_1", 7, 64, 96, "silu", 0.1, dtype=dtype)


def test_equals_the_unfused_quantized_layers():
    """Three lowcost.ops.lora_linear calls on the same quantized weights, same seeds: same y and gradients."""
    d, weights = make("nf4", 11, 96, 72)
    scales, dropouts, seeds = (1.5, 0.5, 2.0), (0.1, 0.2, 0.3), (4, 5, 6)
    y, grads = run(d, weights, scales, dropouts, seeds, "silu")
    t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    proj = lambda z, r, i: lowcost.ops.lora_linear(z, weights[r], t[f"a_{r}"], t[f"b_{r}"], scales[i],  # noqa: E731
                                                   dropout=dropouts[i], seed=seeds[i], backend="torch")
    y_ref = proj(F.silu(proj(t["x"], "gate", 0)) * proj(t["x"], "up", 1), "down", 2)
    y_ref.backward(t["grad_y"])
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=0)
    for name in ("x",) + ADAPTERS:           # dx: one fp32 accumulator instead of autograd's sum of two
        torch.testing.assert_close(grads[name], t[name].grad, rtol=1e-5, atol=1e-6)


def test_saves_x_gate_up_the_u_and_the_stored_tensors_only():
    M, H, inter = 16, 64, 48
    d, weights = make("nf4", M, H, inter, ranks=(4, 4, 4))
    t = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        y = lowcost.ops.lora_gated_mlp(t["x"], *[(weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES],
                                       scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3))
    known = {p.data_ptr() for w in weights.values() for p in w.packed} | \
            {t[k].data_ptr() for k in ADAPTERS}
    activations = [s for s in saved if s.data_ptr() not in known]
    assert activations[0].data_ptr() == t["x"].data_ptr()                        # the caller's x
    assert sorted(tuple(s.shape) for s in activations[1:]) == sorted([(M, inter)] * 2 + [(M, 4)] * 3 + [(3,)])
    y.sum().backward()


def test_opcheck():
    d, weights = make("q8_0", 5, 64, 32)
    w = [weights[r] for r in ROLES]
    args = (d["x"].requires_grad_(), *(x.packed for x in w), *(x.scheme for x in w), [x.block_size for x in w],
            *(d[k].requires_grad_() for k in ADAPTERS), [1.0, 2.0, 0.5], [0.2] * 3, torch.tensor([1, 2, 3]), "silu", "torch")
    result = torch.library.opcheck(_qgated_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    y, gate, up, u_g, u_u, u_d = _qgated_op(*args)
    bargs = (d["grad_y"], d["x"].detach(), *(x.packed for x in w), *(x.scheme for x in w), [x.block_size for x in w],
             *(d[k].detach() for k in ADAPTERS), gate, up, u_g, u_u, u_d, [1.0, 2.0, 0.5], [0.2] * 3,
             torch.tensor([1, 2, 3]), "silu", [True] * 7, "torch")
    result = torch.library.opcheck(_qgated_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_bad_input():
    d, weights = make("nf4", 3, 64, 32)
    gate, up = (weights["gate"], d["a_gate"], d["b_gate"]), (weights["up"], d["a_up"], d["b_up"])
    down = (weights["down"], d["a_down"], d["b_down"])
    mlp = lowcost.ops.lora_gated_mlp
    with pytest.raises(ValueError, match=r"backend='cuda' is not available \(the gate projection\): the CUDA "
                                         "kernels need CUDA tensors"):
        mlp(d["x"], gate, up, down, (1.0,) * 3, backend="cuda")
    with pytest.raises(TypeError, match="down weight must be a QuantizedWeight like the others"):
        mlp(d["x"], gate, up, (weights["down"].dequantize(), d["a_down"], d["b_down"]), (1.0,) * 3)
    with pytest.raises(ValueError, match=r"up weight must have shape \(32, 64\)"):
        mlp(d["x"], gate, (weights["down"], d["a_up"], d["b_up"]), down, (1.0,) * 3)
    with pytest.raises(ValueError, match="gate lora_a and lora_b must have shapes"):
        mlp(d["x"], (weights["gate"], d["a_up"][:, :5], d["b_gate"]), up, down, (1.0,) * 3)


def test_selective_checkpointing_keeps_its_outputs():
    """Like the dense fused MLP (three matmuls), the quantized one is saved by the selective policy, not replayed
    (a replay would also decode the three weights again)."""
    from lowcost.checkpoint.selective import default_save_ops
    assert {torch.ops.lowcost.qlora_gated_mlp, torch.ops.lowcost.lora_gated_mlp} <= default_save_ops()
