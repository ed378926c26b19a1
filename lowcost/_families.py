"""One table of model-family knowledge: which modules are q/k/v/o and gate/up/down, where the blocks are,
which linear is the output head.

Used by ``lowcost.patch`` (targets, the head that ``"all-linear"`` leaves out), by checkpointing
(``find_blocks``) and by ``warmstart.grow``. It is pure data plus lookups over ``nn.Module`` trees and imports
nothing from lowcost, so it sits below every layer (like ``_extension``): each layer may read it without
an import pointing upward. ``lowcost.models.families`` re-exports it. Role names are paths relative to one block, e.g. ``"self_attn.q_proj"``; a role may be
missing in a family (GPT-2 fuses q/k/v into ``attn.c_attn``, Phi-3 into ``self_attn.qkv_proj``).

Any ``nn.Module`` tree works: a model that matches no row gets the ``generic`` row, whose blocks are found
by shape (the largest ``nn.ModuleList`` of same-type children) and whose head is a top-level child with a
conventional name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

__all__ = ["Family", "FAMILIES", "GENERIC", "detect_family", "block_list_path", "find_blocks", "output_head",
           "module_roles"]

_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj"}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_LM_HEADS = ("lm_head", "score", "classifier", "qa_outputs")


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: short name ("llama", "gpt2", …).
        model_types: HF ``config.model_type`` values that select this row.
        blocks: path suffix of the block ``nn.ModuleList`` (``"layers"`` matches ``model.layers``).
        roles: role → block-relative module path (q, k, v, o, qkv, gate, up, gate_up, down, fc1, fc2).
        heads: paths from the root of output heads that ``"all-linear"`` leaves out.
    """
    name: str
    model_types: tuple[str, ...]
    blocks: Optional[str]
    roles: dict = field(default_factory=dict)
    heads: tuple[str, ...] = _LM_HEADS


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "layers", {**_LLAMA_ATTN, **_GATED_MLP}),
    Family("mistral", ("mistral", "mixtral"), "layers", {**_LLAMA_ATTN, **_GATED_MLP}),
    Family("qwen2", ("qwen2", "qwen3"), "layers", {**_LLAMA_ATTN, **_GATED_MLP}),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), "layers", {**_LLAMA_ATTN, **_GATED_MLP}),
    Family("phi", ("phi",), "layers", {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                                       "v": "self_attn.v_proj", "o": "self_attn.dense",
                                       "fc1": "mlp.fc1", "fc2": "mlp.fc2"}),
    Family("phi3", ("phi3",), "layers", {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                                         "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}),
    Family("gpt2", ("gpt2",), "h", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc",
                                     "down": "mlp.c_proj"}),
    Family("bert", ("bert", "roberta", "xlm-roberta"), "encoder.layer",
           {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
           heads=("cls.predictions.decoder", "lm_head.decoder", "classifier", "qa_outputs")),
)
GENERIC = Family("generic", (), None, {}, heads=("lm_head", "head", "classifier", "output_head", "fc_out"))


def detect_family(model: nn.Module) -> Family:
    """The table row for ``model``: by HF ``config.model_type``, else ``GENERIC``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def block_list_path(model: nn.Module) -> Optional[str]:
    """Path of the ``nn.ModuleList`` holding the repeated blocks (``"model.layers"``), or None."""
    family = detect_family(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if family.blocks is not None:
        hits = [name for name, _ in lists if name == family.blocks or name.endswith("." + family.blocks)]
        if hits:
            return min(hits, key=lambda n: n.count("."))
    uniform = [(name, m) for name, m in lists if len({type(child) for child in m}) == 1]
    if not uniform:
        return None
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return max(uniform, key=lambda item: (size(item[1]), -item[0].count(".")))[0]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (transformer layers) in order; [] when the model has none."""
    path = block_list_path(model)
    return list(model.get_submodule(path)) if path is not None else []


def output_head(model: nn.Module) -> Optional[str]:
    """Path of the output head that ``"all-linear"`` leaves out, or None.

    HF models say it themselves (``get_output_embeddings``); otherwise the family's head names are tried.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        for name, module in model.named_modules():
            if module is head:
                return name
    names = {name for name, _ in model.named_modules()}
    for name in detect_family(model).heads:
        if name in names:
            return name
    return None


def module_roles(model: nn.Module) -> dict[str, str]:
    """Full module path → role (``"model.layers.0.self_attn.q_proj"`` → ``"q"``) for the family's roles."""
    family, path = detect_family(model), block_list_path(model)
    if path is None or not family.roles:
        return {}
    names = {name for name, _ in model.named_modules()}
    roles = {}
    for index in range(len(model.get_submodule(path))):
        for role, rel in family.roles.items():
            full = f"{path}.{index}.{rel}"
            if full in names:
                roles[full] = role
    return roles
