"""lowcost.apply(fused=...): loss and every adapter gradient equal PEFT's on tiny Llama, Qwen2, Gemma (GeGLU,
tied head), Gemma-2 (final-logit soft-capping) and Phi-3 (packed gate_up), with and without each checkpoint
policy; the report names every fusion taken and refused; unapply restores; adapter files are unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

import lowcost
from lowcost.nn.fused_rms_norm import FusedRMSNorm
from lowcost.nn.lora_gated_mlp import LoRAGatedMLP
from lowcost.patch import lora_layers
from lowcost.patch.fuse import STATE_ATTR
from peft_cases import peft_twin, rel_err
from tiny_models import VOCAB, _ids, assert_unchanged, gpt2, llama, qwen2, randomize_adapters, snapshot

TOL = 1e-5


def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=3.0, attn_implementation="eager"))


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


MODELS = {"llama": llama, "qwen2": qwen2, "gemma": gemma, "gemma2": gemma2, "phi3": phi3}
POLICIES = [None, "full", "selective", "offload"]


def labels_with_ignored(ids):
    labels = ids.clone()
    labels[0, :3] = -100
    return labels


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_model_matches_peft(name, policy):
    model = MODELS[name]()
    original = copy.deepcopy(model)
    checkpoint = lowcost.CheckpointConfig(policy=policy) if policy else None
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), checkpoint=checkpoint)
    grouped = name != "phi3"                             # Phi-3 packs q/k/v into one qkv_proj: nothing to group
    assert report.fusion.kinds() == {"mlp", "norm", "loss"} | ({"qkv"} if grouped else set()), str(report.fusion)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp"), LoRAGatedMLP) for i in range(2))
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.input_layernorm"), FusedRMSNorm) for i in range(2))
    layers = lora_layers(model)
    randomize_adapters(layers)
    peft_model, modules = peft_twin(original, report, layers)
    ids = _ids()
    ours = model(input_ids=ids, labels=labels_with_ignored(ids))
    theirs = peft_model(input_ids=ids, labels=labels_with_ignored(ids))
    assert ours.logits is None
    ours.loss.backward()
    theirs.loss.backward()
    groups = model.__dict__[STATE_ATTR].groups
    assert len(groups) == (2 if grouped else 0)
    for group in groups:                                 # q/k/v really ran grouped (forward and any recompute)
        assert group.stats["grouped"] >= 1 and group.stats["fallback"] == 0, group.stats
        assert group.stats["handed"] == 2 * group.stats["grouped"], group.stats
    assert ours.loss.dtype == torch.float32
    assert abs(ours.loss.item() - theirs.loss.item()) <= TOL * abs(theirs.loss.item()), (ours.loss, theirs.loss)
    for layer_name, layer in layers.items():
        peft_layer = modules[f"base_model.model.{layer_name}"]
        for part in ("lora_A", "lora_B"):
            mine, ref = getattr(layer, part).grad, getattr(peft_layer, part)["default"].weight.grad
            assert rel_err(mine, ref) <= TOL, f"{layer_name}.{part}.grad: {rel_err(mine, ref):.2e}"


def test_report_names_taken_and_refused():
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    taken = {(f.kind, f.module) for f in report.fusion.taken}
    norms = {("norm", f"model.layers.{i}.{n}") for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    qkv = {("qkv", f"model.layers.{i}.self_attn") for i in range(2)}
    assert taken == {("mlp", "model.layers.0.mlp"), ("mlp", "model.layers.1.mlp"), ("loss", "")} | norms | qkv
    assert not report.fusion.refused
    text = str(report)
    assert "fused mlp   model.layers.0.mlp  (gate/up/down, activation silu)" in text
    assert "fused qkv   model.layers.1.self_attn  (q/k/v as one grouped op" in text
    assert "fused norm  model.layers.1.input_layernorm  (RMSNorm, llama form: LoRA ops keep its input and rstd)" in text


def test_unknown_and_partial_structures_are_refused_with_reasons():
    report = lowcost.apply(gpt2(), lora=lowcost.LoRAConfig(r=2, alpha=4), fused=("mlp", "loss"))
    refused = {f.kind: f.detail for f in report.fusion.refused}
    assert not report.fusion.taken
    assert "no gated MLP" in refused["mlp"] and "family 'gpt2'" in refused["loss"]
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4, targets=["q_proj", "gate_proj", "up_proj"]))
    refused = {(f.kind, f.module): f.detail for f in report.fusion.refused}
    assert "down_proj is a Linear, not a fused LoRALinear" in refused[("mlp", "model.layers.0.mlp")]
    assert "k_proj is a Linear, not a fused LoRALinear (no LoRA adapter on it)" in refused[
        ("qkv", "model.layers.0.self_attn")]
    assert report.fusion.kinds() == {"loss", "norm", "qkv"}        # gate/up of the unfused MLP run grouped
    assert {f.module for f in report.fusion.taken if f.kind == "qkv"} == {f"model.layers.{i}.mlp" for i in range(2)}


def test_recompute_region_inside_an_mlp_refuses_that_fusion():
    model = llama()
    checkpoint = lowcost.CheckpointConfig(policy="selective", recompute=("mlp.down_proj",))
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), checkpoint=checkpoint)
    assert {f.kind for f in report.fusion.refused if "recompute" in f.detail} == {"mlp"}


@pytest.mark.parametrize("fusions", [("mlp", "loss"), ("qkv",)])
def test_dropout_masks_equal_the_unfused_lowcost_model(fusions):
    """Same RNG state → the fused MLP and loss, or the grouped q/k/v and gate/up, draw the same seeds as the
    unfused LoRALinear layers."""
    results = []
    for fused in (fusions, None):
        model = llama()
        report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.3, targets="all-linear"),
                               fused=fused)
        taken = {f.kind for f in report.fusion.taken} if report.fusion is not None else set()
        assert taken == set(fused or ()), str(report.fusion)
        randomize_adapters(lora_layers(model))
        model.train()
        ids = _ids()
        torch.manual_seed(123)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_ref, grads_ref) = results
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= TOL, name


def test_lora_on_a_tied_lm_head_matches_peft():
    model = gemma()                            # tie_word_embeddings: lm_head.weight is the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = copy.deepcopy(model)
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets=["gate_proj", "up_proj", "down_proj",
                                                                                 "lm_head"]))
    assert report.fusion.kinds() == {"mlp", "norm", "loss"} and "lm_head" in report.names
    layers = lora_layers(model)
    randomize_adapters(layers)
    peft_model, modules = peft_twin(original, report, layers)
    ids = _ids()
    ours, theirs = model(input_ids=ids, labels=ids).loss, peft_model(input_ids=ids, labels=ids).loss
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= TOL * abs(theirs.item())
    head = modules["base_model.model.lm_head"]
    assert rel_err(model.lm_head.lora_B.grad, head.lora_B["default"].weight.grad) <= TOL
    assert rel_err(model.lm_head.lora_A.grad, head.lora_A["default"].weight.grad) <= TOL


def test_return_logits_and_no_labels_give_the_unfused_outputs():
    model = gemma2()
    reference = copy.deepcopy(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    ids = _ids()
    plain = reference(input_ids=ids, labels=ids)
    asked = model(input_ids=ids, labels=ids, return_logits=True)
    torch.testing.assert_close(asked.logits, plain.logits)      # B = 0: adapters are a no-op
    torch.testing.assert_close(model(input_ids=ids).logits, plain.logits)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain.loss)


def test_num_items_in_batch_and_shift_labels():
    model = qwen2()
    reference = copy.deepcopy(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    ids = _ids()
    for kwargs in ({"num_items_in_batch": torch.tensor(5)}, {"shift_labels": labels_with_ignored(ids)}):
        torch.testing.assert_close(model(input_ids=ids, labels=ids, **kwargs).loss,
                                   reference(input_ids=ids, labels=ids, **kwargs).loss)


def test_unapply_restores_everything_and_adapter_files_are_unchanged(tmp_path):
    model = phi3()
    before = snapshot(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=None)
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(model, tmp_path / "unfused")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lowcost.unapply(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    assert set(model.state_dict()) == set(state)
    lowcost.load_adapter(model, tmp_path / "unfused")
    lowcost.save_adapter(model, tmp_path / "fused")
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unfused", "fused"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lowcost.unapply(model)
    assert "forward" not in model.__dict__
    assert_unchanged(model, before)


def test_merge_runs_the_original_modules():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    randomize_adapters(lora_layers(model))
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged, drift = lowcost.merge(model)
    assert not any(isinstance(m, LoRAGatedMLP) for m in merged.modules()) and "forward" not in merged.__dict__
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_bad_fused_argument():
    with pytest.raises(ValueError, match="fused must be a subset of"):
        lowcost.apply(llama(), lora=lowcost.LoRAConfig(), fused=("mlp", "attention"))


def test_trainable_base_weight_runs_the_original_forward():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4))
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight.requires_grad_(True)        # e.g. a warm-start schedule training a new block whole
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert mlp.gate_proj.weight.grad is not None and mlp.up_proj.lora_A.grad is not None


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_disabled_and_several_active_adapters_match_the_unfused_model():
    """disable_adapter (no adapter runs) and two active adapters take the original forward: same as unfused."""
    models = []
    for fused in (("mlp", "loss"), None):
        model = llama()
        lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4, targets=["gate_proj", "up_proj", "down_proj",
                                                                            "lm_head"]), fused=fused)
        lowcost.add_adapter(model, "second", lowcost.LoRAConfig(r=2, alpha=4, targets=["gate_proj", "up_proj",
                                                                                      "down_proj", "lm_head"]))
        torch.manual_seed(5)
        for module in model.modules():
            if isinstance(module, lowcost.LoRALinear):
                for name in module.adapter_names:
                    torch.nn.init.normal_(module.factors(name).lora_B, std=0.1)
        models.append(model)
    ids = _ids()
    with lowcost.disable_adapter(models[0]), lowcost.disable_adapter(models[1]):
        with torch.no_grad():
            torch.testing.assert_close(models[0](input_ids=ids, labels=ids).loss, models[1](input_ids=ids, labels=ids).loss)
    for model in models:
        lowcost.set_adapter(model, ["default", "second"])
    (loss, grads), (loss_ref, grads_ref) = (_loss_and_grads(m, ids) for m in models)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= TOL, name
