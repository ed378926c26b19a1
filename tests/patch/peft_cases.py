"""The small models PEFT's own test suite adapts (tests/test_custom_models.py of huggingface/peft), rebuilt here
in our words, plus helpers to run PEFT and lowcost side by side on them.

Each builder seeds torch first, so two calls give the same weights. ``INPUTS[name](seed)`` gives an input
batch. All models are float32; their ``nn.Dropout`` only acts in train mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D
    return Conv1D(nf, nx)


class MLP(nn.Module):
    """lin0 (10→20) → ReLU → Dropout → lin1 (20→2) → LogSoftmax: PEFT's "Vanilla MLP"."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    """emb (100×5) → transformers Conv1D (5→1) → ReLU → flatten → lin0 (10→2) → LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = _conv1d(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, ids):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(ids))))))


class Block(nn.Module):
    def __init__(self, size: int = 10):
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(size, size)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class DeepMLP(nn.Module):
    """``layers.{i}.lin0`` / ``layers.{i}.lin1`` blocks and an ``out`` head: PEFT's multi-rank model."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(depth)])
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x.float())
        return self.out(x)


class Nested(nn.Module):
    """A top-level ``lin0`` and a ``block.lin0``: the two names PEFT's suffix matching confuses."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.block = Block()
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(self.block(self.lin0(x.float())))


class EmbLinear(nn.Module):
    """emb (50×8) → norm → proj (8→8): a regex ``emb|proj|norm`` meets an Embedding, a LayerNorm and a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        return self.proj(self.norm(self.emb(ids)))


class Conv2dNet(nn.Module):
    """conv2d (1→2 channels, 3×3) → flatten → lin0 (18→2): a module kind PEFT adapts and lowcost does not."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(1, 2, 3)
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(18, 2)

    def forward(self, x):
        return self.lin0(self.flat(self.conv2d(x.float())))


class MhaNet(nn.Module):
    """nn.MultiheadAttention (PEFT wraps the whole module) → lin0."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x = x.float()
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls()
    return build


BUILDERS = {"MLP": _seeded(MLP), "EmbConv1D": _seeded(EmbConv1D), "DeepMLP": _seeded(DeepMLP),
            "Nested": _seeded(Nested), "EmbLinear": _seeded(EmbLinear), "Conv2d": _seeded(Conv2dNet),
            "MHA": _seeded(MhaNet)}


def _dense(seed: int = 0):
    return torch.randn(9, 10, generator=torch.Generator().manual_seed(seed))


def _ids(vocab: int):
    def ids(seed: int = 0):
        return torch.randint(0, vocab, (9, 10 if vocab == 100 else 7), generator=torch.Generator().manual_seed(seed))
    return ids


def _image(seed: int = 0):
    return torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(seed))


INPUTS = {"MLP": _dense, "EmbConv1D": _ids(100), "DeepMLP": _dense, "Nested": _dense, "EmbLinear": _ids(50),
          "Conv2d": _image, "MHA": _dense}


def fill_peft_adapters(peft_model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero values in every PEFT LoRA factor (B, or A for embeddings, is zero at init and would hide paths)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def peft_copy(model: nn.Module, config, adapter_name: str = "default"):
    """PEFT applied to a deep copy of ``model``."""
    from peft import get_peft_model
    return get_peft_model(copy.deepcopy(model), config, adapter_name=adapter_name)


def peft_twin(original: nn.Module, report, layers: dict):
    """PEFT LoRA (r=4, alpha 8) on ``original`` over the modules ``report`` adapted, its factors copied from
    lowcost's ``layers`` (path → LoRALinear); returns (peft_model, its named modules)."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=report.names))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[f"base_model.model.{name}"].lora_A["default"].weight.copy_(layer.lora_A)
            modules[f"base_model.model.{name}"].lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model, modules


def peft_adapted_names(peft_model: nn.Module) -> set[str]:
    """Names (relative to the base model) of the modules PEFT wrapped with a LoRA layer."""
    from peft.tuners.lora import LoraLayer
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))
