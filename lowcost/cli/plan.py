"""Predict a fine-tuning step's peak memory, cheapest GPU and time before you spend money.

    lowcost plan --model PATH|config.json --seq-len 2048 --batch 1 [--lora-r 16] [--checkpoint selective]
                 [--quantize nf4|nf4-dq|int8] [--gpu "H100 80GB"] [--json]

Runs the real lowcost code (model from its config, lowcost.apply with LoRA and each checkpoint policy, one
forward + backward) on fake tensors: no weights are read and no GPU is needed. Compares full fine-tuning,
LoRA, and LoRA with each checkpoint policy; for each names the cheapest GPU of the price table that holds
it and ESTIMATES the time per step from its FLOPs. ``--quantize`` adds LoRA on a quantized frozen base (the
codes and scales, the dequantization workspace and FLOPs) with each policy. A Llama-3-8B config ships with lowcost:
lowcost/plan/data/configs/llama-3-8b.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowcost.cli import CLIError

QUANTIZE = ("nf4", "nf4-dq", "int8")
POLICIES = ("none", "full", "every_k", "sqrt", "selective", "offload")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config.json, an HF model directory, or a .gguf file")
    parser.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", type=_positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--lora-r", type=_positive_int, default=16, help="LoRA rank (default 16; alpha = 2r)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--checkpoint", default=None, metavar="POLICY",
                        help=f"your checkpoint policy, marked * in the table: {', '.join(POLICIES)}")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="also plan LoRA on a quantized base: nf4, nf4-dq (double-quantized absmax) or int8")
    parser.add_argument("--k", type=_positive_int, default=2, help="every_k: checkpoint every k-th block")
    parser.add_argument("--dtype", default=None, help="weights' dtype: bf16, fp16, fp32 (default: the config's)")
    parser.add_argument("--gpu", default=None, metavar="NAME", help="judge this GPU of the table (name or prefix)")
    parser.add_argument("--gpus", default=None, metavar="FILE", help="your own price table (same shape as the "
                        "shipped lowcost/plan/data/gpus.json)")
    parser.add_argument("--headroom", type=_fraction, default=0.1,
                        help="memory left free for what the plan does not trace (default 0.1)")
    parser.add_argument("--utilization", type=_fraction, default=0.4,
                        help="fraction of the bf16 peak the time estimate assumes (default 0.4)")
    parser.add_argument("--exact", action="store_true", help="trace every block instead of extending two "
                        "shallow traces (slower, same figures)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _model_path(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists():
        return path
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        raise CLIError(f"--model {text!r} is not a local path (a hub id? lowcost plan works offline: pass a "
                       f"config.json or a downloaded model directory)")
    raise CLIError(f"--model {text!r}: no such file or directory")


def _check(args, config) -> None:
    if args.checkpoint is not None and args.checkpoint not in POLICIES:
        hint = " (budget needs a measured profiling step; plan the fixed policies)" if args.checkpoint == "budget" else ""
        raise CLIError(f"--checkpoint {args.checkpoint!r} is not a policy; expected one of {', '.join(POLICIES)}{hint}")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and args.seq_len > limit:
        raise CLIError(f"--seq-len {args.seq_len} is beyond the model's {limit} positions (max_position_embeddings)")
    if not 0.0 <= args.dropout < 1.0:
        raise CLIError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.quantize is not None and args.quantize not in QUANTIZE:
        why = " (GGUF blocks depend on the file's tensor types, which a config does not say)" \
            if args.quantize == "gguf" else ""
        raise CLIError(f"--quantize {args.quantize!r}: expected one of {', '.join(QUANTIZE)}{why}")
    if args.dtype is not None and args.dtype.lower() not in DTYPES:
        raise CLIError(f"--dtype {args.dtype!r}: expected bf16, fp16 or fp32")


def run(args: argparse.Namespace) -> int:
    import torch

    from lowcost.api import LoRAConfig
    from lowcost.plan import config_dtype, load_config, load_table, plan

    path = _model_path(args.model)
    try:
        config = load_config(path)
        table = load_table(args.gpus)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    _check(args, config)
    if not hasattr(config, "num_hidden_layers"):
        raise CLIError(f"{path}: the config names no num_hidden_layers; lowcost plan handles decoder LMs")
    dtype = getattr(torch, DTYPES[args.dtype.lower()]) if args.dtype else config_dtype(config)
    adapter = torch.float32 if dtype != torch.float32 else None
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=args.dropout, adapter_dtype=adapter)
    progress = None if args.json else (lambda s: print(f"  tracing {s.name} ...", file=sys.stderr, flush=True))
    try:
        result = plan(config, str(path), args.batch, args.seq_len, dtype, lora, checkpoint=args.checkpoint,
                      k=args.k, table=table, gpu=args.gpu, headroom=args.headroom, utilization=args.utilization,
                      exact=args.exact, progress=progress, quantize=args.quantize)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0
