"""merge (plain modules, fp32 fold rounded once, drift report), merge/unmerge round trip, accelerate_peft."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lowcost
from lowcost.patch import lora_layers, set_merged
from tiny_models import CASES, gpt2, llama, output, randomize_adapters


@pytest.mark.parametrize("case", ["llama", "gpt2", "encoder"])
def test_merge_gives_plain_modules_and_same_logits(case):
    build, batch_of, _ = CASES[case]
    model = build()
    original_types = [(n, type(m)) for n, m in model.named_modules()]
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    randomize_adapters(lora_layers(model))
    batch = batch_of(model)
    adapted = output(model.eval(), batch)
    expected_weights = {n: (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)
                        for n, layer in lora_layers(model).items()}
    probe = batch["x"] if "x" in batch else None
    merged, drift = lowcost.merge(model, probe=probe)
    assert merged is model and "_lowcost_patch" not in model.__dict__
    assert [(n, type(m)) for n, m in merged.named_modules()] == original_types
    for name, weight in expected_weights.items():
        assert torch.equal(merged.get_submodule(name).weight, weight)      # fp32 accumulate, one rounding
    torch.testing.assert_close(output(merged, batch), adapted, rtol=1e-5, atol=1e-5)
    assert drift.logit_rel < 1e-5 and len(drift.layers) == len(expected_weights)
    assert drift.min_retained == pytest.approx(1.0, abs=1e-5) and "merged" in str(drift)


def test_merge_not_inplace_keeps_the_model_patched():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"]))
    merged, _ = lowcost.merge(model, inplace=False)
    assert merged is not model and "_lowcost_patch" in model.__dict__
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear


def test_bf16_merge_reports_lost_delta():
    model = llama().to(torch.bfloat16)
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"], adapter_dtype=torch.float32))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=1e-6)                             # far below one bf16 ulp of W
    _, drift = lowcost.merge(model)
    assert drift.min_retained < 0.1 and drift.layers[0].rel_error > 0.9 and drift.logit_max_abs is not None


def test_merge_unmerge_round_trip():
    model = gpt2()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    randomize_adapters(lora_layers(model))
    batch = CASES["gpt2"][1](None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = output(model.eval(), batch)
    set_merged(model, True)
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)
    set_merged(model, False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    set_merged(model, True)
    lowcost.unapply(model)                       # unapply takes merged adapters back out
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


def _peft_llama(**kwargs):
    torch.manual_seed(0)
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model


def test_accelerate_peft_same_outputs_grads_and_files(tmp_path):
    peft_model = _peft_llama()
    twin = copy.deepcopy(peft_model)
    params = dict(peft_model.named_parameters())
    report = lowcost.accelerate_peft(peft_model)
    assert report.paths() == {"fused": 14}
    assert all(p is params[n] for n, p in peft_model.named_parameters())          # same parameters
    batch = CASES["llama"][1](None)
    ours, theirs = peft_model(**batch).loss, twin(**batch).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    twin_params = dict(twin.named_parameters())
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-5, atol=1e-7)
    peft_model.save_pretrained(tmp_path / "out")                                   # PEFT's own API still works
    fresh = llama()
    lowcost.load_adapter(fresh, tmp_path / "out")
    torch.testing.assert_close(output(fresh.eval(), batch), output(peft_model.eval(), batch), rtol=1e-5, atol=1e-5)
    lowcost.unapply(peft_model)
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_accelerate_peft_falls_back_for_dora():
    peft_model = _peft_llama(use_dora=True)
    report = lowcost.accelerate_peft(peft_model)
    assert report.paths() == {"fallback": 14} and "DoRA" in report.adapted[0].reason
    with pytest.raises(RuntimeError, match="already patched"):
        lowcost.accelerate_peft(peft_model)
    with pytest.raises(RuntimeError, match="PEFT LoRA layer; use lowcost.accelerate_peft"):
        lowcost.apply(_peft_llama(), lora=lowcost.LoRAConfig())
