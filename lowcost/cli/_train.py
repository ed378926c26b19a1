"""The training loop shared by ``lowcost finetune`` and ``lowcost demo``.

Determinism (what makes ``--resume`` reproduce an uninterrupted run exactly): the order of the data is a
pure function of (seed, epoch) — micro-batch k is slice k mod n of that epoch's permutation — so a resumed
run only needs the step number; dropout draws from torch's global generator, whose state is saved with every
checkpoint; held-out evaluation and any measurement run inside ``torch.random.fork_rng`` so they never
move that generator.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch's mean loss is weighted by its share
of the step's target tokens, so the step's loss is the mean over all its target tokens whatever the padding.
Learning rate: linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0 at ``total_steps``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowcost.cli._encode import IGNORE, Sequence, collate
from lowcost.cli._measure import memory_text


class Batches:
    """Micro-batch k of an endless, epoch-wise shuffled stream over ``sequences``."""

    def __init__(self, sequences: list[Sequence], batch: int, seed: int, pad_id: int):
        self.sequences, self.batch, self.seed, self.pad_id = sequences, batch, seed, pad_id
        self.per_epoch = math.ceil(len(sequences) / batch)
        self._order: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = {epoch: torch.randperm(len(self.sequences), generator=gen).tolist()}
        return self._order[epoch]

    def micro(self, k: int) -> dict:
        epoch, index = divmod(k, self.per_epoch)
        order = self._permutation(epoch)
        return collate([self.sequences[i] for i in order[index * self.batch:(index + 1) * self.batch]], self.pad_id)


class WarmupCosine:
    """lr factor at step s: s/warmup during warm-up, then 0.5·(1 + cos(π·progress)) down to 0."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Plan:
    total_steps: int
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0


@dataclass
class History:
    """Per step: training loss, learning rate, target tokens, seconds; evaluations at chosen steps."""
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    evals: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls(**{k: list(data.get(k, [])) for k in cls().__dict__})


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "chars"}


def make_optimizer(params: list, plan: Plan):
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(plan.warmup, plan.total_steps))
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: torch.device, progress: Optional[str] = None,
             ranks=None) -> dict:
    """Held-out loss (mean NLL per target token), perplexity and NLL per character of the covered text.
    ``progress``: a label for a progress bar over the batches. ``ranks`` (``_distributed_run.Ranks``): each
    rank evaluates its rows of every batch and the sums are all-reduced (every rank must call it)."""
    was_training = model.training
    model.eval()
    nll = tokens = chars = 0.0
    if progress is not None:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=progress, unit="batch", dynamic_ncols=True, leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in batches:
                batch = ranks.split(batch) if ranks is not None else batch
                inputs = to_device(batch, device)
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                labels = inputs["labels"][:, 1:]
                losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                         ignore_index=IGNORE, reduction="none")
                nll += float(losses.sum())
                mask = labels != IGNORE
                tokens += float(mask.sum())
                chars += float((batch["chars"][:, 1:].to(device) * mask).sum())
    finally:
        model.train(was_training)
    if ranks is not None:
        nll, tokens, chars = ranks.sum([nll, tokens, chars])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "nats_per_char": nll / chars if chars else float("nan"), "tokens": int(tokens), "chars": int(chars)}


def _targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _no_target_loss(model, inputs: dict) -> torch.Tensor:
    """A zero loss with a (zero) gradient for every parameter: a rank whose rows hold no target token still
    runs forward and backward, as DDP needs (HF's mean over no tokens would be 0/0)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return logits.float().sum() * 0.0


def train_step(model, micro_batches: list[dict], device, first_forward: Optional[Callable] = None,
               ranks=None) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches; returns (step loss, target tokens).

    ``ranks`` (``_distributed_run.Ranks``): the micro-batches are global; this rank runs its rows, its
    mean loss weighted by its share of the step's targets times the world size (DDP averages gradients)."""
    total = max(1, sum(_targets(b) for b in micro_batches))
    world = ranks.world if ranks is not None else 1
    step_loss = 0.0
    for i, batch in enumerate(micro_batches):
        local = ranks.split(batch) if ranks is not None else batch
        inputs = to_device(local, device)
        if _targets(local) == 0:
            forward = lambda: _no_target_loss(model, inputs)  # noqa: E731
        else:
            forward = lambda: model(**inputs).loss  # noqa: E731
        loss = first_forward(forward) if (first_forward is not None and i == 0) else forward()
        loss = loss * (_targets(local) / total)
        (loss * world if world > 1 else loss).backward()
        step_loss += float(loss.detach())
    if world > 1:
        step_loss = ranks.sum([step_loss])[0]
    return step_loss, total


def run(model, params: list, batches: Batches, plan: Plan, optimizer, scheduler, device: torch.device,
        history: History, start_step: int = 0, evaluate_held_out: Optional[Callable] = None,
        save: Optional[Callable] = None, first_forward: Optional[Callable] = None, label: str = "train",
        ranks=None) -> History:
    """Runs steps ``start_step`` … ``plan.total_steps - 1``; calls ``evaluate_held_out(step)`` and
    ``save(step)`` (after the step, ``step`` counted from 1) when due and at the end. ``ranks``: see
    ``train_step``; the progress bar is shown on rank 0 only."""
    from tqdm.auto import tqdm
    model.train()
    quiet = {"disable": True} if ranks is not None and not ranks.main else {}
    bar = tqdm(total=plan.total_steps, initial=start_step, desc=label, unit="step", dynamic_ncols=True, **quiet)
    try:
        for step in range(start_step, plan.total_steps):
            start = time.perf_counter()
            micro = [batches.micro(step * plan.grad_accum + i) for i in range(plan.grad_accum)]
            loss, tokens = train_step(model, micro, device, first_forward if step == start_step else None, ranks)
            if plan.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            for key, value in (("step", step + 1), ("loss", loss), ("lr", lr), ("tokens", tokens),
                               ("seconds", seconds)):
                getattr(history, key).append(value)
            bar.update(1)
            rate = tokens / seconds
            rate_text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2g}"
            bar.set_postfix_str(f"loss {loss:.4f}, {rate_text} tok/s, {memory_text(device)}")
            done = step + 1
            if evaluate_held_out is not None and (done == plan.total_steps or
                                                  (plan.eval_every and done % plan.eval_every == 0)):
                history.evals.append({"step": done, **evaluate_held_out(done)})
            if save is not None and (done == plan.total_steps or (plan.save_every and done % plan.save_every == 0)):
                save(done)
    finally:
        bar.close()
    return history
