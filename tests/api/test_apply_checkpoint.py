"""lowcost.apply(checkpoint=...) and the callable lowcost.checkpoint: LoRA and checkpointing together."""
from __future__ import annotations

import torch

import lowcost
from tiny_models import _ids, llama


def loss_and_adapter_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_plus_full_checkpointing_matches_lora_alone_bit_for_bit():
    torch.manual_seed(0)
    model, ids = llama(), _ids()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    for module in model.modules():
        if isinstance(module, lowcost.LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.02)
    state_keys = set(model.state_dict())
    loss, grads = loss_and_adapter_grads(model, ids)
    checkpoint_report = lowcost.apply(model, checkpoint=lowcost.CheckpointConfig(policy="full"))
    assert set(model.state_dict()) == state_keys
    assert len(checkpoint_report.blocks) == model.config.num_hidden_layers
    loss_ckpt, grads_ckpt = loss_and_adapter_grads(model, ids)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and all(torch.equal(grads[k], grads_ckpt[k]) for k in grads)
    lowcost.unapply(model)                      # removes both the checkpointing and the adapters
    assert not any(isinstance(m, lowcost.LoRALinear) for m in model.modules())
    assert report.trainable_params > 0


def test_apply_lora_and_checkpoint_in_one_call_reports_both():
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8),
                           checkpoint=lowcost.CheckpointConfig(policy="selective"))
    assert report.checkpoint is not None and report.checkpoint.policy == "selective"
    lowcost.unapply(model)


def test_lowcost_checkpoint_is_callable_and_still_a_package():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    y = lowcost.checkpoint(layer, x)
    y.sum().backward()
    expected = torch.autograd.grad(layer(x).sum(), x)[0]
    assert torch.equal(x.grad, expected)
    assert lowcost.checkpoint.checkpoint is not None and lowcost.checkpoint.CheckpointConfig is lowcost.CheckpointConfig
