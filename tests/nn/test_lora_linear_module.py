"""lowcost.nn.LoRALinear: parameters shared with the wrapped nn.Linear, PEFT init, merge/unmerge."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowcost


def make(r=4, alpha=8.0, dropout=0.0, bias=True, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias, dtype=dtype)
    return linear, lowcost.LoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, **kw)


def test_keeps_the_same_frozen_parameter_objects():
    linear, layer = make()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    back = layer.to_linear()
    assert back.weight is linear.weight and back.bias is linear.bias


def test_peft_init_and_identity_at_start():
    linear, layer = make(r=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(24)                       # kaiming_uniform(a=sqrt(5)) on (r, in_features)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), linear(x))


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    _, layer = make(r=4, alpha=16, use_rslora=rslora)
    assert layer.scaling == expected


def test_forward_matches_plain_lora_and_dropout_only_in_training():
    linear, layer = make(dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 24)
    plain = linear(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), plain, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    linear, layer = make(dtype=dtype)
    nn.init.normal_(layer.lora_B)
    original = linear.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    layer.eval()
    before = layer(x)
    layer.merge()
    expected = (original.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(dtype)
    assert torch.equal(linear.weight, expected)                 # fp32 accumulate, rounded once
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert ((linear.weight.float() - original.float()).abs() <= ulp * original.float().abs().clamp_min(1)).all()


def test_fp32_adapters_on_bf16_base():
    linear, layer = make(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    nn.init.normal_(layer.lora_B)
    y = layer(torch.randn(3, 24, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "r must be an int >= 1"), (dict(r=2.5), "r must be an int >= 1"),
    (dict(alpha=0), "alpha must be a finite number > 0"), (dict(dropout=1.0), "dropout must be a probability"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        lowcost.LoRALinear(nn.Conv1d(2, 2, 1), r=2, alpha=2)
