"""lowcost.ops.lora_gated_mlp against float64 autograd of the unfused gated MLP, output and every gradient;
the same dropped elements as three lowcost.ops.lora_linear calls; opcheck, compile, what is saved."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowcost
from lowcost.ops.backend import triton_usable
from lowcost.ops.lora_gated_mlp import _gated_mlp_backward_op, _gated_mlp_op, lora_gated_mlp
from lowcost.reference import dropout_keep_mask, keep_scale
from helpers import TOLERANCE, assert_close_to_reference, max_normalized_error

ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
ADAPTERS = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                                                     reason="triton not installed"))]


def make_inputs(M, H, inter, ranks=(3, 5, 7), dtype=torch.float32, adapter_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    adt = adapter_dtype or dtype
    out = {"x": rand(M, H), "grad_y": rand(M, H)}
    for role, (n_in, n_out), r in zip(("gate", "up", "down"), ((H, inter), (H, inter), (inter, H)), ranks):
        out[f"w_{role}"] = rand(n_out, n_in, std=n_in ** -0.5)
        out[f"a_{role}"] = rand(r, n_in, std=n_in ** -0.5, dt=adt)
        out[f"b_{role}"] = rand(n_out, r, std=r ** -0.5, dt=adt)
    return out


def projections(d):
    return [(d[f"w_{r}"], d[f"a_{r}"], d[f"b_{r}"]) for r in ("gate", "up", "down")]


def truth64(inputs, scales, dropouts, seeds, act):
    """y and gradients by float64 autograd of down(act(gate(x)) * up(x)) with explicit masks."""
    d = {k: v.double().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}

    def proj(z, role, i):
        mask = dropout_keep_mask(*z.shape, seeds[i], dropouts[i]).double()
        mask = mask * (keep_scale(dropouts[i]) if dropouts[i] else 1.0)
        return z @ d[f"w_{role}"].t() + scales[i] * ((z * mask) @ d[f"a_{role}"].t()) @ d[f"b_{role}"].t()

    y = proj(ACTS[act](proj(d["x"], "gate", 0)) * proj(d["x"], "up", 1), "down", 2)
    y.backward(d["grad_y"])
    return y.detach(), {k: d[k].grad for k in ("x",) + ADAPTERS}


def run_op(inputs, scales, dropouts, seeds, act, **kwargs):
    d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}
    y = lora_gated_mlp(d["x"], *projections(d), scales=scales, activation=act, dropouts=dropouts, seeds=seeds,
                       **kwargs)
    y.backward(d["grad_y"])
    return y.detach(), {k: d[k].grad for k in ("x",) + ADAPTERS}


def check(inputs, act, dropouts, dtype=torch.float32, scales=(1.5, 0.5, 2.0), seeds=(11, 22, 33), backend="torch"):
    y, grads = run_op(inputs, scales, dropouts, seeds, act, backend=backend)
    y64, grads64 = truth64(inputs, scales, dropouts, seeds, act)
    assert_close_to_reference("y", y, y64, dtype)
    for name, g64 in grads64.items():
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(f"d{name}", grads[name], g64, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("M,H,inter,ranks", [(1, 24, 40, (1, 5, 7)), (13, 20, 36, (16, 3, 9)), (0, 8, 12, (2, 2, 2))])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_matches_float64(backend, act, M, H, inter, ranks, dropout):
    check(make_inputs(M, H, inter, ranks, seed=M + len(act)), act, (dropout, dropout, dropout), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_projection_has_its_own_dropout(backend):
    check(make_inputs(9, 16, 70, seed=4), "silu", (0.0, 0.3, 0.15), backend=backend)   # I=70: 2 tiles over I


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
def test_low_precision(backend, dtype, adapter_dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is broken under the Triton interpreter (TOOLCHAIN.md); covered on a GPU")
    inputs = make_inputs(17, 32, 48, dtype=dtype, adapter_dtype=adapter_dtype, seed=2)
    check(inputs, "gelu_tanh", (0.1, 0.1, 0.1), dtype=dtype, backend=backend)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_da_from_chunk_partials_is_exact_and_bitwise_reproducible(dropout):
    """dA_d is a fixed-order sum of per-row-chunk partials (no atomics): at M=70 the dA pass splits the rows
    into 3 chunks (3 SMs under the interpreter), every gradient matches float64, and two runs are equal."""
    if not triton_usable(torch.device("cpu")):
        pytest.skip("triton not installed")
    from lowcost.kernels.lora_gated_mlp import da_chunks
    from lowcost.kernels.lora_linear_plan import sm_count
    assert da_chunks(70, 40, torch.float32, sm_count(torch.device("cpu")))[1] == 3
    inputs = make_inputs(70, 24, 40, (3, 5, 7), seed=5)
    check(inputs, "silu", (dropout,) * 3, backend="triton")
    runs = [run_op(inputs, (1.5, 0.5, 2.0), (dropout,) * 3, (1, 2, 3), "silu", backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), name


def unfused_lowcost(d, scales, dropouts, seeds, act):
    g = lowcost.lora_linear(d["x"], d["w_gate"], d["a_gate"], d["b_gate"], scales[0], dropout=dropouts[0], seed=seeds[0])
    u = lowcost.lora_linear(d["x"], d["w_up"], d["a_up"], d["b_up"], scales[1], dropout=dropouts[1], seed=seeds[1])
    return lowcost.lora_linear(ACTS[act](g) * u, d["w_down"], d["a_down"], d["b_down"], scales[2],
                               dropout=dropouts[2], seed=seeds[2])


def assert_same_masks_as_three_lora_linears(backend, seeds):
    """The fused op and three lowcost.lora_linear calls with the same seeds (or seeds=None, drawn from torch's
    generator in the unfused order) agree within fp32 rounding: a mask that differs in one element is O(1) off."""
    inputs = make_inputs(21, 24, 40, seed=8)
    results = []
    for fused in (True, False):
        d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}
        torch.manual_seed(1234)
        if fused:
            y = lora_gated_mlp(d["x"], *projections(d), scales=(2.0, 2.0, 2.0), dropouts=(0.2, 0.2, 0.2), seeds=seeds,
                               backend=backend)
        else:
            y = unfused_lowcost(d, (2.0, 2.0, 2.0), (0.2, 0.2, 0.2), seeds or (None, None, None), "silu")
        y.backward(d["grad_y"])
        results.append((y.detach(), {k: d[k].grad for k in ("x",) + ADAPTERS}))
    (y, grads), (y_ref, grads_ref) = results
    if backend == "torch":
        assert torch.equal(y, y_ref)                # same masks, same roundings: bit-identical forward
    assert max_normalized_error(y, y_ref)[0] <= TOLERANCE[torch.float32]
    for name in grads_ref:
        assert max_normalized_error(grads[name], grads_ref[name])[0] <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seeds", [(5, 6, 7), None])
def test_same_dropped_elements_as_three_lora_linears(backend, seeds):
    """Explicit seeds, and seeds=None drawn from torch's generator in the unfused order: identical results."""
    assert_same_masks_as_three_lora_linears(backend, seeds)


def test_packed_gate_up_views_share_one_adapter():
    """Phi-3's gate_up_proj: gate and up are the two halves of one LoRA linear (one A, one seed)."""
    H, inter, r = 16, 24, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, H, generator=gen, requires_grad=True)
    w = torch.randn(2 * inter, H, generator=gen) * 0.3
    a = (torch.randn(r, H, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(2 * inter, r, generator=gen) * 0.3).requires_grad_()
    wd, ad, bd = (torch.randn(H, inter, generator=gen) * 0.2, (torch.randn(r, inter, generator=gen) * 0.2).requires_grad_(),
                  (torch.randn(H, r, generator=gen) * 0.2).requires_grad_())
    y = lora_gated_mlp(x, (w[:inter], a, b[:inter]), (w[inter:], a, b[inter:]), (wd, ad, bd), scales=(2.0,) * 3,
                       dropouts=(0.2, 0.2, 0.1), seeds=(9, 9, 10))
    grads = torch.autograd.grad(y.square().sum(), (x, a, b, ad, bd))
    gate, up = lowcost.lora_linear(x, w, a, b, 2.0, dropout=0.2, seed=9).chunk(2, dim=-1)
    y_ref = lowcost.lora_linear(up * F.silu(gate), wd, ad, bd, 2.0, dropout=0.1, seed=10)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, a, b, ad, bd))
    torch.testing.assert_close(y, y_ref)
    for name, g, g_ref in zip(("x", "a", "b", "a_down", "b_down"), grads, grads_ref):
        assert max_normalized_error(g, g_ref)[0] <= TOLERANCE[torch.float32], name   # summation order only


def test_saves_x_gate_up_and_the_u_only():
    M, H, inter = 32, 16, 40
    inputs = make_inputs(M, H, inter, ranks=(4, 4, 4), seed=1)
    d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_gated_mlp(d["x"], *projections(d), scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3))
    params = {t.data_ptr() for k, t in d.items() if k != "x" and k != "grad_y"}
    activations = [t for t in packed if t.data_ptr() not in params]
    assert activations[0].data_ptr() == d["x"].data_ptr()                       # the caller's x, not a copy
    shapes = sorted(tuple(t.shape) for t in activations[1:])
    assert shapes == sorted([(M, inter), (M, inter), (M, 4), (M, 4), (M, 4), (3,)])   # gate, up, 3 u's, seeds
    y.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck(dropout):
    inputs = make_inputs(5, 12, 20, ranks=(2, 3, 4), seed=3)
    d = {k: v.requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}
    params = [t for p in projections(d) for t in p]
    args = (d["x"], *params, [1.0, 2.0, 0.5], [dropout] * 3, torch.tensor([1, 2, 3]), "gelu_tanh", "torch")
    result = torch.library.opcheck(_gated_mlp_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    y, gate, up, u_g, u_u, u_d = _gated_mlp_op(*args)
    bargs = (d["grad_y"], d["x"].detach(), *[p.detach() for p in params], gate, up, u_g, u_u, u_d, [1.0, 2.0, 0.5],
             [dropout] * 3, torch.tensor([1, 2, 3]), "gelu_tanh", [True] * 7, "torch")
    result = torch.library.opcheck(_gated_mlp_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph():
    inputs = make_inputs(6, 16, 24, seed=5)
    d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}

    def mlp(x):
        return lora_gated_mlp(x, *projections(d), scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3))

    y = torch.compile(mlp, fullgraph=True)(d["x"])
    y.sum().backward()
    compiled_grad = d["x"].grad.clone()
    d["x"].grad = None
    y_eager = mlp(d["x"])
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(compiled_grad, d["x"].grad)


BAD = [
    ("activation", dict(activation="relu"), ValueError, "activation must be one of"),
    ("down shape", dict(down=2), ValueError, "down weight must have shape"),
    ("dropout", dict(dropouts=(0.1, 1.0, 0.0)), ValueError, "dropout must be a probability"),
    ("seeds", dict(seeds=(1, 2)), ValueError, "seeds must hold 3 seeds"),
    ("backend", dict(backend="cuda"), ValueError, "backend='cuda' is not available: the CUDA kernels need CUDA tensors"),
    ("float64 triton", dict(backend="triton", x64=True), TypeError, "float64 runs only on backend='torch'"),
    ("frozen", dict(train_w=True), ValueError, "gate weight must be frozen"),
]


@pytest.mark.parametrize("case,change,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, change, error, message):
    d = make_inputs(3, 8, 12, seed=0)
    gate, up, down = projections(d)
    if change.pop("down", None):
        down = (d["w_down"].t(), d["a_down"], d["b_down"])
    if change.pop("x64", None):
        d["x"] = d["x"].double()
        gate, up, down = ((w.double(), a.double(), b.double()) for w, a, b in (gate, up, down))
    if change.pop("train_w", None):
        gate = (gate[0].requires_grad_(), gate[1], gate[2])
    kwargs = dict(scales=(1.0,) * 3)
    kwargs.update(change)
    with pytest.raises(error, match=message):
        lora_gated_mlp(d["x"], gate, up, down, **kwargs)


@pytest.mark.skipif(not lowcost._extension.has_kernel("philox_dropout_pair_", "CPU"),
                    reason="lowcost._C is not built")
def test_torch_backend_backward_generates_each_mask_once():
    """On the torch backend each projection's backward masks x̃ (for dA) and its low-rank dx term with one
    philox_dropout_pair_ call: three in backward, against three philox_dropout calls in the forward."""
    from torch.profiler import profile

    def dropout_calls(prof) -> list[str]:
        return sorted(e.name.split("::")[1] for e in prof.events() if e.name.startswith("lowcost::philox_dropout"))

    d = {k: v.clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in make_inputs(9, 20, 30).items()}
    with profile() as forward_prof:
        y = lora_gated_mlp(d["x"], *projections(d), scales=(1.0,) * 3, dropouts=(0.1,) * 3, seeds=(1, 2, 3),
                           backend="torch")
    with profile() as backward_prof:
        y.sum().backward()
    assert dropout_calls(forward_prof) == ["philox_dropout"] * 3
    assert dropout_calls(backward_prof) == ["philox_dropout_pair_"] * 3
