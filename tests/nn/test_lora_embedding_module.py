"""lowcost.LoRAEmbedding: shares the table Parameter, PEFT's layout and init, equals PEFT's lora.Embedding in
output and gradients, and refuses embeddings it cannot wrap."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowcost


def test_same_table_peft_init_identity_at_start():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=1)
    layer = lowcost.LoRAEmbedding(emb, r=4, alpha=8)
    assert layer.weight is emb.weight and layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (6, 4)
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    assert set(layer.state_dict()) == {"weight", "lora_A", "lora_B"}
    ids = torch.tensor([[1, 2, 19], [0, 1, 5]])
    torch.testing.assert_close(layer(ids), emb(ids))


@pytest.mark.parametrize("rslora", [False, True])
def test_output_and_gradients_equal_peft(rslora):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8, padding_idx=2), nn.Linear(8, 3))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=6, target_modules=["0"],
                                                                  use_rslora=rslora))
    peft_layer = peft_model.base_model.model[0]
    layer = lowcost.LoRAEmbedding(model[0], r=4, alpha=6, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_A.normal_()
        peft_layer.lora_embedding_A["default"].copy_(layer.lora_A)
        peft_layer.lora_embedding_B["default"].copy_(layer.lora_B)
    model[0] = layer
    ids = torch.tensor([[2, 5, 5, 29], [0, 2, 7, 7]])
    ours, theirs = model(ids), peft_model(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_embedding_A["default"].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_embedding_B["default"].grad, rtol=1e-5, atol=1e-6)
    assert layer.lora_A.grad[:, 2].abs().sum() == 0                          # padding_idx gets no gradient


class Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2


@pytest.mark.parametrize("module,message", [
    (nn.Embedding(5, 3, max_norm=1.0), "max_norm"), (nn.Embedding(5, 3, sparse=True), "sparse"),
    (Scaled(5, 3), "Scaled overrides nn.Embedding.forward"), (nn.Linear(3, 3), "Linear"),
])
def test_refuses_what_it_cannot_wrap(module, message):
    with pytest.raises(TypeError, match=message):
        lowcost.LoRAEmbedding(module, r=2, alpha=2)
