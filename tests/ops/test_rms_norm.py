"""lowcost.ops.rms_norm: output, dx and dw against float64 autograd of the RMSNorm formula (both forms, odd
shapes, M = 0 and 1); bit-identical forwards to the HF modules it replaces; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

from lowcost.ops import rms_norm
from lowcost.ops.rms_norm import _rms_norm_backward_op, _rms_norm_op
from helpers import assert_close_to_reference

EPS = 1e-6


def formula64(x, weight, form):
    """The RMSNorm of the module docstring, in float64, through autograd (independent of the op's backward)."""
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return xhat * (weight if form == "llama" else 1.0 + weight)


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    return rand(*shape, std=3.0), 1.0 + rand(shape[-1], std=0.5), rand(*shape)


@pytest.mark.parametrize("form", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(13, 70), (1, 37), (0, 16), (2, 3, 129)])
def test_matches_float64_output_and_every_gradient(shape, dtype, form):
    x, weight, grad_y = make(shape, dtype)
    xt, wt = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = rms_norm(xt, wt, EPS, form)
    y.backward(grad_y)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = formula64(x64, w64, form)
    y64.backward(grad_y.double())
    assert y.dtype == dtype and xt.grad.dtype == dtype and wt.grad.dtype == dtype
    assert_close_to_reference("y", y, y64.detach(), dtype)
    assert_close_to_reference("dx", xt.grad, x64.grad, dtype)
    # dw sums over every row: its error is that of the row sum, with the output rounded once
    assert_close_to_reference("dw", wt.grad, w64.grad, dtype)


def _hf_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    return {"llama": (LlamaRMSNorm, "llama"), "qwen2": (Qwen2RMSNorm, "llama"), "gemma": (GemmaRMSNorm, "gemma")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_bit_identical_to_the_hf_module(family, dtype):
    cls, form = _hf_norms()[family]
    module = cls(70, eps=EPS).to(dtype)
    x, weight, grad_y = make((5, 70), dtype, seed=1)
    with torch.no_grad():
        module.weight.copy_(weight - 1.0 if form == "gemma" else weight)
    assert torch.equal(rms_norm(x, module.weight, EPS, form), module(x))
    # the gradient agrees to the dtype's tolerance (HF's backward rounds through the casts; ours computes in fp32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(xa).backward(grad_y)
    rms_norm(xb, module.weight, EPS, form).backward(grad_y)
    assert_close_to_reference("dx vs HF", xb.grad, xa.grad.double(), dtype if dtype != torch.float32 else dtype)


def test_frozen_weight_gets_no_gradient_and_saves_x_rstd_weight():
    x, weight, grad_y = make((6, 24), torch.float32)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm(x, weight, EPS)
    assert [tuple(t.shape) for t in saved] == [(6, 24), (6, 1), (24,)]
    assert saved[0] is x or saved[0].data_ptr() == x.data_ptr()
    y.backward(grad_y)
    assert weight.grad is None and x.grad is not None


@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_opcheck(form):
    x, weight, grad_y = make((7, 33), torch.float32)
    result = torch.library.opcheck(_rms_norm_op, (x.requires_grad_(), weight.requires_grad_(), EPS, form))
    assert all(v == "SUCCESS" for v in result.values()), result
    _, stat = _rms_norm_op(x.detach(), weight.detach(), EPS, form)
    bargs = (grad_y, x.detach(), stat, weight.detach(), form, [True, True])
    result = torch.library.opcheck(_rms_norm_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.ones(5), EPS), ValueError, r"weight must have shape \(H=4,\)"),
    ((torch.randn(3, 4), torch.ones(4), -1.0), ValueError, "eps must be a finite number >= 0"),
    ((torch.randn(3, 4), torch.ones(4, 1), EPS), ValueError, "weight must be 1-D"),
    ((torch.ones(3, 4, dtype=torch.int64), torch.ones(4), EPS), TypeError, "x must be a float32"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        rms_norm(*args)
    with pytest.raises(ValueError, match="form must be one of"):
        rms_norm(torch.randn(2, 4), torch.ones(4), EPS, form="layer")
