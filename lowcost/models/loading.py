"""Loading open weights, offline: an HF-layout directory (config + safetensors) or a GGUF file.

``load_pretrained`` returns a transformers model with every parameter frozen and prints (and attaches as
``model.lowcost_load_info``) what it loaded: architecture, parameter count, dtype, tied weights.

Rules kept here:
- nothing is fetched from a hub: a string that is not a local path is looked up in the local HF cache only
  (``local_files_only=True``); no copy there is a ``FileNotFoundError`` that says so;
- no pickles: weights come from safetensors (a directory holding only ``*.bin`` is refused);
- a GGUF file is dequantised once and cached as a safetensors directory under ``cache_dir``
  (``$LOWCOST_CACHE`` or ``~/.cache/lowcost``); the cache entry is written to a temporary directory and
  renamed into place (``os.replace``), so a crash or a concurrent load never leaves half a checkpoint;
  a new entry removes the entries of the same file name whose source is gone or changed (bounded disk use).
  ``save_pretrained`` refuses GGUF-loaded models, so the conversion writes config, tokenizer and
  ``safetensors.torch.save_model`` (which handles tied tensors) itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]
_CONVERTED_MARK = "lowcost_gguf_source.json"


@dataclass
class LoadInfo:
    """What ``load_pretrained`` loaded."""
    source: str
    format: str                      # "hf-dir", "gguf", "gguf-cached", "hf-cache"
    architecture: str
    model_type: str
    parameters: int
    dtype: str
    tied: list = field(default_factory=list)   # [(name, name), …] parameters sharing storage
    weights_dir: str = ""
    seconds: float = 0.0
    gguf_file: str = ""              # the GGUF file the weights came from (export_gguf copies its metadata)
    quantization: str = ""           # e.g. "nf4: 210 modules, 0.273x of bf16" (load_pretrained(quantize=...))

    def __str__(self) -> str:
        tied = ", ".join(" = ".join(pair) for pair in self.tied) or "none"
        quant = f", quantized {self.quantization}" if self.quantization else ""
        return (f"lowcost.load_pretrained: {self.architecture} ({self.model_type}), "
                f"{self.parameters / 1e6:.1f}M parameters, {self.dtype}{quant}, tied: {tied}; "
                f"from {self.source} [{self.format}] in {self.seconds:.1f}s, frozen")


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """Directory holding converted checkpoints: argument > ``$LOWCOST_CACHE`` > ``~/.cache/lowcost``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LOWCOST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowcost"


def _gguf_cache_dir(gguf: Path, cache_dir: Optional[PathLike]) -> Path:
    """Cache entry for one GGUF file, keyed by its resolved path, size and modification time."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{digest}"


def _find_gguf(path: Path) -> Optional[Path]:
    """The GGUF file named by ``path``: the file itself, or the single ``*.gguf`` in a directory without a
    ``config.json``."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(p.name for p in found)}); "
                             "pass the one to load")
        return found[0] if found else None
    return None


def _hub_snapshot(repo_id: str) -> Path:
    """Local HF-cache snapshot of ``repo_id``; never contacts the hub."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, OfflineModeIsEnabled, …
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and has no copy in the local Hugging Face cache; lowcost never "
            "downloads weights. Pass a directory (config.json + *.safetensors) or a .gguf file") from err


def resolve(path: PathLike) -> tuple[str, Path]:
    """(format, location) for ``path``: ("gguf", file), ("hf-dir", dir) or ("hf-cache", snapshot dir)."""
    candidate = Path(os.path.expanduser(str(path)))
    if candidate.exists():
        gguf = _find_gguf(candidate)
        if gguf is not None:
            return "gguf", gguf
        if candidate.is_dir() and (candidate / "config.json").exists():
            return "hf-dir", candidate
        raise ValueError(f"{candidate} is neither an HF-layout directory (config.json + *.safetensors) "
                         "nor a .gguf file")
    if str(path).count("/") > 1 or str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path} does not exist")
    return "hf-cache", _hub_snapshot(str(path))


def _check_safetensors(directory: Path) -> None:
    """Refuses directories whose weights are pickles only."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    hint = f" (found pickled weights {', '.join(pickles)}: lowcost does not unpickle)" if pickles else ""
    raise FileNotFoundError(f"no *.safetensors weights in {directory}{hint}")


def _model_class(config):
    """transformers class named by ``config.architectures``, else the causal-LM / base auto class."""
    import transformers
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel


def _atomic_publish(tmp: Path, final: Path) -> None:
    """Renames a finished temporary directory into place; a concurrent winner's copy is kept."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / _CONVERTED_MARK).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """Dequantises ``gguf`` to a float32 safetensors directory in the cache (once) and returns it."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(gguf)
    final = _gguf_cache_dir(gguf, cache_dir)
    if (final / _CONVERTED_MARK).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        except (struct.error, ValueError, EOFError) as err:  # a short read surfaces as struct.error or a reshape
            raise ValueError(f"cannot read {gguf}: truncated, corrupt or unsupported GGUF file "
                             f"({type(err).__name__}: {str(err)[:200]})") from None
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / _CONVERTED_MARK).write_text(json.dumps({"gguf": str(gguf.resolve())}))
        _atomic_publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_stale_conversions(final)
    return final


def _prune_stale_conversions(kept: Path) -> list[Path]:
    """Removes the cache entries of ``kept``'s file name whose source GGUF is gone or has changed since.

    An entry is keyed by the source's path, size and mtime, so a moved, rewritten or re-installed file (a new
    virtual environment holding the same asset) gets a new entry; without pruning, each one leaves a full
    float32 copy of the model behind. Entries whose marker cannot be read are not ours to judge and are kept.
    Returns the removed entries.
    """
    stem = kept.name.rsplit("-", 1)[0]
    removed = []
    for entry in kept.parent.iterdir():
        if entry == kept or entry.name.startswith(".") or entry.name.rsplit("-", 1)[0] != stem:
            continue
        try:
            source = Path(json.loads((entry / _CONVERTED_MARK).read_text())["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not source.is_file() or _gguf_cache_dir(source, kept.parent.parent) != entry:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of parameter names that share one storage (tied weights)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, param in model.named_parameters(remove_duplicate=False):
        key = param.untyped_storage().data_ptr()
        if key in seen:
            pairs.append((seen[key], name))
        else:
            seen[key] = name
    return pairs


def _weights_dir(path: PathLike, cache_dir: Optional[PathLike]) -> tuple[str, Path]:
    kind, location = resolve(path)
    if kind == "gguf":
        cached = (_gguf_cache_dir(location, cache_dir) / _CONVERTED_MARK).exists()
        return ("gguf-cached" if cached else "gguf"), convert_gguf(location, cache_dir)
    return kind, location


def load_pretrained(path: PathLike, dtype: Optional[torch.dtype] = None, *, cache_dir: Optional[PathLike] = None,
                    model_class=None, freeze: bool = True, verbose: bool = True, quantize: Optional[str] = None,
                    block_size: int = 64, double_quant: bool = False) -> nn.Module:
    """Loads a local checkpoint into a transformers model, frozen.

    Args:
        path: HF-layout directory, ``.gguf`` file (or a directory holding one), or a hub id that is already
            in the local HF cache.
        dtype: parameter dtype; None keeps the checkpoint's (a converted GGUF is float32).
        cache_dir: where GGUF conversions live (default ``$LOWCOST_CACHE`` or ``~/.cache/lowcost``).
        model_class: transformers class to instantiate; default from ``config.architectures``.
        freeze: set ``requires_grad=False`` on every parameter.
        verbose: print the ``LoadInfo`` line.
        quantize: None (dense), "nf4" / "int8" (every linear layer but the output head quantized while
            loading, one tensor at a time; ``block_size`` and ``double_quant`` as in ``lowcost.quantize``) or
            "gguf" (a GGUF file's blocks kept as they are). See ``lowcost.models.quantized_loading``.
    Returns:
        the model, with ``model.lowcost_load_info`` (a ``LoadInfo``; with ``quantize``, also
        ``model.lowcost_quant_report``).
    """
    from transformers import AutoConfig
    start = time.perf_counter()
    if quantize is not None:
        return _load_quantized(path, dtype, model_class, freeze, verbose, quantize, block_size, double_quant, start)
    kind, directory = _weights_dir(path, cache_dir)
    _check_safetensors(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = model_class or _model_class(config)
    model = cls.from_pretrained(directory, dtype=dtype if dtype is not None else "auto", local_files_only=True,
                                use_safetensors=True)
    if freeze:
        model.requires_grad_(False)
    model.eval()
    first = next(model.parameters())
    info = LoadInfo(source=str(path), format=kind, architecture=type(model).__name__,
                    model_type=config.model_type, parameters=sum(p.numel() for p in model.parameters()),
                    dtype=str(first.dtype).replace("torch.", ""), tied=tied_parameters(model),
                    weights_dir=str(directory), seconds=time.perf_counter() - start,
                    gguf_file=str(resolve(path)[1]) if kind.startswith("gguf") else "")
    model.lowcost_load_info = info
    if verbose:
        print(info)
    return model


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _load_quantized(path, dtype, model_class, freeze, verbose, quantize, block_size, double_quant, start):
    from transformers import AutoConfig
    from lowcost.models.quantized_loading import load_gguf_quantized, load_hf_quantized
    if quantize not in ("nf4", "int8", "gguf"):
        raise ValueError(f"quantize must be None, 'nf4', 'int8' or 'gguf', got {quantize!r}")
    if not freeze:
        raise ValueError("quantize= loads frozen weights (a quantized weight is never trained); drop freeze=False")
    kind, location = resolve(path)
    if kind == "gguf":
        config = AutoConfig.from_pretrained(location.parent, gguf_file=location.name, local_files_only=True)
        config.quantization_config = None
        cls = model_class or _model_class(config)
        model, report = load_gguf_quantized(location, config, cls, dtype or torch.float32, quantize, block_size,
                                            double_quant)
    else:
        if quantize == "gguf":
            raise ValueError(f"quantize='gguf' keeps a GGUF file's blocks; {path} is an HF checkpoint "
                             "(use quantize='nf4' or 'int8')")
        _check_safetensors(location)
        config = AutoConfig.from_pretrained(location, local_files_only=True)
        cls = model_class or _model_class(config)
        model, report = load_hf_quantized(location, config, cls, dtype or _config_dtype(config), quantize,
                                          block_size, double_quant)
    elements = sum(p.numel() for p in model.parameters()) + sum(m.shape[0] * m.shape[1] for m in report.modules)
    ratio = report.bytes / report.bf16_bytes if report.bf16_bytes else 0.0
    info = LoadInfo(source=str(path), format=f"{kind}+{quantize}", architecture=type(model).__name__,
                    model_type=config.model_type, parameters=elements, dtype=str(dtype or _config_dtype(config))
                    .replace("torch.", ""), tied=tied_parameters(model), weights_dir=str(location),
                    seconds=time.perf_counter() - start, gguf_file=str(location) if kind == "gguf" else "",
                    quantization=f"{report.scheme}: {len(report.modules)} modules, {ratio:.3f}x of bf16")
    model.lowcost_load_info, model.lowcost_quant_report = info, report
    if verbose:
        print(info)
    return model


def load_tokenizer(path: PathLike, *, cache_dir: Optional[PathLike] = None):
    """The tokenizer stored with a checkpoint (HF directory, GGUF file via its cache entry, local hub id)."""
    from transformers import AutoTokenizer
    _, directory = _weights_dir(path, cache_dir)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
