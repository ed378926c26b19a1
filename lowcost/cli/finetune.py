"""Fine-tune a causal language model with fused LoRA, lowcost's checkpointing and optional new tokens.

    lowcost finetune --model PATH --data FILE --out DIR [options]

PATH is an HF-layout directory (config.json + *.safetensors) or a .gguf file; nothing is downloaded.
--quantize nf4|int8|gguf holds the frozen base quantized (load_pretrained(quantize=...), one tensor at a time).
FILE is plain text (.txt, packed into --seq-len windows) or JSON Lines with {"text"}, {"prompt",
"response"} or {"messages": [...]} records (chats use the tokenizer's chat template; the loss counts the
responses only). A held-out part (--eval-fraction) gives loss, perplexity and nats per character.
DIR receives run.json, checkpoints/ (every --save-every steps: adapter, optimizer, scheduler, RNG state and
data position, written atomically), adapter/ (PEFT layout), metrics.json and loss.png.
--resume continues the run in DIR from its last checkpoint with the same loss curve as an uninterrupted run
(at another torchrun world size too, to fp32 rounding, unless LoRA dropout is on: its masks cannot continue).
Under torchrun --nproc_per_node N (lowcost finetune or python -m lowcost finetune) the N processes train with
DDP on the same global batches as one process (--batch is global; N must divide it); rank 0 prints and writes.
--distributed fsdp shards with FSDP2 instead. --mixed-precision bf16 computes in bf16 on fp32 parameters (FSDP2's
MixedPrecisionPolicy when sharded, torch.autocast in one process and under DDP).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

from lowcost.cli import CLIError
from lowcost.cli import _options as opt

# Options that must not change when a run is resumed (they change the loss curve).
SAME_ON_RESUME = ("model", "data", "lora_r", "alpha", "targets", "dropout", "steps", "epochs", "lr", "warmup",
                  "seq_len", "batch", "grad_accum", "max_grad_norm", "new_tokens", "seed", "eval_fraction",
                  "skip_bad_lines", "dtype", "quantize", "mixed_precision")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-layout directory or .gguf file (local)")
    parser.add_argument("--data", required=True, help=".txt or .jsonl training data")
    parser.add_argument("--out", required=True, help="output directory")
    opt.add_lora_arguments(parser)
    opt.add_quantize_argument(parser)
    group = parser.add_argument_group("training")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs 1)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    group.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    group.add_argument("--warmup", type=int, default=None, help="linear warm-up steps before the cosine decay "
                       "(default 5%% of the steps)")
    group.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    group.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout (default 0)")
    group.add_argument("--new-tokens", default=None, metavar="FILE",
                       help="words to add as single tokens, one per line (warm-started from their sub-tokens)")
    group.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data (default 0.05)")
    group.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 5 times)")
    group.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: 10 times)")
    group.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines (counted)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace the run held in --out")
    opt.add_device_arguments(parser)
    parser.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"),
                        help="under torchrun: DistributedDataParallel (default) or FSDP2 (fully_shard per block)")
    parser.add_argument("--mixed-precision", default=None, choices=("bf16",),
                        help="compute in bf16, keep fp32 parameters, gradients and adapters (torch.autocast; "
                             "FSDP2's MixedPrecisionPolicy with --distributed fsdp); default: fp32")


def _check_numbers(args) -> None:
    for name in ("steps", "epochs", "warmup", "eval_every", "save_every"):
        opt.positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=name in ("steps", "warmup"))
    for name in ("lora_r", "seq_len", "batch", "grad_accum", "lr"):
        opt.positive(f"--{name.replace('_', '-')}", getattr(args, name))
    opt.positive("--max-grad-norm", args.max_grad_norm, allow_zero=True)
    if args.seq_len < 2:
        raise CLIError(f"--seq-len must be at least 2, got {args.seq_len}")


def _options_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "run" and not callable(v)}


def _check_resume(out: Path, args) -> None:
    from lowcost.cli._rundir import RUN_FILE
    saved = json.loads((out / RUN_FILE).read_text())["options"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {getattr(args, k)!r}" for k in SAME_ON_RESUME
               if saved.get(k) != getattr(args, k)]
    if changed:
        raise CLIError(f"--resume: options differ from the run in {out}: {'; '.join(changed)}")


def _validate(args):
    """Everything that can be checked before loading the model; returns (device, lora cfg, ckpt cfg, data,
    words)."""
    from lowcost.cli._data import read_data, read_words
    from lowcost.cli._rundir import check_out
    _check_numbers(args)
    dev = opt.device(args.device)
    lora = opt.lora_config(args)
    checkpoint = opt.checkpoint_config(args.checkpoint, args.budget)
    opt.check_backend(args.backend, dev, args.lora_r)
    out = Path(args.out)
    check_out(out, args.overwrite, args.resume)
    if args.resume:
        _check_resume(out, args)
    opt.check_model_path(args.model)
    opt.check_quantize(args.quantize, args.model)
    data = read_data(args.data, args.skip_bad_lines)
    words = read_words(args.new_tokens) if args.new_tokens else None
    return dev, lora, checkpoint, data, words


def run(args: argparse.Namespace) -> int:
    from lowcost.cli import _distributed_run as dist_run
    _check_numbers(args)
    dist_run.check_mixed_precision(args.mixed_precision, args.dtype)
    ranks, rank_device = dist_run.start(args.device, args.batch, args.distributed)   # torchrun: join the group
    try:
        with dist_run.quiet_unless_main(ranks):
            return _run(args, ranks, rank_device)
    finally:
        dist_run.stop(ranks)


def _run(args: argparse.Namespace, ranks, rank_device) -> int:
    import torch
    from lowcost.cli import _distributed_run as dist_run
    from lowcost.cli import _finetune_run as job
    from lowcost.cli._rundir import checkpoints
    from lowcost.patch.ranks import barrier
    started = time.perf_counter()
    dev, lora, checkpoint, data, words = _validate(args)
    dev = rank_device                              # under torchrun: cuda:LOCAL_RANK on GPUs
    dist_run.check_autocast_device(args.mixed_precision, dev)
    if data.skipped:
        print(f"skipped {data.skipped} bad line(s) of {data.path} (first: {data.first_skipped})")
    out = Path(args.out)
    resuming = args.resume and bool(checkpoints(out))
    barrier()                                      # every rank has checked --out before rank 0 writes there
    if args.overwrite and ranks.main:
        from lowcost.cli._rundir import clear_outputs
        clear_outputs(out)
    torch.manual_seed(args.seed)
    model, tokenizer = opt.load_model(args.model, args.dtype, dev, args.quantize)
    opt.check_seq_len(model, args.seq_len)
    if words and args.quantize:
        opt.check_new_tokens_base(model, args.quantize)
    fresh = not resuming
    setup = job.prepare(args, model, tokenizer, data, words, dev, fresh, ranks if ranks.world > 1 else None)
    setup.forward_context = dist_run.forward_context(args.mixed_precision, ranks, dev)
    job.patch(args, setup, lora, checkpoint)
    from lowcost.cli._measure import trainable
    setup.counts = trainable(model)
    setup.trained = dist_run.wrap(model, ranks, dev, args.mixed_precision)
    setup.params = [p for p in model.parameters() if p.requires_grad]   # FSDP2 replaced them by DTensors
    if not args.resume and ranks.main:
        from lowcost.cli._rundir import RUN_FILE, write_file
        run_info = {"options": _options_of(args), "python": platform.python_version(),
                    "torch": torch.__version__, "pid": os.getpid(), "world_size": ranks.world}
        write_file(out / RUN_FILE, json.dumps(run_info, indent=1, default=str) + "\n")
    metrics = job.train(args, setup, out)
    metrics["seconds"] = time.perf_counter() - started
    job.publish_adapter(setup, out)                # every rank (FSDP2 gathers); rank 0 writes
    if ranks.main:                                 # the other outputs: rank 0 alone
        metrics["world_size"] = ranks.world
        job.finish(args, setup, out, metrics)
        print(job.summary(setup, metrics, out))
    return 0


def total_steps(args, micro_batches_per_epoch: int) -> int:
    if args.steps is not None:
        return args.steps
    epochs = 1.0 if args.epochs is None else args.epochs
    return max(1, math.ceil(epochs * micro_batches_per_epoch / args.grad_accum))
