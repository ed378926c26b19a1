"""Refine new token rows so that the model with the new tokenizer scores text as the old one did.

A new token ``w`` replaces a run of old pieces ``p1 … pk``. A sub-token mean is a fair start for the input
side but a poor one for the output side: ``h·mean(e_p)`` averages the pieces' logits, so where the model
expects the word (``h·e_p1`` high) ``w`` gets a logit far below what the whole word deserves. This module
fits only the new rows (the rest of the model is untouched) against the *original model as teacher*, on
domain text the user supplies (their fine-tuning text, never evaluation text):

Both tokenisations of a chunk are aligned by character end offsets. Student position ``j`` (new tokens)
and teacher position ``i`` (old tokens) are aligned when they end at the same character; then

- ``log p_S(n_{j+1} | ·)`` — the student's log-probability of its next token — should equal the teacher's
  log-probability of the same characters, ``Σ_t log p_T(o_{t+1} | ·)`` over the old tokens spanning them
  (a new word's target is its pieces' joint probability; an old token's target is its own probability, so a
  new row that steals probability elsewhere is penalised too): squared error;
- the student's distribution over the *old* vocabulary, renormalised, should equal the teacher's:
  ``KL(p_T || p_S|old)`` (keeps what follows a new token as the old context would make it).

Loss = mean squared log-prob error + mean KL over aligned positions. Gradients reach the table only through
the new rows (input lookups and, when tied or on the untied head, their logits); the update is Adam on
those rows alone, so no optimizer state for the rest of the table is ever allocated. The teacher is the same
model run on the old token ids, which never read a new row, so no copy of the model is needed.

Early stopping. Part of the chunks (every fifth by default) is held out: before training and a few times
per epoch the new-tokenizer NLL of those chunks is measured, training stops when it stops improving, and
the rows that scored best are kept — the starting rows (the sub-token mean) when nothing improved on them.
So the result is never worse than its start on text the distillation did not train on.

This is a short distillation, not training on the text: the targets are the original model's own
probabilities, so the refined model approximates the original one rather than the text.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass
class _Chunk:
    old_ids: torch.Tensor       # (1, To + 1) with the start token
    new_ids: torch.Tensor       # (1, Tn + 1)
    student_pos: torch.Tensor   # (P,) aligned student positions
    teacher_pos: torch.Tensor   # (P,) the teacher positions they align with
    spans: list                 # per aligned position: teacher positions whose next tokens make up n_{j+1}


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut at spaces into pieces of at most ``max_chars`` characters (a longer word stays whole)."""
    out, current = [], ""
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > max_chars:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [c for c in out + [current] if c.strip()]


def _ends(encoding) -> list[int]:
    return [0] + [end for _, end in encoding["offset_mapping"]]


def align(old_enc, new_enc, start_id: int) -> Optional[_Chunk]:
    """Aligned positions of one chunk's two tokenisations (``tokenizer(text, return_offsets_mapping=True)``)."""
    old_ends, new_ends = _ends(old_enc), _ends(new_enc)
    last_old = {end: i for i, end in enumerate(old_ends)}   # several byte pieces may share an end: take the last
    student, teacher, spans = [], [], []
    for j in range(len(new_ends) - 1):
        if new_ends[j] == new_ends[j + 1] or new_ends[j] not in last_old:
            continue
        i, stop = last_old[new_ends[j]], last_old.get(new_ends[j + 1])
        if stop is None or stop <= i:
            continue
        student.append(j)
        teacher.append(i)
        spans.append(list(range(i, stop)))
    if not student:
        return None
    ids = lambda enc: torch.tensor([[start_id] + list(enc["input_ids"])])  # noqa: E731
    return _Chunk(ids(old_enc), ids(new_enc), torch.tensor(student), torch.tensor(teacher), spans)


def prepare(pieces: Sequence[str], old_encodings: Sequence, new_encode, start_id: int,
            new_ids: set) -> list[_Chunk]:
    """Aligned chunks for the ``pieces`` (text cut by ``split_text``) that contain a new token.

    ``old_encodings[k]`` is the old tokenizer's encoding of ``pieces[k]`` (taken before the tokens were
    added); ``new_encode(text)`` the new tokenizer's; both without special tokens, with ``offset_mapping``.
    """
    chunks = []
    for piece, old_enc in zip(pieces, old_encodings):
        new_enc = new_encode(piece)
        if not new_ids.intersection(new_enc["input_ids"]):
            continue
        chunk = align(old_enc, new_enc, start_id)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


class _RowAdam:
    """Adam over rows ``first:`` of one table: state only for those rows."""

    def __init__(self, table: torch.Tensor, first: int, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.table, self.first, self.lr, self.betas, self.eps = table, first, lr, betas, eps
        rows = table[first:]
        self.m, self.v, self.t = torch.zeros_like(rows, dtype=torch.float32), torch.zeros_like(
            rows, dtype=torch.float32), 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        g = grad.float()
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        rows = self.table[self.first:]
        rows.sub_((self.lr * m_hat / (v_hat.sqrt() + self.eps)).to(rows.dtype))


def chunk_loss(model: nn.Module, chunk: _Chunk, old_vocab: int) -> torch.Tensor:
    """Squared log-prob error + KL on the aligned positions of one chunk (see the module docstring).

    Teacher log-probs ``T = log_softmax(model(old_ids)[..., :old_vocab])`` (no grad: the old model); student ``S = log_softmax(model(new_ids))``.
    For aligned (j, i) with span ``i … i'-1``: ``target_j = Σ_{t=i}^{i'-1} T[t, o_{t+1}]``,
    ``err_j = S[j, n_{j+1}] − target_j``; ``KL_j = Σ_v e^{T[i,v]} (T[i,v] − S̃[j,v])`` with ``S̃`` the student's
    log_softmax over the first ``old_vocab`` logits. Loss = mean_j err_j² + mean_j KL_j.
    """
    with torch.no_grad():
        teacher = torch.log_softmax(model(chunk.old_ids).logits[0, :, :old_vocab].float(), dim=-1)
        old_next = chunk.old_ids[0, 1:]
        token_lp = teacher[torch.arange(old_next.numel()), old_next]
        target = torch.stack([token_lp[span].sum() for span in chunk.spans])
        t_rows = teacher[chunk.teacher_pos]
    logits = model(chunk.new_ids).logits[0, chunk.student_pos].float()
    student = torch.log_softmax(logits, dim=-1)
    next_ids = chunk.new_ids[0, chunk.student_pos + 1]
    err = student.gather(1, next_ids[:, None])[:, 0] - target
    s_old = torch.log_softmax(logits[:, :old_vocab], dim=-1)
    kl = (t_rows.exp() * (t_rows - s_old)).sum(-1)
    return err.pow(2).mean() + kl.mean()


def split_held_out(chunks: list[_Chunk], fraction: float) -> tuple[list[_Chunk], list[_Chunk]]:
    """(train, held out): every ``round(1/fraction)``-th chunk is held out (at least one when there are two
    or more chunks and ``fraction`` > 0), spread over the text rather than taken from its end."""
    if fraction <= 0 or len(chunks) < 2:
        return list(chunks), []
    step = max(2, round(1 / fraction))
    held = [c for i, c in enumerate(chunks) if i % step == step - 1] or [chunks[-1]]
    held_ids = {id(c) for c in held}
    return [c for c in chunks if id(c) not in held_ids], held


@torch.no_grad()
def held_out_nll(model: nn.Module, chunks: list[_Chunk]) -> float:
    """Total next-token NLL (nats) of ``chunks`` with the new tokenizer: what the new rows are judged by."""
    total = 0.0
    for chunk in chunks:
        ids = chunk.new_ids
        logits = model(ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    return total


class _BestRows:
    """The new rows with the lowest held-out NLL seen so far (the starting rows first)."""

    def __init__(self, tables: Sequence[nn.Parameter], first: int, nll: float):
        self.tables, self.first = tables, first
        self.rows = [t.data[first:].clone() for t in tables]
        self.nll, self.at = nll, 0

    def offer(self, nll: float, step: int) -> bool:
        if nll >= self.nll:
            return False
        self.rows = [t.data[self.first:].clone() for t in self.tables]
        self.nll, self.at = nll, step
        return True

    @torch.no_grad()
    def restore(self) -> None:
        for t, rows in zip(self.tables, self.rows):
            t.data[self.first:] = rows


def distill_rows(model: nn.Module, tables: Sequence[nn.Parameter], first: int, chunks: list[_Chunk], *,
                 epochs: int = 1, lr: Optional[float] = None, progress: bool = True, holdout: float = 0.2,
                 eval_every: Optional[int] = None, patience: int = 2) -> dict:
    """Adam on rows ``first:`` of each of ``tables`` (the input embedding, plus the head when untied) over
    ``chunks`` for ``epochs``; rows ``:first`` and every other parameter are never written.

    Early stopping: a ``holdout`` fraction of the chunks (``split_held_out``) is never trained on; the
    new-tokenizer NLL of those chunks (``held_out_nll``) is measured before training and every
    ``eval_every`` training chunks (default: four times per epoch) and at the end; training stops after
    ``patience`` measurements without improvement, and the rows with the lowest held-out NLL are the ones
    kept — the starting rows when no step improved on them. So on the held-out chunks the result is never
    worse than the start. ``holdout=0`` trains on every chunk for ``epochs`` with no check.

    ``lr`` defaults to 0.05 × the RMS of the first table's old rows (an embedding-scale step). Returns the
    mean loss over the first and over the last epoch run, and the held-out NLL at the start and as kept.
    Training and ``requires_grad`` flags are restored.
    """
    if not chunks:
        return {"chunks": 0, "epochs": 0}
    train, held = split_held_out(chunks, holdout)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    step = lr if lr is not None else 0.05 * float(tables[0].data[:first].float().pow(2).mean().sqrt())
    optimizers = [_RowAdam(t.data, first, step) for t in tables]
    every = eval_every or max(1, -(-len(train) // 4))
    model.eval()
    fitted = {id(t) for t in tables}
    for p in model.parameters():
        p.requires_grad_(id(p) in fitted)
    best = _BestRows(tables, first, held_out_nll(model, held)) if held else None
    start_nll = best.nll if best else None
    history, seen, misses, stopped = [], 0, 0, False
    try:
        for epoch in range(epochs):
            total = 0.0
            for n, chunk in enumerate(train):
                for t in tables:
                    t.grad = None
                loss = chunk_loss(model, chunk, first)
                loss.backward()
                for t, adam in zip(tables, optimizers):
                    adam.step(t.grad[first:])
                total += float(loss.detach())
                seen += 1
                if best is not None and (seen % every == 0 or n + 1 == len(train)):
                    misses = 0 if best.offer(held_out_nll(model, held), seen) else misses + 1
                    stopped = misses >= patience
                if progress and ((n + 1) % 10 == 0 or n + 1 == len(train) or stopped):
                    held_text = f", held-out NLL {best.nll:.1f} (start {start_nll:.1f})" if best else ""
                    print(f"\r  distil new tokens: epoch {epoch + 1}/{epochs}, chunk {n + 1}/{len(train)}, "
                          f"loss {total / (n + 1):.4f}{held_text}", end="", file=sys.stderr, flush=True)
                if stopped:
                    break
            history.append(total / (n + 1))
            if stopped:
                break
        if progress:
            print(file=sys.stderr)
    finally:
        if best is not None:
            best.restore()
        for t in tables:
            t.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    out = {"chunks": len(chunks), "train_chunks": len(train), "held_out_chunks": len(held), "epochs": epochs,
           "lr": step, "loss_first_epoch": history[0], "loss_last_epoch": history[-1], "trained_chunks": seen}
    if best is not None:
        out.update(held_out_nll_start=start_nll, held_out_nll=best.nll, kept_after_chunks=best.at,
                   stopped_early=stopped)
    return out
