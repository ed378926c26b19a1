"""Tiny models built from configs (no hub access) for the patch and api tests.

Every case is fp32 with dropout 0, so lowcost and PEFT can be compared exactly. ``CASES[name]`` gives
(build() → model, batch(model) → kwargs, loss(model, batch) → scalar).
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ = 64, 8


def _ids(seed=0, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))


class Encoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` blocks (batch_first, relu: the eval fast path applies) and a head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def mlp():
    torch.manual_seed(0)
    return MLP()


def encoder():
    torch.manual_seed(0)
    return Encoder()


def _lm_batch(model, seed=0):
    ids = _ids(seed)
    return {"input_ids": ids, "labels": ids}


def _cls_batch(model, seed=0):
    return {"input_ids": _ids(seed), "labels": torch.tensor([0, 2])}


def _dense_batch(width):
    def batch(model, seed=0):
        gen = torch.Generator().manual_seed(seed)
        shape = (2, SEQ, width) if width == 32 else (6, width)
        return {"x": torch.randn(*shape, generator=gen)}
    return batch


def hf_loss(model, batch):
    return model(**batch).loss


def dense_loss(model, batch):
    return (model(batch["x"]) ** 2).mean()


CASES = {
    "llama": (llama, _lm_batch, hf_loss),
    "qwen2": (qwen2, _lm_batch, hf_loss),
    "gpt2": (gpt2, _lm_batch, hf_loss),
    "bert": (bert, _cls_batch, hf_loss),
    "mlp": (mlp, _dense_batch(16), dense_loss),
    "encoder": (encoder, _dense_batch(32), dense_loss),
}


def output(model, batch):
    """Logits (HF) or the plain output, for comparisons."""
    if "x" in batch:
        return model(batch["x"])
    return model(input_ids=batch["input_ids"]).logits


def randomize_adapters(layers: dict, seed: int = 1) -> None:
    """Non-zero A and B (B is zero at init, which would hide every gradient path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: state_dict values, module types, requires_grad flags."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "types": [(n, type(m)) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "ids": [(n, id(m)) for n, m in model.named_modules()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"] and after["ids"] == before["ids"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert "_lowcost_patch" not in model.__dict__


def lora_llama_step(backend: str, fused, dropout: float):
    """One training step of ``llama()`` under ``lowcost.apply`` (LoRA r=4 on every linear, ``backend``, the
    ``fused`` tuple or None): (apply's report, the model, the loss, {trainable name: grad}). Adapters randomized
    and the dropout generator seeded the same way on every call, so fused and unfused runs compare exactly."""
    import lowcost
    from lowcost.patch import lora_layers
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=dropout, targets="all-linear",
                                                         backend=backend), fused=fused)
    randomize_adapters(lora_layers(model))
    model.train()
    torch.manual_seed(7)
    ids = _ids(batch=1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return report, model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
