"""Target selection (names, regex, all-linear, exclude, rank/alpha patterns, rsLoRA, modules_to_save), the
fallback path, and the ``nn.TransformerEncoderLayer`` eval fast path."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowcost
from lowcost.models.families import block_list_path, detect_family, find_blocks, module_roles, output_head
from lowcost.patch import lora_layers
from tiny_models import snapshot, bert, encoder, gpt2, llama, mlp, qwen2, randomize_adapters


@pytest.mark.parametrize("build,family,path,head", [
    (llama, "llama", "model.layers", "lm_head"), (qwen2, "qwen2", "model.layers", "lm_head"),
    (gpt2, "gpt2", "transformer.h", "lm_head"), (bert, "bert", "bert.encoder.layer", "classifier"),
    (encoder, "generic", "encoder.layers", "head"), (mlp, "generic", None, "head"),
])
def test_family_table(build, family, path, head):
    model = build()
    assert detect_family(model).name == family
    assert block_list_path(model) == path and output_head(model) == head
    assert len(find_blocks(model)) == (0 if path is None else 2)


@pytest.mark.parametrize("family,roles", [
    ("mistral", {"q", "k", "v", "o", "gate", "up", "down"}), ("gemma", {"q", "k", "v", "o", "gate", "up", "down"}),
    ("phi", {"q", "k", "v", "o", "fc1", "fc2"}), ("phi3", {"qkv", "o", "gate_up", "down"}),
])
def test_other_families_from_configs(family, roles):
    import transformers
    prefix = {"mistral": "Mistral", "gemma": "Gemma", "phi": "Phi", "phi3": "Phi3"}[family]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    assert detect_family(model).name == family and len(find_blocks(model)) == 2
    assert set(module_roles(model).values()) == roles
    ids = torch.randint(0, 64, (1, 6))
    plain = model(input_ids=ids).logits
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    assert report.excluded_head == "lm_head" and set(report.paths()) == {"fused"}
    assert set(report.names) == set(module_roles(model))           # all-linear = exactly the role table
    torch.testing.assert_close(model(input_ids=ids).logits, plain)  # B = 0 at init: identity


def test_roles():
    roles = module_roles(llama())
    assert roles["model.layers.1.self_attn.q_proj"] == "q" and roles["model.layers.0.mlp.down_proj"] == "down"
    roles = module_roles(gpt2())
    assert roles["transformer.h.0.attn.c_attn"] == "qkv" and roles["transformer.h.0.mlp.c_proj"] == "down"
    assert module_roles(bert())["bert.encoder.layer.0.attention.output.dense"] == "o"


def test_name_list_regex_and_exclude():
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj", "v_proj"], exclude=["layers.1.self_attn.v_proj"]))
    assert report.names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.1.self_attn.q_proj"]
    report = lowcost.apply(llama(), lora=lowcost.LoRAConfig(targets=r".*\.mlp\.(up|down)_proj",
                                                            exclude=r"model\.layers\.0\..*"))
    assert report.names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    report = lowcost.apply(llama(), lora=lowcost.LoRAConfig(targets=["lm_head"]))   # named explicitly: allowed
    assert report.names == ["lm_head"]


def test_rank_alpha_patterns_and_rslora():
    config = lowcost.LoRAConfig(r=8, alpha=16, targets=["q_proj", "o_proj"], rank_pattern={"q_proj": 2},
                                alpha_pattern={r"layers\.1\.self_attn\.o_proj": 4}, use_rslora=True)
    model = llama()
    report = lowcost.apply(model, lora=config)
    by_name = {m.name: m for m in report.adapted}
    assert by_name["model.layers.0.self_attn.q_proj"].r == 2
    assert by_name["model.layers.0.self_attn.o_proj"].r == 8
    assert by_name["model.layers.1.self_attn.o_proj"].alpha == 4
    assert by_name["model.layers.1.self_attn.o_proj"].scaling == pytest.approx(4 / math.sqrt(8))
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A.shape == (2, 32)


def test_modules_to_save_train_a_copy():
    model = llama()
    norm = model.model.norm
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"], modules_to_save=["model.norm"]))
    assert report.modules_to_save == ["model.norm"] and model.model.norm is not norm
    assert model.model.norm.weight.requires_grad and not norm.weight.requires_grad
    extra = model.model.norm.weight.numel()
    assert report.trainable_params == 2 * (8 * 32 + 32 * 8) + extra
    lowcost.unapply(model)
    assert model.model.norm is norm


def test_adapter_dtype_fp32_on_bf16_base():
    model = llama().to(torch.bfloat16)
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"], adapter_dtype="float32"))
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: the fused op cannot replace it, the fallback wraps it."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_fallback_for_linear_subclass():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(3, 8)
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=2, targets=["0", "2"]))
    assert [m.path for m in report.adapted] == ["fallback", "fused"]
    assert "overrides forward" in report.adapted[0].reason and "fallback" in str(report)
    layers = lora_layers(model)
    randomize_adapters(layers)
    a, b = layers["0"].lora_A, layers["0"].lora_B
    inner = model[0].base_layer
    h = torch.relu(inner(x) + x @ a.t() @ b.t())
    expected = model[2].weight @ h.t()
    expected = expected.t() + model[2].bias + h @ layers["2"].lora_A.t() @ layers["2"].lora_B.t()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    before = snapshot(model)
    with pytest.raises(TypeError, match="cannot fold the adapter of '0' .ScaledLinear overrides forward"):
        lowcost.merge(model, probe=x)
    assert [(n, type(m)) for n, m in model.named_modules()] == before["types"]
    assert all(torch.equal(v, before["state"][k]) for k, v in model.state_dict().items())


def test_encoder_eval_fast_path_is_disabled_for_patched_layers():
    model = encoder()
    plain = model(torch.randn(2, 8, 32))
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets=["linear1", "linear2"]))
    assert any("fast path disabled" in note for note in report.notes)
    randomize_adapters(lora_layers(model))
    x = torch.randn(2, 8, 32)
    model.eval()
    slow = model(x)                              # grad enabled: the fast path is never taken
    with torch.no_grad():
        fast_candidate = model(x)               # eval + no_grad: would take the fast path if it were on
    torch.testing.assert_close(fast_candidate, slow, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(slow, plain, atol=1e-3)
    for layer in model.encoder.layers:           # control: with the switch back on, eval bypasses LoRA
        layer.activation_relu_or_gelu = 1
    with torch.no_grad():
        assert not torch.allclose(model(x), slow, atol=1e-3)
    lowcost.unapply(model)
    assert all(layer.activation_relu_or_gelu == 1 for layer in model.encoder.layers)
