"""Tiny llama GGUF files for the tests, written with the ``gguf`` package's writer.

A byte-level BPE tokenizer (the 256 byte symbols, three special tokens and five merges) in the GGUF tokenizer
fields, so transformers' own GGUF loader reads the files, tokenizer included; the model is tiny (hidden 256,
2 layers) with seeded random weights stored in the block types asked for. Q/K rows are written in llama.cpp's
interleaved order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowcost.quant.gguf_layout import gguf_names, llama_rows

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
ROLES = {"attn_q": "q4_0", "attn_k": "q4_1", "attn_v": "q8_0", "attn_output": "q4_1", "ffn_gate": "q4_k",
         "ffn_up": "q6_k", "ffn_down": "q4_0", "token_embd": "q8_0"}


MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]


def tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + \
        [m.replace(" ", "") for m in MERGES]


def _add_tokenizer(writer) -> None:
    vocab = tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)


def tiny_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokens()), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)


K_TYPES = {"q4_k": (144, (0, 2)), "q6_k": (210, (208,)), "q5_k": (176, (0, 2))}   # bytes per 256, f16 fields


def _random_k_blocks(kind: str, N: int, K: int, seed: int, scale: float = 2e-4) -> np.ndarray:
    """Random k-quant blocks (gguf has no quantizer for them) with small float16 scales."""
    type_size, fields = K_TYPES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(N * K // 256, type_size), dtype=np.uint8)
    for offset in fields:
        values = (rng.random(raw.shape[0]) * scale + scale / 10).astype(np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(N, -1)


def _encode(weight: np.ndarray, kind: str, seed: int):
    import gguf
    from gguf.quants import quantize
    gtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    if kind in K_TYPES:
        return _random_k_blocks(kind, *weight.shape, seed=seed), gtype
    return quantize(weight.astype(np.float32), gtype), gtype


def write_tiny_llama(path: Path, roles: dict = None, seed: int = 0) -> Path:
    """A tiny llama GGUF at ``path`` whose tensors use ``roles`` (GGUF role → block type)."""
    import gguf
    roles = {**ROLES, **(roles or {})}
    config = tiny_config()
    gen = torch.Generator().manual_seed(seed)
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        keys = list(LlamaForCausalLM(config).state_dict().keys())
    shapes = {}
    with torch.device("meta"):
        for k, v in LlamaForCausalLM(config).state_dict().items():
            shapes[k] = tuple(v.shape)
    names = {n: k for n, k in gguf_names(keys, "llama", LAYERS).items() if n != "output.weight"}  # tied head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    _add_tokenizer(writer)
    for i, (name, key) in enumerate(sorted(names.items())):
        shape = shapes[key]
        weight = (torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 0.1) +
                  (1.0 if len(shape) == 1 else 0.0)).numpy()
        if len(shape) == 1:
            writer.add_tensor(name, weight.astype(np.float32))
            continue
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = HEADS if "q_proj" in key else KV_HEADS
            weight = weight[llama_rows(shape[0], heads, to_gguf=True).numpy()]
        raw, gtype = _encode(weight, roles[name.split(".")[-2]], seed + i)
        writer.add_tensor(name, raw, raw_dtype=gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
