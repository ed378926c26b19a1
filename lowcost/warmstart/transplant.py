"""Layer transplant: copy tensors from a source checkpoint into a model by name.

Source keys are renamed with ``mapping`` (``{source prefix: target prefix}``, longest prefix wins, a value
of None drops the key), then matched to the model's state dict. Same shape: copied. Different shape, same
rank: the overlapping leading slice is copied, the rest keeps the model's own initialisation ("sliced",
with the fraction). Target tensors with no source are "initialised" (left as they are); renamed source keys
with no target are "unused". Less than ``min_loaded`` of the target's elements loadable raises (before anything is copied) — the usual
cause is a wrong prefix, and the error names the closest keys.

Sources: a state dict, an ``nn.Module``, a ``.safetensors`` file, or a directory of them. Pickles are read
only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from lowcost.warmstart.report import WarmstartReport


def _read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: not a checkpoint file (.safetensors, or .bin/.pt read with weights_only=True)")


def load_state(source) -> dict:
    """A flat ``{name: tensor}`` from a state dict, module, checkpoint file or directory."""
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors (or *.bin) checkpoint files")
        state = {}
        for file in files:
            state.update(_read_file(file))
        return state
    if path.is_file():
        return _read_file(path)
    raise FileNotFoundError(f"transplant source {source!r} does not exist")


def _check_mapping(mapping: Mapping, keys) -> None:
    """Every mapping key must be a prefix of at least one source key."""
    missing = [k for k in mapping if not any(key == k or key.startswith(k) for key in keys)]
    if missing:
        close = {k: difflib.get_close_matches(k, list(keys), n=2) for k in missing}
        hint = "; ".join(f"{k!r} (closest source keys: {v})" for k, v in close.items())
        raise KeyError(f"mapping keys match no source tensor: {hint}")


def rename(keys, mapping: Optional[Mapping]) -> dict:
    """Source key → target key (or None: dropped) under the longest-prefix ``mapping``."""
    if not mapping:
        return {k: k for k in keys}
    ordered = sorted(mapping, key=len, reverse=True)
    out = {}
    for key in keys:
        for prefix in ordered:
            if key.startswith(prefix):
                target = mapping[prefix]
                out[key] = None if target is None else target + key[len(prefix):]
                break
        else:
            out[key] = key
    return out


def _plan(target_shape, value_shape) -> tuple[str, float, Optional[tuple]]:
    """(status, fraction of the target covered, slice) for copying a ``value_shape`` tensor in."""
    if tuple(value_shape) == tuple(target_shape):
        return "copied", 1.0, None
    if len(value_shape) != len(target_shape):
        return "initialised", 0.0, None
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(target_shape, value_shape))
    covered, numel = 1, 1
    for s, n in zip(overlap, target_shape):
        covered *= s.stop
        numel *= n
    return "sliced", covered / max(numel, 1), overlap


@torch.no_grad()
def _copy(target: torch.Tensor, value: torch.Tensor, overlap: Optional[tuple]) -> None:
    value = value.to(device=target.device, dtype=target.dtype)
    if overlap is None:
        target.copy_(value)
    else:
        target[overlap].copy_(value[overlap])


def _targets(model: nn.Module) -> dict:
    """Model state by name, one entry per storage (tied tensors once, under their first name)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def transplant(model: nn.Module, source, mapping: Optional[Mapping[str, Optional[str]]] = None,
               min_loaded: float = 0.5) -> WarmstartReport:
    """Copies ``source`` tensors into ``model`` by (renamed) name; see the module docstring.

    Returns:
        ``WarmstartReport`` (kind "transplant") with one entry per tensor (status, fraction, shapes) and
        ``extra["loaded_fraction"]`` (fraction of target elements loaded).
    Raises:
        KeyError: a mapping key matches no source tensor.
        ValueError: less than ``min_loaded`` of the target's elements were loaded.
    """
    state = load_state(source)
    if mapping:
        _check_mapping(mapping, state.keys())
    names = rename(state.keys(), mapping)
    targets = _targets(model)
    by_target = {t: s for s, t in names.items() if t is not None}
    report, loaded, total, copies = WarmstartReport("transplant"), 0.0, 0, []
    for name, tensor in targets.items():
        total += tensor.numel()
        src = by_target.get(name)
        status, frac, overlap = ("initialised", 0.0, None) if src is None else _plan(tensor.shape, state[src].shape)
        if status in ("copied", "sliced"):
            copies.append((tensor, state[src], overlap))
        loaded += frac * tensor.numel()
        report.count("source", status)
        report.entries.append({"tensor": name, "status": status, "fraction": round(frac, 4),
                               "shape": tuple(tensor.shape),
                               "source": src, "source_shape": None if src is None else tuple(state[src].shape)})
    tied_alias = set(model.state_dict().keys()) - set(targets)
    for src, tgt in names.items():
        if tgt is None or (tgt not in targets and tgt not in tied_alias):
            report.count("source", "unused")
            report.entries.append({"tensor": src, "status": "unused", "fraction": 0.0, "shape": None,
                                   "source": src, "source_shape": tuple(state[src].shape)})
    fraction = loaded / max(total, 1)
    report.extra["loaded_fraction"] = fraction
    if fraction < min_loaded:
        example = next(iter(targets), "?")
        close = difflib.get_close_matches(example, list(state), n=1)
        raise ValueError(f"transplant loaded {fraction:.1%} of the model's elements (< min_loaded "
                         f"{min_loaded:.0%}); a prefix mismatch? model key {example!r}, closest source key "
                         f"{close[0] if close else 'none'!r}. Pass mapping={{source_prefix: target_prefix}}.\n"
                         f"{report}")
    for tensor, value, overlap in copies:
        _copy(tensor, value, overlap)
    return report
