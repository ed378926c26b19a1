"""lowcost.ops.lora_linear: every available backend against the float64 reference, through autograd.

Backends: ``torch`` always; ``triton`` under the interpreter on CPU (TRITON_INTERPRET=1, set by
conftest); the C++ composition of the ``cuda`` backend on CPU tensors when ``lowcost._C`` is built
(its CUDA kernels run only on a GPU: tests/gpu/).
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost._extension import has_kernel
from lowcost.ops.backend import triton_usable
from lowcost.reference import dropout_keep_mask, keep_scale
from helpers import TOLERANCE, assert_close_to_reference, make_lora_inputs, to_float64

HAS_CPP = has_kernel("lora_down", "CPU")
CPU = torch.device("cpu")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(CPU), reason="triton not installed")),
]
GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")


def run_op(inputs: dict, scale: float, dropout: float, seed: int, backend: str, frozen_x: bool = False):
    """y and the gradients of every differentiable input, through lowcost.ops.lora_linear."""
    leaves = {k: inputs[k].detach().clone().requires_grad_(not (k == "x" and frozen_x))
              for k in GRAD_NAMES if inputs[k] is not None}
    x = leaves["x"]
    if inputs["x"].stride() != x.stride():  # keep the caller's strides (non-contiguous test)
        x = inputs["x"].detach().t().clone().t().requires_grad_(not frozen_x)
        leaves["x"] = x
    y = lowcost.lora_linear(x, inputs["weight"], leaves["lora_a"], leaves["lora_b"], scale,
                            bias=leaves.get("bias"), dropout=dropout, seed=seed, backend=backend)
    y.backward(inputs["grad_y"])
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def reference_autograd64(inputs: dict, scale: float, dropout: float, seed: int):
    """Ground truth by plain float64 autograd of y = x Wᵀ + s (D⊙x) Aᵀ Bᵀ + b (independent of lowcost's
    hand-written backward)."""
    f64 = to_float64(inputs)
    leaves = {k: f64[k].clone().requires_grad_() for k in GRAD_NAMES if f64[k] is not None}
    M, K = leaves["x"].shape
    mask = dropout_keep_mask(M, K, seed, dropout).double() * (keep_scale(dropout) if dropout else 1.0)
    y = leaves["x"] @ f64["weight"].t() + scale * ((leaves["x"] * mask) @ leaves["lora_a"].t()) @ leaves["lora_b"].t()
    if "bias" in leaves:
        y = y + leaves["bias"]
    y.backward(f64["grad_y"])
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def check_against_reference(inputs, scale, dropout, seed, backend, dtype):
    y, grads = run_op(inputs, scale, dropout, seed, backend)
    y64, grads64 = reference_autograd64(inputs, scale, dropout, seed)
    assert y.dtype == inputs["x"].dtype
    assert_close_to_reference(f"{backend} y", y, y64, dtype)
    for name in grads64:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(f"{backend} d{name}", grads[name], grads64[name], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r", [(1, 48, 100, 1), (7, 100, 48, 7), (129, 72, 40, 16), (33, 40, 24, 64)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_matches_reference(backend, M, K, N, r, dropout):
    inputs = make_lora_inputs(M, K, N, r, torch.float32, seed=M + r)
    check_against_reference(inputs, 1.7, dropout, seed=11 + M, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                                 (torch.float16, None)])
def test_low_precision_matches_reference(backend, dtype, adapter_dtype):
    inputs = make_lora_inputs(37, 72, 56, 7, dtype, adapter_dtype=adapter_dtype, seed=3)
    check_against_reference(inputs, 2.0, 0.1, seed=5, backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_x_and_grad(backend):
    inputs = make_lora_inputs(19, 40, 24, 7, noncontiguous=True, seed=4)
    assert not inputs["x"].is_contiguous() and not inputs["grad_y"].is_contiguous()
    check_against_reference(inputs, 0.5, 0.2, seed=2**40 + 3, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_frozen_x(backend):
    inputs = make_lora_inputs(9, 40, 24, 4, bias=False, seed=8)
    y, grads = run_op(inputs, 1.0, 0.1, 1, backend, frozen_x=True)
    y64, grads64 = reference_autograd64(inputs, 1.0, 0.1, 1)
    assert "bias" not in grads and grads["x"] is None
    for name in ("lora_a", "lora_b"):
        assert_close_to_reference(name, grads[name], grads64[name], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs = make_lora_inputs(0, 40, 24, 4, seed=1)
    y, grads = run_op(inputs, 1.0, 0.1, 1, backend)
    assert y.shape == (0, 24)
    assert grads["x"].shape == (0, 40)
    for name in ("lora_a", "lora_b", "bias"):
        assert torch.count_nonzero(grads[name]) == 0, name


def test_leading_dims_and_1d_input():
    inputs = make_lora_inputs(12, 20, 16, 4, seed=2)
    args = (inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.5)
    y = lowcost.lora_linear(inputs["x"], *args, bias=inputs["bias"], backend="torch")
    y3 = lowcost.lora_linear(inputs["x"].reshape(3, 4, 20), *args, bias=inputs["bias"], backend="torch")
    y1 = lowcost.lora_linear(inputs["x"][5], *args, bias=inputs["bias"], backend="torch")
    torch.testing.assert_close(y3.reshape(12, 16), y)
    torch.testing.assert_close(y1, y[5])


def test_gradcheck_float64_torch_backend():
    inputs = make_lora_inputs(5, 7, 6, 3, seed=9)
    f64 = {k: v.double().requires_grad_(k in GRAD_NAMES) for k, v in inputs.items()}

    def f(x, a, b, bias):
        return lowcost.lora_linear(x, f64["weight"], a, b, 0.7, bias=bias, dropout=0.3, seed=4, backend="torch")

    assert torch.autograd.gradcheck(f, (f64["x"], f64["lora_a"], f64["lora_b"], f64["bias"]))


def test_weight_gradient_only_when_weight_trains():
    inputs = make_lora_inputs(6, 10, 8, 2, seed=5)
    weight = inputs["weight"].clone().requires_grad_()
    x = inputs["x"].clone().requires_grad_()
    y = lowcost.lora_linear(x, weight, inputs["lora_a"], inputs["lora_b"], 1.0, backend="torch")
    y.backward(inputs["grad_y"])
    torch.testing.assert_close(weight.grad, inputs["grad_y"].t() @ inputs["x"])


def test_seed_none_draws_from_torch_generator():
    inputs = make_lora_inputs(8, 32, 8, 4, seed=6)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 1.0)
    torch.manual_seed(0)
    y0 = lowcost.lora_linear(*args, dropout=0.5)
    y1 = lowcost.lora_linear(*args, dropout=0.5)
    torch.manual_seed(0)
    y0_again = lowcost.lora_linear(*args, dropout=0.5)
    assert torch.equal(y0, y0_again) and not torch.equal(y0, y1)


def test_mask_past_2_31_elements_uses_the_high_counter_word():
    """Offsets past 2**31 (and 2**34, where the counter's high word starts) stay exact: rows near there
    are generated without allocating them, and checked against Philox called by hand."""
    from lowcost.reference.philox import philox4x32_10, dropout_threshold
    K, row = 1000, (2**34 + 4000) // 1000   # index row*K + k crosses into counter high word 1
    mask = dropout_keep_mask(2, K, seed=77, p=0.5, row_offset=row)
    index = torch.arange(row * K, (row + 2) * K, dtype=torch.int64)
    counter = index >> 2
    words = philox4x32_10(counter & 0xFFFFFFFF, counter >> 32, 0, 0, 77, 0)
    lane_word = torch.stack(words, 1).gather(1, (index & 3)[:, None])[:, 0]
    assert (counter >> 32).max() == 1
    assert torch.equal(mask.flatten(), lane_word >= dropout_threshold(0.5))
    wrapped = philox4x32_10(counter & 0xFFFFFFFF, 0, 0, 0, 77, 0)
    assert not torch.equal(torch.stack(wrapped, 1).gather(1, (index & 3)[:, None])[:, 0], lane_word)


def test_dropout_fraction_and_scaling():
    mask = dropout_keep_mask(300, 400, seed=123, p=0.3)
    assert abs((~mask).float().mean().item() - 0.3) < 0.01
    x = torch.ones(300, 400)
    from lowcost.reference import apply_dropout
    kept = apply_dropout(x, 123, 0.3)
    assert torch.equal(kept != 0, mask)
    assert torch.allclose(kept[mask], torch.tensor(1 / 0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_without_the_compiled_extension(monkeypatch, dtype):
    """Without lowcost._C the torch backend regenerates the mask with the pure-torch Philox: same results."""
    from lowcost.ops import _torch_backend
    calls = []
    pure = _torch_backend.apply_dropout
    monkeypatch.setattr(_torch_backend, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(_torch_backend, "apply_dropout", lambda *a: calls.append(1) or pure(*a))
    inputs = make_lora_inputs(33, 72, 40, 7, dtype, seed=12)
    check_against_reference(inputs, 1.3, 0.15, seed=99, backend="torch", dtype=dtype)
    assert len(calls) == 3          # x̃ in forward; x̃ and D⊙(duA) in backward


def test_dropout_pair_uses_one_generation_only_where_the_backend_declares_it():
    """``dropout_pair`` calls ``pair`` on a ``PairedDropout`` (the torch backend's dropout) and otherwise calls
    the plain ``DropoutFn`` twice; both give the mask of two separate calls, and p = 0 returns the inputs."""
    from lowcost.ops import _torch_backend
    from lowcost.reference.philox import PairedDropout, apply_dropout, dropout_pair

    assert isinstance(_torch_backend._dropout, PairedDropout)
    assert not isinstance(apply_dropout, PairedDropout)
    x, z = torch.randn(5, 37), torch.randn(5, 37)
    expected = (apply_dropout(x, 7, 0.25), apply_dropout(z, 7, 0.25))
    calls = []

    class Recording:
        def __call__(self, t, seed, p):
            calls.append("call")
            return apply_dropout(t, seed, p)

        def pair(self, a, b, seed, p):
            calls.append("pair")
            return apply_dropout(a, seed, p), apply_dropout(b, seed, p)

    for dropout_fn, wanted in ((Recording(), ["pair"]), (Recording().__call__, ["call", "call"]),
                               (_torch_backend._dropout, None)):
        calls.clear()
        got = dropout_pair(dropout_fn, x, z.clone(), 7, 0.25)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert wanted is None or calls == wanted
    assert all(got is given for got, given in zip(dropout_pair(apply_dropout, x, z, 7, 0.0), (x, z)))


@pytest.mark.skipif(not has_kernel("philox_dropout_pair_", "CPU"), reason="lowcost._C is not built")
@pytest.mark.parametrize("needs_dx", [True, False])
def test_torch_backend_backward_generates_the_mask_once(needs_dx):
    """With the compiled extension, backward masks x̃ (for dA) and du·A (for dx) with one philox_dropout_pair_
    call (one mask generation instead of two), and the forward with one philox_dropout; results are the
    reference's (check_against_reference). Without dx, backward masks x̃ alone."""
    from torch.profiler import profile

    def dropout_calls(prof) -> list[str]:
        return [e.name.split("::")[1] for e in prof.events() if e.name.startswith("lowcost::philox_dropout")]

    inputs = make_lora_inputs(33, 72, 40, 7, torch.float32, seed=12)
    x = inputs["x"].detach().requires_grad_(needs_dx)
    a, b = inputs["lora_a"].detach().requires_grad_(), inputs["lora_b"].detach().requires_grad_()
    with profile() as forward_prof:
        y = lowcost.ops.lora_linear(x, inputs["weight"], a, b, 1.3, inputs["bias"], 0.15, 99, backend="torch")
    with profile() as backward_prof:
        y.backward(torch.randn_like(y))
    assert dropout_calls(forward_prof) == ["philox_dropout"]
    assert dropout_calls(backward_prof) == (["philox_dropout_pair_"] if needs_dx else ["philox_dropout"])
    check_against_reference(inputs, 1.3, 0.15, seed=99, backend="torch", dtype=torch.float32)
