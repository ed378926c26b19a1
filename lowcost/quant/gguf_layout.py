"""How a GGUF file lays out a transformers model: tensor names and llama's q/k row order.

Names come from the ``gguf`` package's own table for the architecture (``gguf.get_tensor_name_map``:
``model.layers.0.self_attn.q_proj.weight`` ↔ ``blk.0.attn_q.weight``). llama.cpp's converter stores each
attention head's q (and k) rows with the two rotary halves interleaved (row 2j + t of a head is HF row
t·d + j, d = head_dim / 2); ``llama_rows`` gives that permutation in both directions. Only whole rows move,
so it applies to the rows of block-quantized bytes as well as to dense weights.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

GGUF_ARCHITECTURES = ("llama",)    # architectures whose layout (names, q/k order) is implemented here


def check_architecture(arch, what: str) -> None:
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{what} handles GGUF architectures {GGUF_ARCHITECTURES}, got {arch!r}")


def gguf_names(keys: Iterable[str], arch: str, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name → model key, for the model keys ``keys`` that the architecture's table names."""
    import gguf
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, n_blocks)
    out: dict[str, str] = {}
    for key in keys:
        name = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out.setdefault(name, key)
    return out


def llama_rows(n_rows: int, n_head: int, to_gguf: bool = False) -> torch.Tensor:
    """Row index between HF and GGUF order of a llama q/k weight: hf = gguf[index] (``to_gguf``: gguf = hf[index])."""
    half = n_rows // n_head // 2
    shape = (n_head, 2, half) if to_gguf else (n_head, half, 2)
    return torch.arange(n_rows).reshape(shape).transpose(1, 2).reshape(n_rows)


def row_order(key: str, config, n_rows: int, to_gguf: bool = False) -> Optional[torch.Tensor]:
    """The row permutation of a llama q_proj / k_proj weight (None for every other tensor)."""
    if key.endswith("q_proj.weight"):
        return llama_rows(n_rows, config.num_attention_heads, to_gguf)
    if key.endswith("k_proj.weight"):
        return llama_rows(n_rows, config.num_key_value_heads, to_gguf)
    return None
