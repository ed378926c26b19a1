"""Bad input to LoRAConfig / apply: each a clear error naming the module or pattern; the model unchanged."""
from __future__ import annotations

import pytest
import torch

import lowcost
from tiny_models import assert_unchanged, encoder, llama, snapshot


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "r must be an int >= 1, got 0"), (dict(r=-2), "r must be an int >= 1"),
    (dict(r=2.5), "r must be an int >= 1"), (dict(r=True), "r must be an int >= 1"),
    (dict(alpha=0), "alpha must be a finite number > 0, got 0"), (dict(alpha=-1.0), "alpha must be"),
    (dict(alpha=float("nan")), "alpha must be"), (dict(dropout=1.0), "dropout must be a probability"),
    (dict(targets=[]), "targets must be a non-empty list"), (dict(targets=""), "targets must not be empty"),
    (dict(targets="(unclosed"), "targets '\\(unclosed' is not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be an int >= 1"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\] must be a finite number > 0"),
    (dict(adapter_dtype="int8"), "adapter_dtype must be a floating torch.dtype"),
    (dict(backend="tpu"), "backend must be one of"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lowcost.LoRAConfig(**kwargs)


def test_config_is_frozen_and_normalised():
    config = lowcost.LoRAConfig(targets=["q_proj"], modules_to_save="lm_head", adapter_dtype="bfloat16")
    assert config.targets == ("q_proj",) and config.modules_to_save == ("lm_head",)
    assert config.adapter_dtype is torch.bfloat16
    with pytest.raises(Exception):
        config.r = 3


@pytest.mark.parametrize("config,exc,message", [
    (dict(targets=["nonexistent_proj", "other_proj"]), ValueError, r"targets \['nonexistent_proj', 'other_proj'\] "
                                                                   "match no module"),
    (dict(targets=r"model\.layers\.7\..*"), ValueError, r"target pattern 'model\\\\.layers.*' matches no"),
    (dict(targets=["norm"]), ValueError, r"target 'norm' matches \['model.norm'\] \(LlamaRMSNorm\), which is not an "
                                         "nn.Linear, Conv1D or nn.Embedding"),
    (dict(targets=["q_proj"], exclude=["q_proj"]), ValueError, "every module matched by targets"),
    (dict(modules_to_save=["no_such_norm"]), ValueError, "modules_to_save entry 'no_such_norm' matches no"),
])
def test_bad_targets_change_nothing(config, exc, message):
    model = llama()
    before = snapshot(model)
    with pytest.raises(exc, match=message):
        lowcost.apply(model, lora=lowcost.LoRAConfig(**config))
    assert_unchanged(model, before)


def test_only_unadaptable_matches_is_an_error():
    model = encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match="out_proj: nn.MultiheadAttention reads out_proj.weight directly"):
        lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["out_proj"]))
    assert_unchanged(model, before)


def test_applying_twice_is_an_error():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="already patched by lowcost; call lowcost.unapply"):
        lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["v_proj"]))
    assert types == [type(m) for m in model.modules()]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="module 'layers.0.self_attn.q_proj' is already a LoRALinear"):
        lowcost.apply(model.model, lora=lowcost.LoRAConfig(targets=["v_proj"]))


def test_failure_during_swap_rolls_back(monkeypatch):
    import lowcost.patch.swap as swap
    model = llama()
    before = snapshot(model)
    calls = {"n": 0}
    real = swap.set_module

    def flaky(root, name, module):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure mid-swap")
        real(root, name, module)

    monkeypatch.setattr(swap, "set_module", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        lowcost.apply(model, lora=lowcost.LoRAConfig())
    monkeypatch.setattr(swap, "set_module", real)
    assert_unchanged(model, before)


def test_other_misuse():
    model = llama()
    with pytest.raises(TypeError, match="checkpoint must be a lowcost.CheckpointConfig"):
        lowcost.apply(model, lora=lowcost.LoRAConfig(), checkpoint=object())
    with pytest.raises(ValueError, match="needs lora=lowcost.LoRAConfig"):
        lowcost.apply(model)
    with pytest.raises(TypeError, match="lora must be a lowcost.LoRAConfig"):
        lowcost.apply(model, lora={"r": 4})
    for call in (lowcost.unapply, lowcost.merge, lambda m: lowcost.save_adapter(m, "/tmp/x")):
        with pytest.raises(RuntimeError, match="not patched by lowcost"):
            call(model)
