"""A model from its config with lowcost applied, holding fake tensors: no weights, no memory, no GPU.

The model is built on the ``meta`` device (plain tensors without data), ``lowcost.apply`` patches it as it
would a loaded model (LoRA swaps, checkpoint policy), and only then are its parameters and buffers
replaced by fake CPU tensors of the same shapes, dtypes and ``requires_grad``, tied ones kept tied. The
patching runs on meta tensors because it treats tensor subclasses (quantised weights) as ones the fused op
cannot take, and a fake tensor is a subclass.

Config sources: a ``config.json`` file, an HF-layout directory holding one, or a ``.gguf`` file (its
metadata only; transformers reads the architecture from it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lowcost.api import LoRAConfig, apply
from lowcost.checkpoint import CheckpointConfig

DEFAULT_CONFIGS = Path(__file__).resolve().parent / "data" / "configs"   # llama-3-8b.json


def load_config(path):
    """The transformers config for ``path`` (config.json, a directory with one, or a .gguf file)."""
    from transformers import AutoConfig
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            path = path / "config.json"
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise FileNotFoundError(f"{path} holds no config.json and not exactly one .gguf file")
            path = ggufs[0]
    if not path.is_file():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.suffix.lower() == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON model config: {exc}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path} has no 'model_type': not a transformers model config")
    model_type = data.pop("model_type")
    if "torch_dtype" in data and "dtype" not in data:   # the older key, as configs on the hub still have it
        data["dtype"] = data.pop("torch_dtype")
    return AutoConfig.for_model(model_type, **data)


def config_dtype(config) -> torch.dtype:
    """The dtype the config says its weights are in (``dtype``/``torch_dtype``), float32 if none."""
    value = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` on the meta device, in ``dtype``, in training mode, sdpa attention."""
    from transformers import AutoModelForCausalLM
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def patch(model: nn.Module, lora: Optional[LoRAConfig], checkpoint: Optional[CheckpointConfig]):
    """Full fine-tuning (every parameter trainable) when ``lora`` is None; else ``lowcost.apply``."""
    if lora is None:
        model.requires_grad_(True)
        if checkpoint is not None:
            apply(model, checkpoint=checkpoint)
        return model
    apply(model, lora=lora, checkpoint=checkpoint)
    return model


def to_fake(model: nn.Module, device: str = "cpu") -> nn.Module:
    """Replaces every parameter and buffer by a fake tensor on ``device`` (call inside ``fake_world()``);
    objects shared between modules (tied weights) stay shared."""
    made: dict[int, torch.Tensor] = {}

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = fake_of(param)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = fake_of(buf)
    for module in model.modules():   # plain attributes aliasing a parameter (LoRALinear.weight)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and id(value) in made:
                setattr(module, name, made[id(value)])
    return model
