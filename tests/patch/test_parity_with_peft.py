"""After ``lowcost.apply``, loss and every adapter gradient equal PEFT's with the same adapter weights
(fp32, dropout 0, within 1e-5 relative to the largest magnitude); ``unapply`` restores the exact modules."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lowcost
from lowcost.patch import lora_layers
from tiny_models import CASES, assert_unchanged, randomize_adapters, snapshot

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def peft_twin(original, report, layers, **kwargs):
    """PEFT on a copy of the unpatched model, targeting exactly our modules, holding our adapter values."""
    peft_model = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=report.names, **kwargs))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = modules[f"base_model.model.{name}"]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model, modules


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_adapter_gradients_match_peft(case):
    build, batch_of, loss_of = CASES[case]
    model = build()
    original = copy.deepcopy(model)
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    layers = lora_layers(model)
    randomize_adapters(layers)
    peft_model, modules = peft_twin(original, report, layers)
    batch = batch_of(model)
    ours, theirs = loss_of(model, batch), loss_of(peft_model, batch)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= TOL * abs(theirs.item()), (ours.item(), theirs.item())
    for name, layer in layers.items():
        peft_layer = modules[f"base_model.model.{name}"]
        for part in ("lora_A", "lora_B"):
            mine, ref = getattr(layer, part).grad, getattr(peft_layer, part)["default"].weight.grad
            assert rel_err(mine, ref) <= TOL, f"{name}.{part}.grad: {rel_err(mine, ref):.2e}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n in layers for part in ("lora_A", "lora_B")}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_report_paths_per_family():
    from tiny_models import bert, encoder, gpt2
    assert set(lowcost.apply(gpt2(), lora=lowcost.LoRAConfig()).paths()) == {"fused-conv1d"}
    report = lowcost.apply(bert(), lora=lowcost.LoRAConfig())
    assert report.family == "bert" and report.excluded_head == "classifier"
    assert "bert.pooler.dense" in report.names
    report = lowcost.apply(encoder(), lora=lowcost.LoRAConfig())
    assert report.excluded_head == "head"
    assert {s.name for s in report.skipped} == {f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)}
    assert "MultiheadAttention" in report.skipped[0].reason


@pytest.mark.parametrize("case", ["llama", "gpt2", "encoder"])
def test_unapply_restores_the_exact_modules(case):
    build, batch_of, _ = CASES[case]
    model = build()
    model.lm_head.weight.requires_grad_(True) if hasattr(model, "lm_head") else None
    before = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4, modules_to_save=["head"] if case == "encoder"
                                                 else ()))
    randomize_adapters(lora_layers(model))
    lowcost.unapply(model)
    assert_unchanged(model, before)
    assert all(p is params[n] for n, p in model.named_parameters())
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))      # can be applied again after unapply
