"""Where a model keeps its token tables: the input embedding, the output head, whether they are tied, and
how a token id reads as text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

_WORD_START = ("Ġ", "▁")


@dataclass
class Tables:
    """The input embedding weight ``(V, H)``, the output weight ``(V, H)`` (None without a head) and names."""
    input: nn.Parameter
    input_name: str
    output: Optional[nn.Parameter]
    output_name: Optional[str]
    output_bias: Optional[nn.Parameter]

    @property
    def tied(self) -> bool:
        return self.output is not None and self.output.data_ptr() == self.input.data_ptr()


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    for name, candidate in model.named_parameters(remove_duplicate=False):
        if candidate is param:
            return name
    return "?"


def tables(model: nn.Module) -> Tables:
    """Input/output token tables of an HF-style model (``get_input_embeddings``/``get_output_embeddings``)."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no input token embedding (get_input_embeddings())")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    out_w = getattr(head, "weight", None) if head is not None else None
    if out_w is not None and out_w.shape[-1] != embedding.weight.shape[-1]:
        out_w = None
    bias = getattr(head, "bias", None) if out_w is not None else None
    return Tables(embedding.weight, _param_name(model, embedding.weight), out_w,
                  _param_name(model, out_w) if out_w is not None else None,
                  bias if isinstance(bias, nn.Parameter) else None)


def word_start_marker(tokenizer) -> Optional[str]:
    """"Ġ" (byte-level BPE) or "▁" (SentencePiece) when words carry their leading space, else None."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" hello world", add_special_tokens=False))
    for marker in _WORD_START:
        if any(piece.startswith(marker) for piece in pieces):
            return marker
    return None


def token_surface(token: str, marker: Optional[str]) -> tuple[str, bool]:
    """(text, starts_a_word) for a vocabulary entry: "Ġhello" → ("hello", True), "##ing" → ("ing", False)."""
    if token.startswith("##"):
        return token[2:], False
    if marker is not None:
        if token.startswith(marker):
            return token[len(marker):], True
        return token, False
    return token, True
