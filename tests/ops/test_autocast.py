"""lowcost's custom ops under ``torch.autocast`` (``lowcost.ops.autocast``).

Each op under autocast must give exactly what it gives outside autocast on the operands the rule casts: the
activation, the frozen base weights and the biases in the autocast dtype, fp32 adapters kept fp32, quantized
codes untouched. Exactly, because the rule only casts and the op then runs with autocast off: any difference
is a cast the rule did not make (an operand silently left in fp32) or autocast leaking into the op's body
(the torch backend's fp32 accumulations cast down). Gradients must land, in fp32, on the fp32 tensors
(through the casts' backward) and equal the cast-input op's, and the autocast result must really be the bf16
computation: off the fp32 op's result by more than fp32 rounding, within the bf16 tolerance of
tests/helpers.py (four bf16 roundings relative to the output's largest magnitude).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowcost.ops as ops
from helpers import TOLERANCE, max_normalized_error
from lowcost.ops import autocast as rules
from lowcost.reference.quant import QuantizedWeight, quantize_nf4

BF16 = torch.bfloat16
FP32_ROUNDING = TOLERANCE[torch.float32]   # what an op that silently stayed fp32 would be off by, at most


def _rand(gen, *shape, std=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float()


def _leaves(tensors: dict, cast: dict) -> dict:
    """Fresh leaves: each tensor converted to ``cast[name]`` (or kept), requiring grad where it did."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            out[name] = t
            continue
        out[name] = t.detach().to(cast.get(name, t.dtype)).requires_grad_(t.requires_grad)
    return out


def _run(call, tensors: dict, grad_seed: int = 7):
    """(output, {name: grad}) of ``call(**tensors)`` with a fixed random cotangent."""
    out = call(**tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(out.device)
    (out.float() * g.float()).sum().backward() if out.dim() else out.float().backward()
    return out, {k: t.grad for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.grad is not None}


def _check_case(call, tensors: dict, compute: tuple, dtype=BF16, really_low=True):
    """The op under autocast == the op on the rule's cast operands (output and every gradient, exactly);
    gradients in the leaves' own dtype (fp32); and, with ``really_low``, the result is not the fp32 one."""
    device_type = next(t for t in tensors.values() if isinstance(t, torch.Tensor)).device.type
    with torch.autocast(device_type, dtype=dtype):
        got, got_grads = _run(call, _leaves(tensors, {}))
    want, want_grads = _run(call, _leaves(tensors, {name: dtype for name in compute}))
    assert got.dtype == want.dtype and torch.equal(got, want)
    trained = {k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    assert set(got_grads) == trained == set(want_grads)
    for name in trained:
        assert got_grads[name].dtype == tensors[name].dtype, name
        assert torch.equal(got_grads[name], want_grads[name].to(tensors[name].dtype)), name
    if really_low:
        fp32 = call(**_leaves(tensors, {})).detach()
        error, _ = max_normalized_error(got.detach(), fp32)
        assert FP32_ROUNDING < error <= TOLERANCE[dtype], error
    return got


def _lora_linear_inputs(shape, K=7, N=6, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": _rand(gen, *shape, K).requires_grad_(), "weight": _rand(gen, N, K, std=K ** -0.5),
            "lora_a": _rand(gen, r, K, std=K ** -0.5).requires_grad_(),
            "lora_b": _rand(gen, N, r, std=r ** -0.5).requires_grad_(), "bias": _rand(gen, N)}


# ------------------------------------------------------------------------------------------- registration
def test_every_lowcost_op_has_an_autocast_rule():
    """A new op must be placed: a forward rule, a backward op (autocast off) or an internal kernel."""
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lowcost::")}
    placed = set(rules.RULES) | set(rules.BACKWARD_OPS) | set(rules.KERNEL_OPS)
    assert names - placed == set(), f"lowcost ops without an autocast rule in lowcost/ops/autocast.py: {names - placed}"
    for name in set(rules.RULES) | set(rules.BACKWARD_OPS):
        for key in rules.DEVICE_KEYS.values():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowcost::{name}", key), (name, key)


# ------------------------------------------------------------------------------------------- lora_linear
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape, dropout", [((1,), 0.0), ((2, 3), 0.25), ((5,), 0.0)])
def test_lora_linear(backend, shape, dropout):
    def call(x, weight, lora_a, lora_b, bias):
        return ops.lora_linear(x, weight, lora_a, lora_b, 0.5, bias=bias, dropout=dropout, seed=1234, backend=backend)
    y = _check_case(call, _lora_linear_inputs(shape), compute=("x", "weight", "bias"))
    assert y.dtype == BF16 and y.shape == (*shape, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_lora_linear_on_the_gpu(backend):
    """The same rule under CUDA autocast (the AutocastCUDA kernel), each GPU backend (not run on CPU CI)."""
    if backend == "cuda" and ops.backend.unavailable_reason("cuda", torch.device("cuda"), 3) is not None:
        pytest.skip(ops.backend.unavailable_reason("cuda", torch.device("cuda"), 3))
    cpu = _lora_linear_inputs((37,), K=72, N=56)
    inputs = {k: v.cuda().detach().requires_grad_(v.requires_grad) for k, v in cpu.items()}

    def call(x, weight, lora_a, lora_b, bias):
        return ops.lora_linear(x, weight, lora_a, lora_b, 0.5, bias=bias, dropout=0.1, seed=77, backend=backend)
    assert _check_case(call, inputs, compute=("x", "weight", "bias")).dtype == BF16


def test_lora_linear_no_rows():
    def call(x, weight, lora_a, lora_b, bias):
        return ops.lora_linear(x, weight, lora_a, lora_b, 0.5, bias=bias, backend="torch")
    y = _check_case(call, _lora_linear_inputs((0,)), compute=("x", "weight", "bias"), really_low=False)
    assert y.shape == (0, 6) and y.dtype == BF16


def test_lora_linear_float16_autocast_uses_the_autocast_dtype():
    def call(x, weight, lora_a, lora_b, bias):
        return ops.lora_linear(x, weight, lora_a, lora_b, 0.5, bias=bias, backend="torch")
    y = _check_case(call, _lora_linear_inputs((4,)), compute=("x", "weight", "bias"), dtype=torch.float16)
    assert y.dtype == torch.float16


def test_direct_op_call_is_cast_by_the_dispatcher_rule():
    """``torch.ops.lowcost.lora_linear`` (no Python wrapper: torch.compile's view) gets the same casts."""
    d = _lora_linear_inputs((3,))
    args = (d["x"], d["weight"], d["lora_a"], d["lora_b"], d["bias"], 0.5, 0.0, torch.tensor(0), "torch")
    with torch.autocast("cpu", dtype=BF16):
        y, u = torch.ops.lowcost.lora_linear(*args)
    wrapped = ops.lora_linear(d["x"].bfloat16(), d["weight"].bfloat16(), d["lora_a"], d["lora_b"], 0.5,
                              bias=d["bias"].bfloat16(), backend="torch")
    assert y.dtype == BF16 and u.dtype == torch.float32 and torch.equal(y, wrapped)


def test_bf16_activation_meets_fp32_weight():
    """Outside autocast a bf16 x with an fp32 weight is refused; under autocast the weight is cast."""
    d = _lora_linear_inputs((4,))
    x = d["x"].detach().bfloat16()
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.lora_linear(x, d["weight"], d["lora_a"], d["lora_b"], 0.5)
    with torch.autocast("cpu", dtype=BF16):
        y = ops.lora_linear(x, d["weight"], d["lora_a"], d["lora_b"], 0.5)
    assert torch.equal(y, ops.lora_linear(x, d["weight"].bfloat16(), d["lora_a"], d["lora_b"], 0.5))


def test_backward_inside_the_autocast_region_changes_nothing():
    d = _lora_linear_inputs((5,))
    grads = []
    for inside in (False, True):
        x, a = d["x"].detach().requires_grad_(), d["lora_a"].detach().requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            y = ops.lora_linear(x, d["weight"], a, d["lora_b"], 0.5, backend="torch")
            if inside:
                y.float().square().sum().backward()
        if not inside:
            y.float().square().sum().backward()
        grads.append((x.grad, a.grad))
    assert all(torch.equal(p, q) for p, q in zip(*grads))


def test_bf16_adapters_go_to_the_autocast_dtype_fp32_ones_stay():
    low = torch.ones(2, dtype=BF16)
    with torch.autocast("cpu", dtype=torch.float16):
        (x,), (a32, a16, a64) = rules.autocast_operands((torch.ones(2),), (torch.ones(2), low, low.double()))
    assert (x.dtype, a32.dtype, a16.dtype, a64.dtype) == (torch.float16, torch.float32, torch.float16, torch.float64)
    (x,), (a,) = rules.autocast_operands((torch.ones(2),), (low,))      # autocast off: nothing changes
    assert x.dtype == torch.float32 and a is low


# ------------------------------------------------------------------------------------------- gated MLP
def _mlp_inputs(M=5, H=6, inter=10, r=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    d = {"x": _rand(gen, M, H).requires_grad_()}
    for role, (n_in, n_out) in (("gate", (H, inter)), ("up", (H, inter)), ("down", (inter, H))):
        d[f"w_{role}"] = _rand(gen, n_out, n_in, std=n_in ** -0.5)
        d[f"a_{role}"] = _rand(gen, r, n_in, std=n_in ** -0.5).requires_grad_()
        d[f"b_{role}"] = _rand(gen, n_out, r, std=r ** -0.5).requires_grad_()
    return d


def _mlp_call(fn, **kw):
    def call(x, **t):
        return fn(x, *((t[f"w_{r}"], t[f"a_{r}"], t[f"b_{r}"]) for r in ("gate", "up", "down")),
                  scales=(2.0, 1.5, 0.5), dropouts=(0.1, 0.0, 0.2), seeds=(3, 4, 5), **kw)
    return call


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_gated_mlp(backend):
    y = _check_case(_mlp_call(ops.lora_gated_mlp, backend=backend), _mlp_inputs(),
                    compute=("x", "w_gate", "w_up", "w_down"))
    assert y.dtype == BF16


# ------------------------------------------------------------------------------------------- loss
def _lce_inputs(M=9, K=7, V=11, r=3, seed=2, lora=True):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (M,), generator=gen)
    labels[::4] = -100
    d = {"hidden": _rand(gen, M, K).requires_grad_(), "weight": _rand(gen, V, K, std=K ** -0.5),
         "labels": labels, "bias": _rand(gen, V)}
    if lora:
        d["lora_a"] = _rand(gen, r, K, std=K ** -0.5).requires_grad_()
        d["lora_b"] = _rand(gen, V, r, std=r ** -0.5).requires_grad_()
    return d


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_loss_is_float32(backend):
    def call(hidden, weight, labels, bias, lora_a, lora_b):
        # under autocast the default loss dtype is fp32; the cast-input reference (bf16 hidden) asks for it
        loss_dtype = None if torch.is_autocast_enabled("cpu") else torch.float32
        return ops.linear_cross_entropy(hidden, weight, labels, bias, lora_a=lora_a, lora_b=lora_b, lora_scale=2.0,
                                        lora_dropout=0.1, seed=9, chunk=4, backend=backend, loss_dtype=loss_dtype)
    d = _lce_inputs()
    with torch.autocast("cpu", dtype=BF16):
        assert call(**_leaves(d, {})).dtype == torch.float32
    _check_case(call, d, compute=("hidden", "weight", "bias"))


def test_linear_cross_entropy_matches_torch_autocast():
    """torch's autocast: F.linear in bf16 (logits rounded once to bf16), cross_entropy in fp32. The fused op
    rounds its logits the same way and runs the log-softmax in fp32, so only the fp32 summation order of the
    log-sum-exp and the mean differs: a few fp32 roundings of the loss (2e-5 relative, tests/helpers.py)."""
    d = _lce_inputs(lora=False)
    with torch.autocast("cpu", dtype=BF16):
        fused = ops.linear_cross_entropy(d["hidden"], d["weight"], d["labels"], d["bias"], backend="torch")
        logits = F.linear(d["hidden"], d["weight"], d["bias"])
        plain = F.cross_entropy(logits, d["labels"])
    assert logits.dtype == BF16 and plain.dtype == fused.dtype == torch.float32
    assert abs(fused.item() - plain.item()) <= FP32_ROUNDING * abs(plain.item())


# ------------------------------------------------------------------------------------------- quantized bases
def _nf4(N, K, seed):
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * K ** -0.5
    return QuantizedWeight("nf4", (N, K), quantize_nf4(weight, 64, False), 64, torch.float32)


def test_qlora_linear_and_quantized_linear():
    d = _lora_linear_inputs((2, 3), K=70, N=6)
    weight = _nf4(6, 70, seed=3)
    d.pop("weight")

    def call(x, lora_a, lora_b, bias):
        return ops.lora_linear(x, weight, lora_a, lora_b, 0.5, bias=bias, dropout=0.2, seed=5)
    assert _check_case(call, d, compute=("x", "bias")).dtype == BF16

    def frozen(x, bias):
        return ops.quantized_linear(x, weight, bias)
    assert _check_case(frozen, {"x": d["x"], "bias": d["bias"]}, compute=("x", "bias")).dtype == BF16


def test_qlora_gated_mlp():
    d = _mlp_inputs(H=64, inter=70)
    for seed, role in enumerate(("gate", "up", "down")):
        d[f"w_{role}"] = _nf4(*d.pop(f"w_{role}").shape, seed=seed)
    y = _check_case(_mlp_call(ops.lora_gated_mlp), d, compute=("x",))
    assert y.dtype == BF16


def test_qlora_grouped_linear():
    """Grouped projections on quantized weights (the "qkv" fusion on a quantized base): x and the biases to bf16,
    fp32 adapters kept, the codes untouched; the body runs autocast off (its u and dx accumulate in fp32)."""
    gen = torch.Generator().manual_seed(11)
    K, ns = 70, (6, 4)
    weights = [_nf4(n, K, seed=20 + i) for i, n in enumerate(ns)]
    d = {"x": _rand(gen, 2, 3, K).requires_grad_(), "bias": _rand(gen, ns[0])}
    for i, n in enumerate(ns):
        d[f"a{i}"] = _rand(gen, 3, K, std=K ** -0.5).requires_grad_()
        d[f"b{i}"] = _rand(gen, n, 3, std=3 ** -0.5).requires_grad_()

    def call(x, bias, a0, b0, a1, b1):
        ys = ops.lora_grouped_linear(x, weights, [a0, a1], [b0, b1], [0.5, 2.0], biases=[bias, None],
                                     dropouts=[0.2, 0.0], seeds=[5, 6], backend="torch")
        return torch.cat(ys, dim=-1)
    assert _check_case(call, d, compute=("x", "bias")).dtype == BF16


def test_linear_cross_entropy_on_a_quantized_head():
    """hidden and bias to bf16 (the dequantized W follows hidden), fp32 adapters kept, the loss fp32."""
    d = _lce_inputs()
    V, K = d.pop("weight").shape
    weight = _nf4(V, K, seed=4)

    def call(hidden, labels, bias, lora_a, lora_b):
        loss_dtype = None if torch.is_autocast_enabled("cpu") else torch.float32
        return ops.linear_cross_entropy(hidden, weight, labels, bias, lora_a=lora_a, lora_b=lora_b, lora_scale=2.0,
                                        lora_dropout=0.1, seed=9, chunk=4, backend="torch", loss_dtype=loss_dtype)
    with torch.autocast("cpu", dtype=BF16):
        assert call(**_leaves(d, {})).dtype == torch.float32
    _check_case(call, d, compute=("hidden", "bias"))
