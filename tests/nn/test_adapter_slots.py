"""Named adapters on one layer (``lowcost.nn.adapters``) for LoRALinear, LoRAEmbedding and the fallback:
outputs are the base plus the sum of the running adapters' terms, written out by hand here; the first adapter
keeps the single-adapter parameter names; delete promotes; merge folds several adapters with one rounding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowcost
from lowcost.nn import AdapterSpec
from lowcost.patch.fallback import LoRAFallback


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.5


def layer_of(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return lowcost.LoRALinear(nn.Linear(6, 5), r=2, alpha=4)
    if kind == "embedding":
        return lowcost.LoRAEmbedding(nn.Embedding(9, 5, padding_idx=0), r=2, alpha=4)
    return LoRAFallback((Scaled if kind == "fallback" else nn.Linear)(6, 5), r=2, alpha=4)


def fill(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.adapter_names:
            for p in (layer.factors(name).lora_A, layer.factors(name).lora_B):
                p.copy_(torch.randn(p.shape, generator=gen))


def term(layer, name, x):
    """s·B A x (linear) or s·Aᵀ[ids] Bᵀ (embedding), by hand."""
    f = layer.factors(name)
    if isinstance(layer, lowcost.LoRAEmbedding):
        return f.scaling * f.lora_A.t()[x] @ f.lora_B.t()
    return f.scaling * x @ f.lora_A.t() @ f.lora_B.t()


def base(layer, x):
    if isinstance(layer, lowcost.LoRAEmbedding):
        return layer.weight[x]
    if isinstance(layer, LoRAFallback):
        return layer.base_layer(x)
    return x @ layer.weight.t() + layer.bias


def inputs(layer):
    if isinstance(layer, lowcost.LoRAEmbedding):
        return torch.tensor([[0, 3, 3, 8], [1, 2, 0, 5]])
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(2))


KINDS = ["linear", "embedding", "fallback"]


@pytest.mark.parametrize("kind", KINDS)
def test_running_adapters_add_up(kind):
    layer = layer_of(kind)
    layer.add_adapter("second", AdapterSpec(r=3, alpha=2, use_rslora=True))
    fill(layer)
    x = inputs(layer)
    assert set(dict(layer.named_parameters())) >= {"lora_A", "lora_B", "extra_adapters.second.lora_A"}
    cases = {("default",): ["default"], ("second",): ["second"], ("second", "default"): ["second", "default"],
             ("missing", "second"): ["second"], (): []}
    for active, running in cases.items():
        layer.active = active
        expected = base(layer, x) + sum((term(layer, n, x) for n in running), torch.zeros(()))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.active, layer.disabled = ("default", "second"), True
    torch.testing.assert_close(layer(x), base(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "embedding", "plain-fallback"])
def test_merge_of_two_adapters_rounds_once_and_unmerges(kind):
    layer = layer_of(kind)
    layer.add_adapter("second", AdapterSpec(r=3, alpha=2))
    fill(layer)
    x = inputs(layer)
    layer.active = ("default", "second")
    adapted = layer(x)
    weight = layer.base_param().detach().clone()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default", "second"] and layer.running_adapters() == []
    expected = (weight.float() + layer.delta_weight("default") + layer.delta_weight("second")).to(weight.dtype)
    assert torch.equal(layer.base_param(), expected)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_param(), weight, rtol=0, atol=1e-6)


def test_safe_layer_merge_leaves_the_weight_alone():
    layer = layer_of("linear")
    fill(layer)
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="not finite; nothing was merged"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, weight) and not layer.merged


@pytest.mark.parametrize("kind", KINDS)
def test_deleting_the_first_adapter_promotes_the_next(kind):
    layer = layer_of(kind)
    layer.add_adapter("second", AdapterSpec(r=3, alpha=6, dropout=0.1))
    fill(layer)
    second = layer.factors("second")
    layer.delete_adapter("default")
    assert layer.adapter_names == ["second"] and layer.adapter_name == "second"
    assert layer.lora_A is second.lora_A and (layer.r, layer.alpha, layer.dropout) == (3, 6.0, 0.1)
    assert "extra_adapters" not in dict(layer.named_modules())
    with pytest.raises(ValueError, match="only adapter"):
        layer.delete_adapter("second")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        layer.factors("nope")


def test_set_trainable_and_extra_adapter_init():
    layer = layer_of("linear")
    layer.add_adapter("second", AdapterSpec(r=3, alpha=2))
    assert torch.count_nonzero(layer.factors("second").lora_B) == 0          # PEFT init: B = 0
    layer.set_trainable(["second"])
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert flags == {"weight": False, "bias": False, "lora_A": False, "lora_B": False,
                     "extra_adapters.second.lora_A": True, "extra_adapters.second.lora_B": True}
    emb = layer_of("embedding")
    emb.add_adapter("second", AdapterSpec(r=3, alpha=2))
    assert torch.count_nonzero(emb.factors("second").lora_A) == 0            # embedding init: A = 0
    with pytest.raises(ValueError, match="already holds an adapter named 'second'"):
        emb.add_adapter("second", AdapterSpec(r=1, alpha=1))
