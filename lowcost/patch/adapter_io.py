"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (r, in), ``….lora_B.weight`` (out, r), and
``base_model.model.<module path>.<param>`` for ``modules_to_save``. Writes are atomic (temp file in the same
directory, then ``os.replace``). Reads use safetensors only: pickle files are refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowcost.patch.ranks import copy_into

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
PREFIX = "base_model.model."


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter(directory, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Writes both files atomically; tensors are saved contiguous on the CPU."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return path


def read_adapter(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) from an adapter directory; clear errors for every way it can be wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (path / name).is_file()]
        if pickled:
            raise ValueError(f"{path / pickled[0]} is a pickle file; lowcost loads safetensors only (pickle can "
                             f"run code). Convert it with safetensors.torch.save_file to {WEIGHTS_NAME}")
        raise FileNotFoundError(f"adapter directory {str(path)!r} has no {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"adapter directory {str(path)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is truncated or not a valid safetensors file ({exc})") from exc
    return config, tensors


def adapter_tensors(layers: dict[str, nn.Module], saved: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors: LoRA A/B of ``layers`` (name → LoRA layer) and the params of ``saved`` modules."""
    out = {}
    for name, layer in layers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
    for name, module in saved.items():
        for pname, param in module.named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = param
    return out


def check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Raises ValueError naming every missing / unexpected key and every shape mismatch."""
    found = {_strip_adapter_name(k): v for k, v in found.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
    if problems:
        raise ValueError("adapter weights do not fit the model: " + " | ".join(problems))


def _strip_adapter_name(key: str) -> str:
    """PEFT files never hold the adapter name, but tolerate ``lora_A.default.weight``-style keys."""
    for part in ("lora_A", "lora_B"):
        head, sep, tail = key.partition(f".{part}.")
        if sep and tail.count(".") == 1 and tail.endswith(".weight"):
            return f"{head}.{part}.weight"
    return key


@torch.no_grad()
def copy_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Copies (after ``check_tensors``) each file tensor into its parameter, cast to the parameter's dtype."""
    found = {_strip_adapter_name(k): v for k, v in found.items()}
    for key, param in expected.items():
        copy_into(param, found[key])  # a DTensor (FSDP2) parameter takes this rank's chunk
