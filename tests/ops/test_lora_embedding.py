"""``lowcost.ops.lora_embedding`` against the one-hot float64 reference (``lowcost.reference.lora_embedding``):
output and every gradient (table, A, B) on odd shapes (no tokens, one token, repeated tokens, 1-3-D ids),
with padding_idx and scale_grad_by_freq; low-precision dtypes within the project's tolerances; what autograd
keeps; errors for bad input."""
from __future__ import annotations

import pytest
import torch

import lowcost
from helpers import assert_close_to_reference
from lowcost.reference import lora_embedding_backward, lora_embedding_forward

V, N = 11, 13


def operands(shape, r, dtype=torch.float64, adapter_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=gen)
    if ids.numel() > 2:
        ids.view(-1)[1] = ids.view(-1)[0]                      # a repeated token always
    rand = lambda *s, dt=dtype: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
    weight, a, b = rand(V, N), rand(r, V, dt=adapter_dtype or dtype), rand(N, r, dt=adapter_dtype or dtype)
    return ids, weight, a, b, rand(*shape, N)


def truth(ids, weight, a, b, grad, scale, padding_idx, freq):
    y, u = lora_embedding_forward(ids, weight.double(), a.double(), b.double(), scale)
    d_w, d_a, d_b = lora_embedding_backward(grad.double(), ids, weight.double(), a.double(), b.double(), u, scale,
                                            padding_idx, freq)
    return y.reshape(*ids.shape, N), d_w, d_a, d_b


def run(ids, weight, a, b, grad, scale, padding_idx, freq):
    weight, a, b = (t.clone().requires_grad_(True) for t in (weight, a, b))
    y = lowcost.ops.lora_embedding(ids, weight, a, b, scale, padding_idx=padding_idx, scale_grad_by_freq=freq)
    y.backward(grad.to(y.dtype))
    return y, weight.grad, a.grad, b.grad


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (129,), (2, 5), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("r", [1, 7, 16])
@pytest.mark.parametrize("padding_idx,freq", [(None, False), (3, False), (None, True), (0, True)])
def test_float64_matches_the_one_hot_reference(shape, r, padding_idx, freq):
    ids, weight, a, b, grad = operands(shape, r)
    if padding_idx is not None and ids.numel():
        ids.view(-1)[-1] = padding_idx
    got = run(ids, weight, a, b, grad, 1.7, padding_idx, freq)
    want = truth(ids, weight, a, b, grad, 1.7, padding_idx, freq)
    for name, g, w in zip(("y", "dW", "dA", "dB"), got, want):
        assert_close_to_reference(name, g, w, torch.float64)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.float16, None), (torch.bfloat16, torch.float32)])
def test_low_precision_within_tolerance(dtype, adapter_dtype):
    ids, weight, a, b, grad = operands((3, 9), 7, dtype=dtype, adapter_dtype=adapter_dtype)
    y, d_w, d_a, d_b = run(ids, weight, a, b, grad, 2.0, 2, False)
    assert y.dtype == dtype and d_a.dtype == (adapter_dtype or dtype)
    want = truth(ids, weight, a, b, grad, 2.0, 2, False)
    for name, g, w in zip(("y", "dW", "dA", "dB"), (y, d_w, d_a, d_b), want):
        assert_close_to_reference(name, g, w, dtype)


def test_autograd_keeps_only_ids_and_u():
    ids, weight, a, b, _ = operands((4, 32), 8, dtype=torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        lowcost.ops.lora_embedding(ids, weight, a, b, 0.5)
    storages = {t.untyped_storage().data_ptr(): t for t in kept}
    shapes = sorted(tuple(t.shape) for t in storages.values() if t.is_floating_point() and t.numel() > 8 * 16)
    assert shapes == [(128, 8)], shapes                           # u; B itself is a parameter, ids are ints
    assert all(t.numel() <= 128 * 8 for t in storages.values())


def test_compiles_without_graph_breaks():
    import torch._dynamo as dynamo
    ids, weight, a, b, _ = operands((2, 6), 4, dtype=torch.float32)
    dynamo.reset()
    explanation = dynamo.explain(lambda i: lowcost.ops.lora_embedding(i, weight, a, b, 2.0, padding_idx=1))(ids)
    assert explanation.graph_break_count == 0
    dynamo.reset()


@pytest.mark.parametrize("change,message", [
    (dict(ids=torch.zeros(3)), "ids must be an int64 or int32 tensor"),
    (dict(lora_a=torch.zeros(4, V + 1)), r"lora_a must have shape \(r, V=11\)"),
    (dict(lora_b=torch.zeros(N, 5)), r"lora_b must have shape \(N=13, r=4\)"),
    (dict(scale=float("nan")), "scale must be a finite real number"),
])
def test_bad_input_is_named(change, message):
    args = dict(ids=torch.zeros(3, dtype=torch.long), weight=torch.zeros(V, N), lora_a=torch.zeros(4, V),
                lora_b=torch.zeros(N, 4), scale=1.0)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=message):
        lowcost.ops.lora_embedding(**args)
