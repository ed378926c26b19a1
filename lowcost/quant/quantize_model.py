"""``lowcost.quantize(model, scheme=...)``: swap frozen linear layers for ``QuantizedLinear`` in place.

Which layers: ``targets="all-linear"`` (every ``nn.Linear`` and transformers ``Conv1D`` but the output head, as
QLoRA does), a regex that must match the whole module name, or a list of names / name suffixes; ``exclude``
takes the same forms. Everything is checked before the first layer changes (a layer whose weight requires grad,
an unknown scheme, a bad block size, a model already patched by ``lowcost.apply``), and a failure while swapping
puts back every layer already swapped: the model is untouched after any error.

Schemes: ``"nf4"`` (block absmax, ``block_size`` 32…4096, ``double_quant`` to 8-bit absmax; a K the block does
not divide is padded with zeros to whole blocks, and the report says which layers were) and ``"int8"`` (one
absmax scale per row; no blocks). GGUF block formats come only from a GGUF file
(``load_pretrained(path, quantize="gguf")``).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
from torch import nn

from lowcost._families import output_head
from lowcost.nn.lora_linear import LoRALinear, is_conv1d
from lowcost.nn.quantized import QuantizedLinear
from lowcost.quant.report import QuantizedModule, QuantReport
from lowcost.reference.quant import NF4_BLOCK_SIZES, QuantizedWeight, quantize_int8, quantize_nf4

SCHEMES = ("nf4", "int8")
Targets = Union[str, Sequence[str]]


def check_scheme(scheme, block_size, double_quant) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES} (GGUF blocks come from a GGUF file: "
                         f"load_pretrained(path, quantize='gguf')), got {scheme!r}")
    if scheme == "nf4" and block_size not in NF4_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {NF4_BLOCK_SIZES} for nf4, got {block_size!r}")
    if double_quant and scheme != "nf4":
        raise ValueError("double_quant applies to scheme='nf4' only")


def quantize_weight(weight: torch.Tensor, scheme: str, block_size: int = 64, double_quant: bool = False,
                    dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """A ``QuantizedWeight`` of a dense (N, K) weight; compute dtype ``dtype`` (default: the weight's)."""
    dtype = dtype or weight.dtype
    with torch.no_grad():
        if scheme == "int8":
            return QuantizedWeight("int8", weight.shape, quantize_int8(weight), 0, dtype)
        tensors = quantize_nf4(weight, block_size, double_quant)
        return QuantizedWeight("nf4-dq" if double_quant else "nf4", weight.shape, tensors, block_size, dtype)


def _matches(name: str, pattern: Optional[Targets]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern or ())


def select_linears(model: nn.Module, targets: Targets = "all-linear", exclude: Optional[Targets] = None,
                   report: Optional[QuantReport] = None) -> list[str]:
    """Names of the linear layers ``targets`` selects, minus ``exclude`` and (all-linear) the output head; what
    was left out goes to ``report.skipped`` with the reason."""
    all_linear = isinstance(targets, str) and targets == "all-linear"
    head = output_head(model) if all_linear else None
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if not name or not (all_linear or _matches(name, targets)):
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            if not all_linear and next(module.parameters(recurse=False), None) is not None:
                skipped.append((name, f"{type(module).__name__} is not an nn.Linear or Conv1D"))
            continue
        if name == head:
            skipped.append((name, "the output head (targets='all-linear' keeps it dense, as QLoRA does)"))
        elif exclude and _matches(name, exclude):
            skipped.append((name, "excluded"))
        else:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"targets={targets!r} (exclude={exclude!r}) selects no nn.Linear / Conv1D layer to quantize")
    if report is not None:
        report.skipped += skipped
    return chosen


def _check_frozen(model: nn.Module, names: list[str]) -> None:
    for name in names:
        if model.get_submodule(name).weight.requires_grad:
            raise ValueError(f"lowcost.quantize: {name!r} has a weight that requires grad; quantized weights are "
                             "frozen: freeze the model first (model.requires_grad_(False), as load_pretrained does) "
                             "or leave this layer out with exclude=")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(out, in): an nn.Linear's weight, or the transpose of a Conv1D's."""
    return module.weight.t() if is_conv1d(module) else module.weight


def quantized_linear_of(module: nn.Module, scheme: str, block_size: int, double_quant: bool) -> QuantizedLinear:
    weight = quantize_weight(dense_weight(module).detach(), scheme, block_size, double_quant)
    return QuantizedLinear(weight, module.bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize(model: nn.Module, scheme: str = "nf4", block_size: int = 64, targets: Targets = "all-linear",
             exclude: Optional[Targets] = None, *, double_quant: bool = False) -> QuantReport:
    """Quantize ``model``'s frozen linear layers in place, layer by layer; returns a ``QuantReport``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_scheme(scheme, block_size, double_quant)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("lowcost.quantize: the model holds LoRA layers; quantize before lowcost.apply")
    report = QuantReport(scheme="nf4-dq" if double_quant else scheme)
    names = select_linears(model, targets, exclude, report)
    _check_frozen(model, names)
    originals: dict[str, nn.Module] = {}
    try:
        for name in names:
            module = model.get_submodule(name)
            new = quantized_linear_of(module, scheme, block_size, double_quant)
            originals[name] = module
            _set(model, name, new)
            report.modules.append(_entry(name, new, scheme))
    except BaseException:
        for name, module in originals.items():
            _set(model, name, module)
        raise
    return report


def _entry(name: str, layer: QuantizedLinear, scheme: str) -> QuantizedModule:
    w = layer.weight
    N, K = w.shape
    padded = scheme == "nf4" and K % max(w.block_size, 1) != 0
    dense = N * K * torch.empty((), dtype=w.dtype).element_size()
    return QuantizedModule(name, w.scheme, (N, K), w.nbytes, dense, padded)
