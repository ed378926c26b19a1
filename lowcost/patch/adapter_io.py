"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (r, in), ``….lora_B.weight`` (out, r) for
linear layers, ``….lora_embedding_A`` (r, num_embeddings) / ``….lora_embedding_B`` (dim, r) for embeddings, and
``base_model.model.<module path>.<param>`` for ``modules_to_save``; an adapted ``embed_tokens`` / ``lm_head``
also carries its table (``….base_layer.weight``), as PEFT writes it. Files are written atomically (a temporary
file in the same directory, then ``os.replace``) with the permissions the umask gives a new file (0666 & ~umask,
as ``open()`` would), and never over an existing adapter unless asked. Reads use safetensors only: pickle files
are refused.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowcost.patch.ranks import copy_into

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
PREFIX = "base_model.model."
MAX_LISTED = 8


def listing(items, limit: int = MAX_LISTED) -> str:
    """``a, b, c ... and N more``: messages stay short whatever the model size."""
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a new file, which is then renamed over ``path``. The file is created with mode 0666
    and the kernel applies the umask; that mode is set again after ``write`` (a writer may replace the file)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def check_destination(directory, overwrite: bool) -> Path:
    """The directory an adapter will be written to; refuses a file, or an existing adapter unless
    ``overwrite``."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_adapter: {str(path)!r} is a file; pass a directory (created if missing)")
    held = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).exists()]
    if held and not overwrite:
        raise FileExistsError(f"save_adapter: {str(path)!r} already holds an adapter ({', '.join(held)}); pass "
                              "overwrite=True to replace it, or choose another directory")
    return path


def write_adapter(directory, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Writes both files atomically; tensors are saved contiguous on the CPU."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"          # key order kept: rank/alpha patterns are first-match
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
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is truncated or not a valid safetensors file ({exc})") from exc
    return config, tensors


def adapter_tensors(layers: dict[str, nn.Module], adapter: str, saved: dict[str, nn.Module]
                    ) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors: the factors of ``adapter`` in ``layers`` (name → LoRA layer) and the params of the
    ``saved`` modules (name → module, that adapter's modules_to_save copies)."""
    out = {}
    for name, layer in layers.items():
        factors = layer.factors(adapter)
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if hasattr(layer, "embedding_dim")
                        else ("lora_A.weight", "lora_B.weight"))
        out[f"{PREFIX}{name}.{a_key}"] = factors.lora_A
        out[f"{PREFIX}{name}.{b_key}"] = factors.lora_B
    for name, module in saved.items():
        for pname, param in module.named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = param
    return out


EMBEDDING_NAMES = ("embed_tokens", "lm_head")      # PEFT's EMBEDDING_LAYER_NAMES


def embedding_tables(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """PEFT's ``save_embedding_layers="auto"``: an adapted ``embed_tokens`` / ``lm_head`` travels with its base
    table (``<path>.base_layer.weight``), so rows added for new tokens are not lost."""
    return {f"{PREFIX}{name}.base_layer.weight": layer.base_param() for name, layer in layers.items()
            if name.rpartition(".")[2] in EMBEDDING_NAMES}


def check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], optional=()) -> None:
    """Raises ValueError naming the missing / unexpected keys and shape mismatches (the first few of each);
    keys in ``optional`` may be absent from the file."""
    found = {_strip_adapter_name(k): v for k, v in found.items()}
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {listing(shapes)}")
    if problems:
        raise ValueError("adapter weights do not fit the model: " + " | ".join(problems))


def _strip_adapter_name(key: str) -> str:
    """PEFT files never hold the adapter name, but tolerate ``lora_A.default.weight``-style keys."""
    for part in ("lora_A", "lora_B"):
        head, sep, tail = key.partition(f".{part}.")
        if sep and tail.count(".") == 1 and tail.endswith(".weight"):
            return f"{head}.{part}.weight"
    for part in ("lora_embedding_A", "lora_embedding_B"):
        head, sep, tail = key.partition(f".{part}.")
        if sep and "." not in tail:
            return f"{head}.{part}"
    return key


@torch.no_grad()
def copy_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Copies (after ``check_tensors``) each file tensor into its parameter, cast to the parameter's dtype."""
    found = {_strip_adapter_name(k): v for k, v in found.items()}
    for key, param in expected.items():
        if key in found:
            copy_into(param, found[key])  # a DTensor (FSDP2) parameter takes this rank's chunk
