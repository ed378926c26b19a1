"""Options shared by ``finetune`` and ``demo``: reading and checking them before any expensive work, and
loading the model, each failure a one-line ``CLIError`` that names the option."""
from __future__ import annotations

import argparse
from typing import Optional, Union

import torch

from lowcost.cli import CLIError

POLICIES = ("none", "full", "every_k", "sqrt", "selective", "offload")
BACKENDS = ("torch", "triton", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("nf4", "int8", "gguf")


def add_lora_arguments(parser: argparse.ArgumentParser, r: int = 8, alpha: float = 16.0,
                       dropout: float = 0.05) -> None:
    group = parser.add_argument_group("LoRA and checkpointing")
    group.add_argument("--lora-r", type=int, default=r, metavar="R", help=f"LoRA rank (default {r})")
    group.add_argument("--alpha", type=float, default=alpha, help=f"LoRA alpha; scale = alpha/r (default {alpha:g})")
    group.add_argument("--targets", default="all-linear",
                       help="modules to adapt: 'all-linear', a regex, or a comma list of names such as "
                            "q_proj,v_proj (default all-linear)")
    group.add_argument("--dropout", type=float, default=dropout, help=f"LoRA dropout (default {dropout:g})")
    group.add_argument("--checkpoint", default="full", metavar="POLICY",
                       help=f"activation checkpointing: {', '.join(POLICIES)} (default full); --budget picks per "
                            "block instead")
    group.add_argument("--budget", default=None,
                       help="bytes the saved activations may take ('6GiB', '512MB') or a fraction of the "
                            "no-checkpoint bytes (0.3); the planner picks a policy per block")
    group.add_argument("--backend", default=None, choices=BACKENDS,
                       help="LoRA op backend (default: best available for the device)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")


def device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_backend(backend: Optional[str], dev: torch.device, r: int) -> None:
    from lowcost.ops import resolve_backend
    try:
        resolve_backend(backend, dev, rank=r)
    except ValueError as exc:
        raise CLIError(f"--backend {backend}: {exc}") from None


def budget(text: Optional[str]) -> Optional[Union[str, int, float]]:
    """--budget as CheckpointConfig takes it: a fraction (float ≤ 1), bytes (int) or a size string."""
    if text is None:
        return None
    from lowcost.checkpoint import parse_budget
    try:
        number = float(text)
        value: Union[str, int, float] = number if number <= 1.0 else int(number)
    except ValueError:
        value = text
    try:
        parse_budget(value, 1 << 40)
    except ValueError as exc:
        raise CLIError(f"--budget {text!r}: {exc}") from None
    return value


def checkpoint_config(policy: str, budget_text: Optional[str]):
    """The CheckpointConfig of --checkpoint / --budget, or None for 'none' without a budget."""
    from lowcost.checkpoint import CheckpointConfig
    if policy not in POLICIES:
        raise CLIError(f"--checkpoint {policy!r}: unknown policy; expected one of {', '.join(POLICIES)} "
                       "(or --budget SIZE)")
    value = budget(budget_text)
    if value is not None:
        if policy not in ("full", "none"):
            raise CLIError(f"--budget picks the policy per block; leave --checkpoint at its default (got {policy!r})")
        return CheckpointConfig(budget=value)
    return None if policy == "none" else CheckpointConfig(policy=policy)


def lora_config(args):
    from lowcost.api import LoRAConfig
    targets = args.targets
    if "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        return LoRAConfig(r=args.lora_r, alpha=args.alpha, dropout=args.dropout, targets=targets,
                          backend=args.backend)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"LoRA options: {exc}") from None


def check_model_path(path: str) -> None:
    """Fails fast on a missing path or a hub id (lowcost never downloads)."""
    from lowcost.models.loading import resolve
    try:
        resolve(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--model {path}: {exc}") from None


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="hold the frozen base quantized, quantizing while loading (streaming): nf4, int8, or "
                             "gguf (a .gguf file's blocks kept as they are); LoRA trains on top (default: dense)")


def check_quantize(scheme: Optional[str], model_path: str) -> None:
    """--quantize names a scheme load_pretrained takes, and 'gguf' a .gguf model (checked before loading)."""
    if scheme is None:
        return
    if scheme not in QUANTIZE:
        raise CLIError(f"--quantize {scheme!r}: expected one of {', '.join(QUANTIZE)}")
    if scheme == "gguf":
        from lowcost.models.loading import resolve
        if resolve(model_path)[0] != "gguf":
            raise CLIError(f"--quantize gguf keeps a .gguf file's blocks, but --model {model_path} is not a .gguf "
                           "file (use --quantize nf4 or int8)")


def check_new_tokens_base(model, quantize: Optional[str]) -> None:
    """--new-tokens grows the token embedding, which must then be dense (not a GGUF file's blocks)."""
    from lowcost.nn.quantized import QuantizedEmbedding
    if any(isinstance(m, QuantizedEmbedding) for m in model.modules()):
        raise CLIError(f"--new-tokens with --quantize {quantize}: the token embedding is held quantized (the file's "
                       "blocks) and cannot grow; use --quantize nf4 or int8, which keep the embedding dense")


def load_model(path: str, dtype_name: str, dev: torch.device, quantize: Optional[str] = None):
    """(model on ``dev``, frozen, tokenizer); errors name --model (--quantize for a format it cannot keep)."""
    from lowcost.models import load_pretrained, load_tokenizer
    try:
        model = load_pretrained(path, dtype=DTYPES[dtype_name], quantize=quantize)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        where = f"--quantize {quantize} (--model {path})" if quantize and "quantize" in str(exc) else f"--model {path}"
        raise CLIError(f"{where}: {exc}") from None
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise CLIError(f"--model {path}: {type(model).__name__} is not a causal language model")
    if not getattr(tokenizer, "is_fast", False):
        raise CLIError(f"--model {path}: its tokenizer is not a fast (Rust) tokenizer; character offsets are needed")
    return model.to(dev), tokenizer


def max_positions(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model, seq_len: int) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise CLIError(f"--seq-len {seq_len}: beyond the model's {limit} positions")


def positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise CLIError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
