"""disable_adapter and several named adapters, each held against PEFT 0.21 on a tiny Llama: outputs, gradients,
which parameters train, files both ways (PEFT's layout: "default" in the directory, others in sub-directories)
and which adapters a merge folds."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lowcost
from lowcost.patch import lora_layers, set_merged
from tiny_models import CASES, assert_unchanged, llama, output, randomize_adapters, snapshot

BATCH = CASES["llama"][1](None)


def close(a, b, tol=1e-5):
    assert float((a - b).abs().max() / b.abs().max()) <= tol, float((a - b).abs().max() / b.abs().max())


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def trained_llama(tmp_path, **config):
    """A patched llama with non-zero adapters and a changed modules_to_save copy, and PEFT's twin (its file)."""
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, **config))
    randomize_adapters(lora_layers(model))
    with torch.no_grad():
        for name in config.get("modules_to_save", ()):
            model.get_submodule(name).weight.add_(0.5)
    lowcost.save_adapter(model, tmp_path / "a")
    return model.eval(), _quiet(PeftModel.from_pretrained, llama(), str(tmp_path / "a")).eval()


# ------------------------------------------------------------------------------------------------ disable
def test_disable_adapter_computes_the_base_model_like_peft(tmp_path):
    model, peft_model = trained_llama(tmp_path, modules_to_save=["model.norm"])
    base, adapted = output(llama().eval(), BATCH), output(model, BATCH)
    with lowcost.disable_adapter(model) as inside:
        assert inside is model
        disabled = output(model, BATCH)
        assert not model(**BATCH).loss.requires_grad          # no trainable parameter takes part
    with peft_model.disable_adapter():
        peft_disabled = output(peft_model, BATCH)
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)
    close(disabled, peft_disabled)
    torch.testing.assert_close(output(model, BATCH), adapted, rtol=0, atol=0)
    close(adapted, output(peft_model, BATCH))


def test_disable_adapter_restores_after_an_error_and_refuses_nesting():
    model = llama().eval()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    randomize_adapters(lora_layers(model))
    adapted = output(model, BATCH)
    with pytest.raises(KeyError):
        with lowcost.disable_adapter(model):
            raise KeyError("inside")
    torch.testing.assert_close(output(model, BATCH), adapted, rtol=0, atol=0)
    with lowcost.disable_adapter(model):
        with pytest.raises(RuntimeError, match="already disabled"):
            with lowcost.disable_adapter(model):
                pass
        with pytest.raises(RuntimeError, match="inside lowcost.disable_adapter"):
            lowcost.merge(model)


def test_disable_adapter_leaves_requires_grad_alone():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, modules_to_save=["model.norm"]))
    frozen = lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A.requires_grad_(False)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with lowcost.disable_adapter(model):
        assert not model.model.norm.weight.requires_grad                 # the original module is in place
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags and not frozen.requires_grad


def test_disable_adapter_takes_merged_adapters_out_and_back():
    model = llama().eval()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    randomize_adapters(lora_layers(model))
    base = output(llama().eval(), BATCH)
    set_merged(model, True)
    merged = output(model, BATCH)
    with lowcost.disable_adapter(model):
        close(output(model, BATCH), base)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(output(model, BATCH), merged, rtol=1e-6, atol=1e-6)


def test_disable_adapter_on_an_accelerate_peft_model():
    torch.manual_seed(0)
    peft_model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False)).eval()
    lowcost.accelerate_peft(peft_model)
    adapted = output(peft_model, BATCH)
    with lowcost.disable_adapter(peft_model):
        close(output(peft_model, BATCH), output(llama().eval(), BATCH))
    torch.testing.assert_close(output(peft_model, BATCH), adapted)


# ------------------------------------------------------------------------------------------------ several adapters
def peft_two_adapters(tmp_path):
    """PEFT llama with adapters "default" (q, v) and "other" (v, down; rsLoRA; modules_to_save), saved."""
    torch.manual_seed(0)
    peft_model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "down_proj"],
                                               use_rslora=True, init_lora_weights=False,
                                               modules_to_save=["model.norm"]))
    with torch.no_grad():
        peft_model.base_model.model.model.norm.modules_to_save["other"].weight.add_(0.25)
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model.eval()


def peft_output(peft_model, names):
    peft_model.base_model.set_adapter(names)
    return output(peft_model, BATCH)


@pytest.mark.parametrize("names", [["default"], ["other"], ["default", "other"]], ids="+".join)
def test_two_adapters_from_peft_files_give_peft_outputs_and_gradients(tmp_path, names):
    peft_model = peft_two_adapters(tmp_path)
    model = llama()
    lowcost.load_adapter(model, tmp_path / "peft")
    lowcost.load_adapter(model, tmp_path / "peft" / "other", adapter_name="other")
    assert lowcost.active_adapters(model) == ["default"]
    lowcost.set_adapter(model, names)
    close(output(model.eval(), BATCH), peft_output(peft_model, names))
    peft_model.base_model.set_adapter(names)
    for m in (model, peft_model):
        m.train()
        m(**BATCH).loss.backward()
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in theirs.values())
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for name in names:
        for path, layer in lora_layers(model, name).items():
            factors, peft_layer = layer.factors(name), peft_modules[path]
            close(factors.lora_A.grad, peft_layer.lora_A[name].weight.grad)
            close(factors.lora_B.grad, peft_layer.lora_B[name].weight.grad)


def test_two_adapters_saved_by_lowcost_load_in_peft(tmp_path):
    peft_model = peft_two_adapters(tmp_path)
    model = llama()
    lowcost.load_adapter(model, tmp_path / "peft")
    lowcost.load_adapter(model, tmp_path / "peft" / "other", adapter_name="other")
    lowcost.save_adapter(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").is_file()
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    again = _quiet(PeftModel.from_pretrained, llama(), str(tmp_path / "ours"))
    _quiet(again.load_adapter, str(tmp_path / "ours" / "other"), adapter_name="other")
    for names in (["default"], ["other"], ["default", "other"]):
        close(peft_output(again.eval(), names), peft_output(peft_model, names))


def test_add_set_delete_and_merge_choice(tmp_path):
    peft_model = peft_two_adapters(tmp_path)
    model = llama()
    lowcost.load_adapter(model, tmp_path / "peft")
    report = lowcost.add_adapter(model, "other", lowcost.LoRAConfig(r=2, alpha=3, targets=["v_proj", "down_proj"],
                                                                      use_rslora=True, modules_to_save=["model.norm"]))
    assert report.adapter == "other" and sorted(report.names)[0] == "model.layers.0.mlp.down_proj"
    assert not any(p.requires_grad for p in lora_layers(model)["model.layers.0.mlp.down_proj"].parameters())
    lowcost.load_adapter(model, tmp_path / "peft" / "other", adapter_name="other")   # values into the existing one
    merged, drift = lowcost.merge(model, adapters="other", inplace=False)
    assert drift.adapters == ["other"] and lowcost.active_adapters(model) == ["default"]
    peft_merged = copy.deepcopy(peft_model)
    peft_merged.base_model.set_adapter("other")
    close(output(merged.eval(), BATCH), output(peft_merged.merge_and_unload(adapter_names=["other"]), BATCH))
    lowcost.delete_adapter(model, "default")
    assert lowcost.active_adapters(model) == ["other"]
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear          # held only "default"
    close(output(model.eval(), BATCH), peft_output(peft_model, ["other"]))
    with pytest.raises(ValueError, match="only adapter; use lowcost.unapply"):
        lowcost.delete_adapter(model, "other")


def test_adapter_roles_and_names_are_checked():
    model = llama()
    before = snapshot(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"], modules_to_save=["model.norm"]))
    lowcost.add_adapter(model, "b", lowcost.LoRAConfig(targets=["q_proj"], modules_to_save=["model.norm"]))
    for name, config, message in [
        ("c", lowcost.LoRAConfig(targets=["norm"]), "not an nn.Linear"),
        ("d", lowcost.LoRAConfig(targets=["v_proj"], modules_to_save=["q_proj"]), "one role per module"),
        ("default", lowcost.LoRAConfig(targets=["v_proj"]), "already has an adapter named 'default'"),
        ("x.y", lowcost.LoRAConfig(targets=["v_proj"]), "without '.'"),
    ]:
        types = [(n, type(m)) for n, m in model.named_modules()]
        with pytest.raises(ValueError, match=message):
            lowcost.add_adapter(model, name, config)
        assert [(n, type(m)) for n, m in model.named_modules()] == types
    with pytest.raises(ValueError, match=r"each train their own copy of 'model.norm'"):
        lowcost.set_adapter(model, ["default", "b"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        lowcost.set_adapter(model, "nope")
    lowcost.set_adapter(model, "b")
    lowcost.delete_adapter(model, "default")
    lowcost.unapply(model)
    assert_unchanged(model, before)
