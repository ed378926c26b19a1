"""The main job on the embedded default: fine-tune a small frozen model with fused LoRA, offline.

    python -m lowcost.cli.demo [--steps 150] [--out demo_out]

1. "Pretrain" a small character-level transformer LM on one real text that ships with Python
   (the source of the standard library's ``json`` package), then freeze it: the open-weights stand-in.
2. Swap every linear of its blocks for ``lowcost.LoRALinear`` (r=8, dropout 0.05) and fine-tune only the
   adapters on a different real text (the source of ``textwrap``).
3. Print the held-out loss on the new text before/after and the trainable-parameter fraction, and draw
   the loss curve (``<out>/loss.png``).
Until the SmolLM2 demo lands (CLI issue) this is the end-to-end check that the fused op trains a model.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

from lowcost.nn import LoRALinear
from lowcost.ops import resolve_backend

CONTEXT = 64


def corpus(module) -> str:
    files = sorted(Path(inspect.getfile(module)).parent.glob("*.py")) if module.__file__.endswith("__init__.py") \
        else [Path(inspect.getfile(module))]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


class Block(nn.Module):
    """Pre-norm transformer block with plain linears (q/k/v fused, out, MLP up/down): all LoRA-able."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h):
        B, T, C = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.heads, C // self.heads).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2), is_causal=True)
        h = h + self.out(attn.transpose(1, 2).reshape(B, T, C))
        return h + self.down(nn.functional.gelu(self.up(self.norm2(h))))


class TinyLM(nn.Module):
    """Character LM: embedding → pre-norm blocks → tied head."""

    def __init__(self, vocab: int, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.t()


def batches(ids: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (batch,), generator=generator)
        window = torch.stack([ids[s: s + CONTEXT + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def loss_of(model, tokens, targets):
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def train(model, params, data, steps: int, lr: float, label: str) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of(model, *next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"  [{label}] step {step:4d}/{steps}  loss {loss.item():.3f}  "
                  f"{(time.perf_counter() - start) / step * 1e3:.0f} ms/step", flush=True)
    return losses


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor) -> float:
    model.eval()
    n = (len(ids) - 1) // CONTEXT
    tokens = ids[: n * CONTEXT].reshape(n, CONTEXT)[:64]
    targets = ids[1: n * CONTEXT + 1].reshape(n, CONTEXT)[:64]
    value = loss_of(model, tokens, targets).item()
    model.train()
    return value


def adapt(model: TinyLM, r: int, dropout: float) -> int:
    """Replace every linear of every block by LoRALinear; returns how many were swapped."""
    count = 0
    for block in model.blocks:
        for name in ("qkv", "out", "up", "down"):
            setattr(block, name, LoRALinear.from_linear(getattr(block, name), r=r, alpha=2 * r, dropout=dropout))
            count += 1
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="demo_out")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    source, target = corpus(json), corpus(textwrap)
    vocab = sorted(set(source + target))
    encode = lambda text: torch.tensor([vocab.index(c) for c in text])  # noqa: E731
    source_ids, target_ids = encode(source), encode(target)
    split = int(0.9 * len(target_ids))
    gen = torch.Generator().manual_seed(0)
    print(f"base text: json package source ({len(source)} chars); fine-tune text: textwrap source "
          f"({len(target)} chars); vocabulary {len(vocab)} characters")

    model = TinyLM(len(vocab))
    print("1. pretraining the base model (stand-in for open weights)")
    train(model, model.parameters(), batches(source_ids, 32, gen), args.pretrain_steps, 3e-3, "pretrain")
    model.requires_grad_(False)
    before = held_out_loss(model, target_ids[split:])

    swapped = adapt(model, r=8, dropout=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    print(f"2. fine-tuning {swapped} fused LoRA layers: {n_train:,} trainable of {n_all:,} parameters "
          f"({100 * n_train / n_all:.1f}%), backend {resolve_backend(None, torch.device('cpu'))}")
    losses = train(model, trainable, batches(target_ids[:split], 32, gen), args.steps, 3e-3, "lora")
    after = held_out_loss(model, target_ids[split:])
    print(f"3. held-out loss on the new text: {before:.3f} → {after:.3f} "
          f"(perplexity {math.exp(before):.1f} → {math.exp(after):.1f})")
    _plot(losses, Path(args.out))
    return 0


def _plot(losses: list[float], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tune (fused op) of a frozen char LM")
    fig.tight_layout()
    path = out / "loss.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    print(f"loss curve: {path}")


if __name__ == "__main__":
    main()
