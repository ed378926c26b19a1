"""Model shapes and the real CPU step the planner is checked against (shared by the plan tests)."""
from __future__ import annotations

import torch

# config dicts (transformers model_type + sizes), the batch and the sequence length of the checked step
SHAPES = {
    "tiny-llama": (dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128), 2, 16),
    "llama-shaped": (dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=1024), 2, 96),
    "qwen2-tied": (dict(model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
                   2, 48),
}


def config_of(shape: dict):
    from transformers import AutoConfig
    data = dict(shape)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def real_model(config, dtype=torch.float32, seed: int = 0):
    """The causal LM of ``config`` with real (random) weights on the CPU, as the planner builds it (sdpa)."""
    from transformers import AutoModelForCausalLM
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).train()
