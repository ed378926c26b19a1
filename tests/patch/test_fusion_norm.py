"""lowcost.apply(fused=("norm",)): RMSNorm (Llama) and LayerNorm (GPT-2) blocks keep their input instead of the
normed tensor. The saved bytes fall by exactly one (tokens × hidden) tensor per fused norm whose input was
saved anyway; the loss and every adapter gradient equal the unfused model's (bit for bit where the norm's
backward is the same kernel); modules that are not a known norm are refused with the reason; unapply puts the
original modules back. Under autocast bf16 the saved bytes fall by one bf16 copy per LoRA consumer of each fused
norm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowcost
import lowcost.ops.autocast
from lowcost.nn.fused_layer_norm import FusedLayerNorm
from lowcost.nn.fused_rms_norm import FusedRMSNorm
from lowcost.patch import lora_layers
from tiny_models import _ids, gpt2, llama, randomize_adapters

LORA = dict(r=4, alpha=8, dropout=0.1)


def _saved_bytes_and_grads(model, fused, autocast=False):
    """(distinct non-parameter storage bytes autograd saved, loss, adapter gradients) of one training step
    (forward under ``torch.autocast("cpu", bfloat16)`` with ``autocast``)."""
    lowcost.apply(model, lora=lowcost.LoRAConfig(**LORA), fused=fused)
    randomize_adapters(lora_layers(model))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = _ids()
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return sum(storages.values()), loss.detach(), grads


@pytest.mark.parametrize("name, build, norm_type, bitwise", [("llama", llama, FusedRMSNorm, False),
                                                            ("gpt2", gpt2, FusedLayerNorm, True)])
def test_norm_fusion_saves_one_normed_tensor_per_norm_and_changes_no_result(name, build, norm_type, bitwise):
    model = build()
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(model, fused=None)
    fused_model = build()
    report = lowcost.apply(fused_model, lora=lowcost.LoRAConfig(**LORA), fused=("norm",))
    lowcost.unapply(fused_model)
    fused_bytes, fused_loss, fused_grads = _saved_bytes_and_grads(fused_model, fused=("norm",))
    assert len(report.fusion.taken) == 2 * layers and not report.fusion.refused, str(report.fusion)
    # two norms per block. Block 0's first norm reads the frozen embedding's output, which needs no gradient:
    # that norm saves nothing, its output is left untagged, and its consumers keep it as before
    assert plain_bytes - fused_bytes == (2 * layers - 1) * _ids().numel() * hidden * 4
    assert plain_grads.keys() == fused_grads.keys()
    if bitwise:    # the same LayerNorm kernel forward and backward: nothing may differ
        assert torch.equal(plain_loss, fused_loss)
        assert all(torch.equal(plain_grads[k], fused_grads[k]) for k in plain_grads)
    else:          # the RMSNorm backward is ours (fp32 math) instead of autograd's: rounding only
        assert torch.allclose(plain_loss, fused_loss, rtol=1e-6, atol=0)
        for key, grad in plain_grads.items():
            assert torch.allclose(fused_grads[key], grad, rtol=1e-5, atol=1e-6 * grad.abs().max()), key


# Under autocast bf16 every lowcost LoRA op casts its fp32 input to bf16 itself, so q, k and v each make (and,
# unfused, save) their own bf16 copy of the normed tensor: per tagged norm the fusion saves one bf16
# (tokens × hidden) copy per LoRA consumer. Llama: input_layernorm feeds q/k/v (3), post_attention_layernorm
# gate/up (2); GPT-2: ln_1 feeds the packed c_attn (1), ln_2 c_fc (1). Block 0's first norm is untagged (its
# input needs no gradient), so with L layers: Llama 3·(L − 1) + 2·L copies (7 for L = 2), GPT-2 2·L − 1 (3).
CONSUMERS_PER_NORM = {"llama": (3, 2), "gpt2": (1, 1)}


@pytest.mark.parametrize("name, build", [("llama", llama), ("gpt2", gpt2)])
def test_under_autocast_each_consumer_of_a_fused_norm_saves_no_bf16_copy(name, build, monkeypatch):
    config = build().config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    plain_bytes, plain_loss, plain_grads = _saved_bytes_and_grads(build(), fused=None, autocast=True)
    fused_bytes, fused_loss, fused_grads = _saved_bytes_and_grads(build(), fused=("norm",), autocast=True)
    first, second = CONSUMERS_PER_NORM[name]
    copies = first * (layers - 1) + second * layers
    assert plain_bytes - fused_bytes == copies * _ids().numel() * hidden * 2
    # the forward is bit-identical; the gradients as the fp32 test allows (Llama's RMSNorm backward is ours)
    assert torch.equal(plain_loss, fused_loss) and plain_grads.keys() == fused_grads.keys()
    for key, grad in plain_grads.items():
        assert torch.allclose(fused_grads[key], grad, rtol=1e-5, atol=1e-6 * grad.abs().max()), key
    # the cast copies' tags change what is kept, never a result: the same fused model without them is bitwise equal
    monkeypatch.setattr(lowcost.ops.autocast, "cast_input", lambda t, dtype: t.to(dtype))
    copy_bytes, copy_loss, copy_grads = _saved_bytes_and_grads(build(), fused=("norm",), autocast=True)
    assert copy_bytes - fused_bytes == copies * _ids().numel() * hidden * 2
    assert torch.equal(copy_loss, fused_loss)
    assert all(torch.equal(copy_grads[k], fused_grads[k]) for k in fused_grads)


class OffsetRMSNorm(nn.Module):
    """An RMSNorm-named module that adds a shift: neither known form, so it must be refused."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) + 0.1


def test_unknown_norms_are_refused_with_the_reason_and_unapply_restores_the_originals():
    model = llama()
    block = model.model.layers[0]
    block.input_layernorm = OffsetRMSNorm(model.config.hidden_size)
    originals = {name: m for name, m in model.named_modules() if name.endswith("layernorm")}
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), fused=("norm",))
    refused = {f.module: f.detail for f in report.fusion.refused}
    assert "neither RMSNorm form" in refused["model.layers.0.input_layernorm"]
    assert {f.module for f in report.fusion.taken} == set(originals) - {"model.layers.0.input_layernorm"}
    assert isinstance(model.model.layers[1].input_layernorm, FusedRMSNorm)
    assert model.model.layers[1].input_layernorm.weight is originals["model.layers.1.input_layernorm"].weight
    lowcost.unapply(model)
    assert all(model.get_submodule(name) is module for name, module in originals.items())


def test_layer_norm_over_two_dimensions_is_refused():
    from lowcost.patch.fuse_norm import build_norm_fusion
    fused, why = build_norm_fusion(nn.LayerNorm((4, 8)))
    assert fused is None and "not one dimension" in why
    fused, why = build_norm_fusion(nn.GroupNorm(2, 8))
    assert fused is None and "neither an RMSNorm nor an nn.LayerNorm" in why


def test_checkpoint_recompute_region_on_a_norm_refuses_it():
    model = llama()
    checkpoint = lowcost.CheckpointConfig(policy="selective", recompute=("input_layernorm",))
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4), checkpoint=checkpoint, fused=("norm",))
    refused = {f.module for f in report.fusion.refused if "recompute" in f.detail}
    assert refused == {f"model.layers.{i}.input_layernorm" for i in range(2)}
