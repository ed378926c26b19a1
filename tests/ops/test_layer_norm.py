"""lowcost.ops.layer_norm: output, dx, dw and db against float64 autograd of the LayerNorm formula (odd shapes,
M = 0 and 1, with and without affine parameters); bit-identical to nn.LayerNorm; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

from lowcost.ops import layer_norm
from lowcost.ops.layer_norm import _layer_norm_backward_op, _layer_norm_op
from helpers import assert_close_to_reference

EPS = 1e-5


def formula64(x, weight, bias):
    """(x − mean)/sqrt(var + eps) ⊙ w + b in float64 through autograd (independent of torch's kernel)."""
    centred = x - x.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + EPS)
    return y * (weight if weight is not None else 1.0) + (bias if bias is not None else 0.0)


def make(shape, dtype, affine=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    x = rand(*shape, std=3.0) + 0.5
    weight, bias = (1.0 + rand(shape[-1], std=0.5), rand(shape[-1], std=0.2)) if affine else (None, None)
    return x, weight, bias, rand(*shape)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(13, 70), (1, 37), (0, 16), (2, 3, 129)])
def test_matches_float64_output_and_every_gradient(shape, dtype, affine):
    x, weight, bias, grad_y = make(shape, dtype, affine)
    trained = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = layer_norm(*trained, EPS)
    y.backward(grad_y)
    truth = [t.double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y64 = formula64(*truth)
    y64.backward(grad_y.double())
    assert y.dtype == dtype
    assert_close_to_reference("y", y, y64.detach(), dtype)
    for name, mine, ref in zip(("dx", "dw", "db"), trained, truth):
        if mine is not None:
            assert mine.grad.dtype == dtype
            assert_close_to_reference(name, mine.grad, ref.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_nn_layer_norm(dtype):
    module = torch.nn.LayerNorm(70, eps=EPS).to(dtype)
    x, weight, bias, grad_y = make((5, 70), dtype, seed=1)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = module(xa), layer_norm(xb, module.weight, module.bias, EPS)
    assert torch.equal(got, expected)
    expected.backward(grad_y)
    got.backward(grad_y)
    assert torch.equal(xa.grad, xb.grad)   # the same aten backward kernel


def test_opcheck():
    x, weight, bias, grad_y = make((7, 33), torch.float32)
    result = torch.library.opcheck(_layer_norm_op, (x.requires_grad_(), weight.requires_grad_(), bias, EPS))
    assert all(v == "SUCCESS" for v in result.values()), result
    _, mean, rstd = _layer_norm_op(x.detach(), weight.detach(), bias, EPS)
    bargs = (grad_y, x.detach(), mean, rstd, weight.detach(), bias, [True, True, True])
    result = torch.library.opcheck(_layer_norm_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.ones(5), None, EPS), ValueError, r"weight must have shape \(H=4,\)"),
    ((torch.randn(3, 4), None, torch.ones(3), EPS), ValueError, r"bias must have shape \(H=4,\)"),
    ((torch.randn(3, 4), None, None, float("nan")), ValueError, "eps must be a finite number >= 0"),
    ((torch.ones(3, 4, dtype=torch.int64), None, None, EPS), TypeError, "x must be a float32"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        layer_norm(*args)
