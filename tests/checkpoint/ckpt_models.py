"""Tiny models and comparison helpers for the checkpoint tests (HF models built from configs, offline)."""
import pytest
import torch
from torch import nn


def build_llama(peft=True, lowcost_lora=False, layers=4, dropout=0.1, seed=0):
    """A tiny LlamaForCausalLM with LoRA on every linear (PEFT, or lowcost.LoRALinear swapped in)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    if lowcost_lora:
        swap_lowcost_lora(model, dropout)
    elif peft:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so every gradient path carries signal
            nn.init.normal_(p, std=0.1)
    return model.train()


def swap_lowcost_lora(model, dropout):
    """Replaces every nn.Linear inside the blocks by lowcost.LoRALinear (same base parameters)."""
    from lowcost import LoRALinear
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear.from_linear(child, r=4, alpha=8, dropout=dropout))


def llama_grads(model, ids, seed=5):
    """Loss and the gradients of the trainable parameters for one step with a fixed RNG seed."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(reference: dict, other: dict, what=""):
    assert reference.keys() == other.keys()
    for key in reference:
        assert torch.equal(reference[key], other[key]), f"{what}: gradient of {key} differs " \
            f"(max |diff| {(reference[key] - other[key]).abs().max().item():.3e})"
