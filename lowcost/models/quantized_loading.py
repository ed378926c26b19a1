"""``load_pretrained(path, quantize=...)``: build the model with empty weights, then fill it one tensor at a
time, quantizing each selected linear weight as it arrives, so the whole model is never held unquantized.

- ``quantize="nf4" | "int8"`` from an HF directory: each safetensors tensor is read on its own (one file
  handle per tensor, so no mapping of the whole file stays resident), cast to ``dtype``, and, for the linear
  layers ``lowcost.quantize`` would select (every nn.Linear / Conv1D but the output head), quantized before the
  next tensor is read. From a GGUF file: each tensor is dequantized from its blocks, then quantized.
- ``quantize="gguf"`` from a GGUF file keeps the file's blocks as they are (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) for
  every linear weight and the token embedding (a tied output head shares the embedding's blocks); float tensors
  (norms) load dense. Supported GGUF architecture: llama (its q/k rows are stored permuted per head, as
  llama.cpp's converter writes them; the permutation is undone on the blocks' rows, which are whole rows).
Unquantized parameters come out in ``dtype`` (default float32); the compute dtype of a quantized weight is
``dtype`` too. Everything is frozen.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from lowcost.nn.quantized import QuantizedEmbedding, QuantizedLinear
from lowcost.quant.gguf_layout import check_architecture, gguf_names, row_order
from lowcost.quant.quantize_model import check_scheme, dense_weight, quantize_weight, select_linears
from lowcost.quant.report import QuantizedModule, QuantReport
from lowcost.reference.quant import BLOCK_TYPES, QuantizedWeight

DENSE_GGML_TYPES = (0, 1, 30)   # F32, F16, BF16: loaded dense, also where blocks would be kept
_BY_GGML_TYPE = {kind.ggml_type: name for name, kind in BLOCK_TYPES.items()}


# ----------------------------------------------------------------------------------------------- skeleton
def empty_model(config, model_class, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    build = getattr(model_class, "_from_config", None) or model_class.from_config  # a concrete class or an Auto one
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=dtype)
    return model


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return model.get_submodule(module_name), attr


def _set_dense(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module, attr = _owner(model, key)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor.to(dtype), requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor.to(module._buffers[attr].dtype)
    else:
        raise KeyError(key)


@functools.lru_cache(maxsize=1)
def _libc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


def release_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc ``malloc_trim``). Without it, glibc's growing mmap threshold
    keeps the freed dense temporaries of earlier tensors in the heap, and the process's footprint creeps up by
    the size of the tensors already quantized."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _quantized_layer(old: nn.Module, weight: QuantizedWeight) -> nn.Module:
    if isinstance(old, nn.Embedding):
        return QuantizedEmbedding(weight, old.padding_idx)
    return QuantizedLinear(weight, old.bias)


def _entry(name: str, weight: QuantizedWeight) -> QuantizedModule:
    N, K = weight.shape
    padded = weight.scheme.startswith("nf4") and K % weight.block_size != 0
    return QuantizedModule(name, weight.scheme, (N, K), weight.nbytes,
                           N * K * torch.empty((), dtype=weight.dtype).element_size(), padded)


def _finish(model: nn.Module, report: QuantReport) -> nn.Module:
    """Ties a missing output head, then refuses any parameter still on the meta device."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    tie = getattr(model.config, "tie_word_embeddings", False)
    if tie and isinstance(head, nn.Linear) and head.weight.is_meta and embed is not None:
        if isinstance(embed, QuantizedEmbedding):
            path = next(n for n, m in model.named_modules() if m is head)
            _set_module(model, path, QuantizedLinear(embed.weight, head.bias))
            report.notes.append(f"{path} is tied to the input embedding: it shares its {embed.weight.scheme} blocks")
        else:
            head.weight = embed.weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint has no values for {len(missing)} tensors of the model: "
                         f"{', '.join(missing[:5])}")
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------- HF dir
def _safetensors_keys(directory: Path) -> Iterator[tuple[Path, str]]:
    from safetensors import safe_open
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
        for key in keys:
            yield file, key


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor, copied out of a file handle that is closed again (no mapping stays resident)."""
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key).clone()


def _model_key(model_keys: set, key: str, prefix: str) -> Optional[str]:
    if key in model_keys:
        return key
    if prefix and f"{prefix}.{key}" in model_keys:
        return f"{prefix}.{key}"
    return None


def load_hf_quantized(directory: Path, config, model_class, dtype: torch.dtype, scheme: str, block_size: int,
                      double_quant: bool, on_tensor=None) -> tuple[nn.Module, QuantReport]:
    """An HF checkpoint loaded tensor by tensor, its linear weights quantized as they arrive."""
    check_scheme(scheme, block_size, double_quant)
    model = empty_model(config, model_class, dtype)
    report = QuantReport(scheme="nf4-dq" if double_quant else scheme)
    targets = {f"{n}.weight": n for n in select_linears(model, "all-linear", None, report)}
    keys = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "")
    for file, key in _safetensors_keys(directory):
        name = _model_key(keys, key, prefix)
        if name is None:
            continue
        tensor = _read_tensor(file, key)
        if name in targets:
            module = model.get_submodule(targets[name])
            weight = tensor.t() if dense_weight(module) is not module.weight else tensor
            qweight = quantize_weight(weight.to(dtype), scheme, block_size, double_quant, dtype)
            _set_module(model, targets[name], _quantized_layer(module, qweight))
            report.modules.append(_entry(targets[name], qweight))
        else:
            _set_dense(model, name, tensor, dtype)
        del tensor
        release_freed_memory()
        if on_tensor is not None:
            on_tensor(name)
    return _finish(model, report), report


# ----------------------------------------------------------------------------------------------- GGUF
def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_dense(tensor, dtype) -> torch.Tensor:
    """float32 (N, K) (or (K,)) of any GGUF tensor: our decoder for the block types we know, gguf's otherwise."""
    from gguf.quants import dequantize
    name = _BY_GGML_TYPE.get(int(tensor.tensor_type))
    data = np.asarray(tensor.data)
    if name is not None:
        block = BLOCK_TYPES[name].block
        raw = torch.from_numpy(data.copy())
        return QuantizedWeight(name, (raw.shape[0], raw.shape[1] // BLOCK_TYPES[name].type_size * block),
                               {"data": raw}, block).dequantize(dtype)
    return torch.from_numpy(np.array(dequantize(data, tensor.tensor_type))).to(dtype)


def _gguf_blocks(tensor, key: str, dtype) -> QuantizedWeight:
    name = _BY_GGML_TYPE.get(int(tensor.tensor_type))
    if name is None:
        raise ValueError(f"quantize='gguf': tensor {tensor.name} ({key}) is {tensor.tensor_type.name}, which lowcost "
                         f"cannot keep as blocks (it keeps {', '.join(n.upper() for n in BLOCK_TYPES)}); load with "
                         "quantize=None (dequantized) or quantize='nf4'")
    raw = torch.from_numpy(np.array(tensor.data))
    kind = BLOCK_TYPES[name]
    return QuantizedWeight(name, (raw.shape[0], raw.shape[1] // kind.type_size * kind.block), {"data": raw},
                           kind.block, dtype)


def load_gguf_quantized(gguf_path: Path, config, model_class, dtype: torch.dtype, scheme: str, block_size: int,
                        double_quant: bool, on_tensor=None) -> tuple[nn.Module, QuantReport]:
    """A GGUF file loaded tensor by tensor: blocks kept (``scheme="gguf"``) or re-quantized to nf4 / int8."""
    from gguf import GGUFReader
    if scheme != "gguf":
        check_scheme(scheme, block_size, double_quant)
    reader = GGUFReader(str(gguf_path))
    arch = gguf_field(reader, "general.architecture")
    check_architecture(arch, f"load_pretrained({gguf_path.name!r}, quantize={scheme!r}) (load it with quantize=None)")
    model = empty_model(config, model_class, dtype)
    report = QuantReport(scheme="nf4-dq" if double_quant and scheme == "nf4" else scheme)
    targets = {f"{n}.weight": n for n in select_linears(model, "all-linear", None, report)}
    embed = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    if scheme == "gguf" and embed is not None:
        targets[f"{embed}.weight"] = embed
    names = gguf_names(model.state_dict().keys(), arch, config.num_hidden_layers)
    for tensor in reader.tensors:
        key = names.get(tensor.name)
        if key is None:
            raise ValueError(f"GGUF tensor {tensor.name} matches no parameter of {type(model).__name__}")
        _load_gguf_tensor(model, tensor, key, targets, config, dtype, scheme, block_size, double_quant, report)
        release_freed_memory()
        if on_tensor is not None:
            on_tensor(key)
    return _finish(model, report), report


def _load_gguf_tensor(model, tensor, key, targets, config, dtype, scheme, block_size, double_quant, report):
    """One GGUF tensor into the model: kept as blocks, re-quantized, or dense (norms; float-typed weights when
    the blocks are kept)."""
    order = row_order(key, config, int(tensor.shape[-1])) if len(tensor.shape) == 2 else None
    if key not in targets or (scheme == "gguf" and int(tensor.tensor_type) in DENSE_GGML_TYPES):
        value = _gguf_dense(tensor, torch.float32)
        value = value[order] if order is not None else value
        _set_dense(model, key, value.reshape(model.get_parameter(key).shape), dtype)
        return
    if scheme == "gguf":
        weight = _gguf_blocks(tensor, key, dtype)
        if order is not None:
            weight.data = weight.data[order].contiguous()
    else:
        dense = _gguf_dense(tensor, torch.float32)
        weight = quantize_weight((dense[order] if order is not None else dense).to(dtype), scheme, block_size,
                                 double_quant, dtype)
    module = model.get_submodule(targets[key])
    _set_module(model, targets[key], _quantized_layer(module, weight))
    report.modules.append(_entry(targets[key], weight))
