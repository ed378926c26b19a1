"""The "qkv" fusion: q/k/v (and gate/up of an MLP the "mlp" fusion did not take) run as one grouped op.

Loss and every adapter gradient equal PEFT's on tiny Llama and Qwen2 (GQA) with "qkv" alone and with "norm",
under no checkpointing, "selective" and "full"; dropout masks equal the unfused model's; a member called with
another tensor, after an in-place write, after an adapter change or twice falls back to its own op (never a
stale output); refusals name their reason; unapply restores; adapter files are unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

import lowcost
from lowcost.nn.grouped_projections import ProjectionGroup
from lowcost.patch import lora_layers
from lowcost.patch.fuse import STATE_ATTR
from lowcost.patch.fuse_qkv import plan_grouped_fusions
from peft_cases import peft_twin, rel_err
from tiny_models import _ids, assert_unchanged, llama, qwen2, randomize_adapters, snapshot

TOL = 1e-5
MODELS = {"llama": llama, "qwen2": qwen2}


def groups_of(model) -> list[ProjectionGroup]:
    return model.__dict__[STATE_ATTR].groups


@pytest.mark.parametrize("policy", [None, "selective", "full"])
@pytest.mark.parametrize("fused", [("qkv",), ("qkv", "norm")], ids=["qkv", "qkv+norm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_grouped_model_matches_peft(name, fused, policy):
    model = MODELS[name]()
    original = copy.deepcopy(model)
    checkpoint = lowcost.CheckpointConfig(policy=policy) if policy else None
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), checkpoint=checkpoint, fused=fused)
    taken = {f.module for f in report.fusion.taken if f.kind == "qkv"}
    assert taken == {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn", "mlp")}, str(report.fusion)
    layers = lora_layers(model)
    randomize_adapters(layers)
    peft_model, modules = peft_twin(original, report, layers)
    ids = _ids()
    ours = model(input_ids=ids, labels=ids).loss
    theirs = peft_model(input_ids=ids, labels=ids).loss
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= TOL * abs(theirs.item()), (ours, theirs)
    for layer_name, layer in layers.items():
        peft_layer = modules[f"base_model.model.{layer_name}"]
        for part in ("lora_A", "lora_B"):
            mine, ref = getattr(layer, part).grad, getattr(peft_layer, part)["default"].weight.grad
            assert rel_err(mine, ref) <= TOL, f"{layer_name}.{part}.grad: {rel_err(mine, ref):.2e}"
    for group in groups_of(model):
        assert group.stats["grouped"] >= 1 and group.stats["fallback"] == 0, group.stats


def _attention_layers(model):
    attn = model.model.layers[0].self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def _unfused(layer, x):
    return lowcost.LoRALinear.forward(layer, x)


@pytest.fixture
def grouped_llama():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), fused=("qkv",))
    randomize_adapters(lora_layers(model))
    return model


def test_members_hand_back_only_for_the_same_tensor(grouped_llama):
    q, k, v = _attention_layers(grouped_llama)
    group = groups_of(grouped_llama)[0]
    x, other = torch.randn(2, 5, q.in_features), torch.randn(2, 5, q.in_features)
    yq, yk, yv = q(x), k(x), v(x)
    assert group.stats == {"grouped": 1, "handed": 2, "fallback": 0}
    for layer, y in ((q, yq), (k, yk), (v, yv)):
        torch.testing.assert_close(y, _unfused(layer, x), rtol=0, atol=0)     # torch backend: bit-identical
    yq, yk, yv = q(x), k(other), v(x)                                         # k reads another tensor
    assert group.stats == {"grouped": 2, "handed": 3, "fallback": 1}
    torch.testing.assert_close(yk, _unfused(k, other), rtol=0, atol=0)
    assert torch.equal(k(x), _unfused(k, x)) and group.stats["fallback"] == 2  # a second call: its own op


def test_a_member_that_falls_back_uses_the_seed_its_leader_drew():
    """With dropout, a member that runs its own op takes the seed the grouped call drew for it: its mask and
    the RNG stream afterwards are the unfused model's (a second draw would shift every later mask)."""
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1), fused=("qkv",))
    randomize_adapters(lora_layers(model))
    model.train()
    q, k, v = _attention_layers(model)
    group = groups_of(model)[0]
    x, other = torch.randn(2, 5, q.in_features), torch.randn(2, 5, q.in_features)
    torch.manual_seed(7)
    grouped = (q(x), k(other), v(x))                                          # k reads another tensor
    after_grouped = torch.get_rng_state()
    assert group.stats == {"grouped": 1, "handed": 1, "fallback": 1}
    torch.manual_seed(7)
    unfused = (_unfused(q, x), _unfused(k, other), _unfused(v, x))
    assert torch.equal(torch.get_rng_state(), after_grouped)
    for y, y_unfused in zip(grouped, unfused):
        torch.testing.assert_close(y, y_unfused, rtol=0, atol=0)              # the same masks, bit for bit


def test_in_place_write_between_calls_falls_back(grouped_llama):
    q, k, v = _attention_layers(grouped_llama)
    group = groups_of(grouped_llama)[0]
    x = torch.randn(3, q.in_features)
    q(x)
    x.mul_(2.0)                                                               # x's version moves
    yk = k(x)
    assert group.stats["fallback"] == 1
    torch.testing.assert_close(yk, _unfused(k, x), rtol=0, atol=0)            # computed on the new values
    q(x)
    with torch.no_grad():
        v.lora_B.add_(1.0)                                                    # a parameter written in place
    yv = v(x)
    assert group.stats["fallback"] == 2
    torch.testing.assert_close(yv, _unfused(v, x), rtol=0, atol=0)


def test_adapter_changes_between_calls_fall_back(grouped_llama):
    q, k, v = _attention_layers(grouped_llama)
    group = groups_of(grouped_llama)[0]
    x = torch.randn(3, q.in_features)
    q(x)
    k.disabled = True                                                         # no adapter runs on k now
    torch.testing.assert_close(k(x), _unfused(k, x), rtol=0, atol=0)
    k.disabled = False
    q(x)
    v.eval()                                                                  # another training flag: other dropout
    torch.testing.assert_close(v(x), _unfused(v, x), rtol=0, atol=0)
    assert group.stats["fallback"] == 2
    with torch.no_grad():                                                     # grad mode differs from the group's
        yq = q(x)
    yk = k(x)
    assert yk.requires_grad and not yq.requires_grad and group.stats["fallback"] == 3


def test_a_deep_copy_never_reads_the_original_group(grouped_llama):
    """copy.deepcopy rebinds each layer's forward to the copied layer: it runs its own op or its own group."""
    clone = copy.deepcopy(grouped_llama)
    q, k, v = _attention_layers(clone)
    with torch.no_grad():
        for layer in (q, k, v):
            layer.lora_B.add_(0.5)                   # the copy's adapters differ from the original's
    x = torch.randn(3, q.in_features)
    _attention_layers(grouped_llama)[0](x)           # the original group has pending outputs for this x
    for layer in (k, v):
        torch.testing.assert_close(layer(x), _unfused(layer, x), rtol=0, atol=0)
    assert groups_of(grouped_llama)[0].stats["handed"] == 0


def test_report_refusals_name_the_reason():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=None)
    layers = model.model.layers
    for layer in (layers[0].self_attn.q_proj, layers[0].self_attn.k_proj, layers[0].self_attn.v_proj):
        layer.backend = "cuda"
    layers[1].self_attn.v_proj.backend = "torch"
    _, refused = plan_grouped_fusions(model, avoid=("mlp.up_proj",))
    reasons = dict(refused)
    assert "backend='cuda' cannot run here: the CUDA kernels need CUDA tensors" in reasons["model.layers.0.self_attn"]
    assert "different backends" in reasons["model.layers.1.self_attn"]
    assert "recompute='mlp.up_proj'" in reasons["model.layers.0.mlp"]
    report = lowcost.apply(qwen2(), lora=lowcost.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]),
                           fused=("qkv",))
    assert all("k_proj is a Linear, not a fused LoRALinear" in f.detail for f in report.fusion.refused
               if f.module.endswith("self_attn"))
    assert not report.fusion.taken


def test_mlp_fusion_keeps_gate_and_up_out_of_the_groups():
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=("mlp", "qkv"))
    assert {f.module for f in report.fusion.taken if f.kind == "qkv"} == {f"model.layers.{i}.self_attn"
                                                                         for i in range(2)}


def test_unapply_restores_everything_and_adapter_files_are_unchanged(tmp_path):
    model = llama()
    before = snapshot(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=None)
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(model, tmp_path / "unfused")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lowcost.unapply(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=("qkv",))
    assert set(model.state_dict()) == set(state)
    assert all("forward" in layer.__dict__ for group in groups_of(model) for layer in group.layers)
    lowcost.load_adapter(model, tmp_path / "unfused")
    lowcost.save_adapter(model, tmp_path / "fused")
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unfused", "fused"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    layers = list(lora_layers(model).values())
    lowcost.unapply(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert_unchanged(model, before)
