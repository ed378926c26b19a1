"""``lowcost.export_gguf(model, path, dtype="f16" | "q8_0")``: the fine-tuned model as a GGUF file.

The model must come from a GGUF file (``load_pretrained("x.gguf", quantize=...)`` or not): the new file carries
that file's metadata and tokenizer (every key-value field but the file type, which says the new dtype), its
architecture and its tensor set, in its order. Each tensor is the model's current value: adapters that run are
merged (round(W + Σ s·B A) in float32, W dequantized when the base is quantized), quantized weights are
dequantized, and the result is written as float16 or Q8_0 (2-D weights whose rows are whole 32-element blocks;
others float16) with the ``gguf`` package's writer and quantizer; 1-D tensors (norms) stay float32. Llama's
q/k rows are put back in llama.cpp's per-head interleaved order. The file is written under a temporary name and
renamed into place, one tensor in memory at a time.

A model sharded by FSDP2 (``lowcost.distributed.shard_model``) holds only its rows of every weight, so it is
refused; gather it first, on every rank, and let one rank write::

    with lowcost.distributed.unsharded(model):
        if torch.distributed.get_rank() == 0:
            lowcost.export_gguf(model, "tuned.gguf")

Nothing the export reads is pinned (each value is copied before numpy sees it), so FSDP2 can free the gathered
tensors again when the ``with`` block ends.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from lowcost.quant.gguf_layout import check_architecture, gguf_names, row_order
from lowcost.reference.quant import QuantizedWeight

DTYPES = ("f16", "q8_0")


def _source_file(model: nn.Module) -> Path:
    info = getattr(model, "lowcost_load_info", None)
    path = getattr(info, "gguf_file", "") if info is not None else ""
    if not path:
        raise ValueError("lowcost.export_gguf copies the tokenizer and metadata of the GGUF file the model was "
                         "loaded from, and this model was not loaded from one (lowcost.load_pretrained('x.gguf')); "
                         "for an HF checkpoint use llama.cpp's convert_hf_to_gguf.py on lowcost.merge's result")
    if not Path(path).is_file():
        raise FileNotFoundError(f"lowcost.export_gguf: the source GGUF file {path} is gone")
    return Path(path)


def _refuse_sharded(model: nn.Module) -> None:
    """RuntimeError when some parameter is an FSDP2 shard (a DTensor): its other rows live on other ranks."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    sharded = [n for n, p in model.named_parameters() if dtensor is not None and isinstance(p, dtensor)]
    if sharded:
        raise RuntimeError(f"lowcost.export_gguf: the model is sharded by FSDP2 ({len(sharded)} parameters, e.g. "
                           f"{sharded[0]}, hold only this rank's rows); gather it first on every rank and export "
                           "from one: with lowcost.distributed.unsharded(model): if rank == 0: "
                           "lowcost.export_gguf(model, path)")


def _is_adapter_layer(module: nn.Module) -> bool:
    return hasattr(module, "merged_weight") and hasattr(module, "running_adapters")


@torch.no_grad()
def dense_value(model: nn.Module, key: str) -> torch.Tensor:
    """float32 value of ``<module>.weight`` / ``<module>.bias`` as the model computes it now (adapters merged)."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and _is_adapter_layer(module):
        names = module.running_adapters()
        if names:
            return module.merged_weight(names).float()
        base = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
    else:
        base = getattr(module.base_layer, attr) if hasattr(module, "base_layer") else getattr(module, attr)
    if isinstance(base, QuantizedWeight):
        return base.dequantize(torch.float32)
    return base.detach().float()


def _candidate_keys(model: nn.Module) -> list[str]:
    keys = []
    for name, module in model.named_modules():
        for attr in ("weight", "bias"):
            if isinstance(getattr(module, attr, None), (torch.Tensor, QuantizedWeight)) or \
                    isinstance(getattr(getattr(module, "base_layer", None), attr, None), torch.Tensor):
                keys.append(f"{name}.{attr}")
    return keys


def _tensor_names(model: nn.Module, reader, arch: str, n_blocks: int) -> list[tuple[str, str]]:
    """(GGUF name, model key) for every tensor of the source file, in its order."""
    by_gguf = gguf_names(_candidate_keys(model), arch, n_blocks)
    missing = [t.name for t in reader.tensors if t.name not in by_gguf]
    if missing:
        raise ValueError(f"lowcost.export_gguf: the model has no tensor for {', '.join(missing[:5])} of the source file")
    return [(t.name, by_gguf[t.name]) for t in reader.tensors]


def _check_tied(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """A source whose output head is its token embedding (no output.weight) cannot take an adapter on either."""
    if any(name == "output.weight" for name, _ in pairs):
        return
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and _is_adapter_layer(module) and module.running_adapters():
            raise ValueError("lowcost.export_gguf: the source file ties the output head to the token embedding, "
                             "and an adapter on one of them would untie them; leave embed_tokens / lm_head out")


def _encode(value: torch.Tensor, dtype: str):
    """(numpy array to write, raw GGML type or None) for one float32 tensor. A copy: ``.numpy()`` would make
    the storage it shares with a model tensor unresizable, and FSDP2 frees a gathered tensor by resizing it."""
    import gguf
    from gguf.quants import quantize
    array = value.detach().clone().contiguous().numpy()
    if value.dim() == 1:
        return array.astype(np.float32), None
    if dtype == "q8_0" and value.shape[-1] % 32 == 0:
        return quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def _planned(value_shape, dtype: str):
    """(byte shape, numpy dtype, nbytes, raw type) of a tensor before it is computed (for the header)."""
    import gguf
    if len(value_shape) == 1:
        return tuple(value_shape), np.float32, 4 * value_shape[0], None
    rows, cols = value_shape
    if dtype == "q8_0" and cols % 32 == 0:
        return (rows, cols // 32 * 34), np.uint8, rows * cols // 32 * 34, gguf.GGMLQuantizationType.Q8_0
    return (rows, cols), np.float16, 2 * rows * cols, None


def _copy_metadata(writer, reader, dtype: str) -> None:
    import gguf
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(int(ftype))


def _value(model: nn.Module, key: str, config) -> torch.Tensor:
    value = dense_value(model, key)
    order = row_order(key, config, value.shape[0], to_gguf=True) if value.dim() == 2 else None
    return value[order] if order is not None else value


def export_gguf(model: nn.Module, path: Union[str, os.PathLike], dtype: str = "f16") -> Path:
    """Writes ``model`` (adapters merged, quantized weights dequantized) as a GGUF file at ``path``, with the
    source GGUF file's metadata and tokenizer; ``dtype`` "f16" or "q8_0". Returns the path."""
    import gguf
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _refuse_sharded(model)
    source = _source_file(model)
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    check_architecture(arch, "lowcost.export_gguf")
    config = model.config
    pairs = _tensor_names(model, reader, arch, config.num_hidden_layers)
    _check_tied(model, pairs)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))   # the mode the umask gives a new file
    mode = os.stat(tmp).st_mode & 0o777
    try:
        _write(model, config, pairs, reader, arch, dtype, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def _write(model, config, pairs, reader, arch, dtype, tmp: Path) -> None:
    import gguf
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_metadata(writer, reader, dtype)
    for name, _ in pairs:
        byte_shape, np_dtype, nbytes, raw = _planned(shapes[name], dtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, key in pairs:
        value = _value(model, key, config)
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"lowcost.export_gguf: {key} is {tuple(value.shape)}, the source's {name} is {shapes[name]}")
        array, _ = _encode(value, dtype)
        writer.write_tensor_data(array)
    writer.close()
