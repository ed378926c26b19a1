"""Add a domain vocabulary to a tokenizer and initialise each new token from the pieces the old tokenizer
split it into.

``init="subword-mean"`` (default): row = mean of the piece rows, on the input side and, when the output
head is not tied, on the output side (bias: the same mean). ``init="distill"``: the sub-token mean, then
refined against the original model on domain text the caller passes as ``texts`` (``token_distill``: the
new rows only, so that the new tokenizer's model gives each span of text the probability the old one gave
it; causal LMs). Part of ``texts`` is held out and the rows that score it best are kept, so distillation
never leaves the model worse than the sub-token mean on that part. Tied tables stay tied: the
resize re-ties them and one write fills both. ``init="random"`` (normal, ``config.initializer_range``) and
``init="mean-resize"`` (transformers' default: a draw from the old rows' mean and covariance) are there for
comparison.

The mean is plain by default (``tilt=0``): measured on SmolLM2 with two domains (Lee news and Wikipedia,
``benchmarks/bench_warmstart.py``), a tilt towards the first piece did not do better on either. No two new rows
identical: rows that coincide (words made of the same pieces in another order with ``tilt=0``, or words
differing only in characters the tokenizer normalises away) get a tiny deterministic jitter, 1e-3 of the
table's standard deviation drawn from ``seed``, and are counted as ``jittered``; ``tilt > 0`` weights the
pieces by position instead, so permuted pieces give different rows.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from lowcost.warmstart import token_distill
from lowcost.warmstart.report import NewSlice, WarmstartReport
from lowcost.warmstart.tables import tables, word_start_marker

_INITS = ("subword-mean", "distill", "random", "mean-resize")


def _piece_weights(k: int, tilt: float) -> torch.Tensor:
    """Weights for ``k`` pieces: uniform tilted linearly towards the first piece by ``tilt``; sum 1.

    A tilt makes the weights position-aware (words with permuted pieces get different rows) and leans on
    the first piece, which a left-to-right model predicts when the word starts. ``tilt=0`` is the plain mean.
    """
    if k == 1:
        return torch.ones(1)
    ramp = torch.linspace(1.0, -1.0, k)
    weights = 1.0 + tilt * ramp
    return weights / weights.sum()


def _surface(word: str, marker: Optional[str], leading_space: Optional[bool]) -> str:
    space = marker is not None if leading_space is None else leading_space
    return (" " + word) if space and not word.startswith(" ") else word


def _split(tokenizer, words: Iterable[str], marker, leading_space) -> tuple[list, list, list]:
    """(new surfaces, their old piece ids, words that are already one token)."""
    texts, pieces, existing, seen = [], [], [], set()
    for word in words:
        text = _surface(word, marker, leading_space)
        if text in seen or not word.strip():
            continue
        seen.add(text)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= 1:
            existing.append(word)
        else:
            texts.append(text)
            pieces.append(ids)
    return texts, pieces, existing


def _encode(tokenizer, text: str):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def _added_token(text: str):
    from tokenizers import AddedToken
    return AddedToken(text, single_word=False, lstrip=False, rstrip=False, normalized=False)


@torch.no_grad()
def _fill_mean(table: torch.Tensor, bias: Optional[torch.Tensor], start: int, pieces: list, tilt: float,
               rescale: bool):
    for offset, ids in enumerate(pieces):
        weights = _piece_weights(len(ids), tilt).to(table.dtype)
        row = weights @ table[ids]
        if rescale:
            row = row * (weights @ table[ids].norm(dim=1)) / row.norm().clamp_min(1e-12)
        table[start + offset] = row
        if bias is not None:
            bias[start + offset] = weights @ bias[ids]


@torch.no_grad()
def _fill_random(table: torch.Tensor, start: int, rows: int, std: float, generator: torch.Generator) -> None:
    table[start:start + rows] = torch.randn(rows, table.shape[1], generator=generator).to(table.dtype) * std


@torch.no_grad()
def _dejitter(table: torch.Tensor, start: int, rows: int, scale: float, generator: torch.Generator) -> int:
    """Jitters new rows that equal another new row; returns how many were changed."""
    new = table[start:start + rows]
    _, inverse, counts = torch.unique(new, dim=0, return_inverse=True, return_counts=True)
    duplicate = counts[inverse] > 1
    first = {}
    changed = 0
    for row in range(new.shape[0]):
        if not duplicate[row]:
            continue
        key = int(inverse[row])
        if key not in first:
            first[key] = row
            continue
        noise = torch.randn(new.shape[1], generator=generator).to(new.dtype)
        new[row] += noise * scale
        changed += 1
    return changed


def _resize(model: nn.Module, size: int, init: str) -> None:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.resize_token_embeddings(size, mean_resizing=(init == "mean-resize"))
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, False))


def _start_id(tokenizer) -> int:
    for name in ("bos_token_id", "cls_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise ValueError("init='distill' needs a tokenizer with a bos, cls or eos token to start each chunk")


def _check_distill(model: nn.Module, texts) -> list[str]:
    if texts is None or isinstance(texts, str):
        raise ValueError("init='distill' needs texts=[...]: a list of domain text strings (training text, "
                         "not evaluation text)" + ("; got one string, wrap it in a list" if texts else ""))
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise ValueError(f"init='distill' needs a causal LM (next-token logits); {type(model).__name__} is not "
                         f"one — use init='subword-mean'")
    return texts


def add_tokens(model: nn.Module, tokenizer, words: Iterable[str], init: str = "subword-mean", *,
               leading_space: Optional[bool] = None, tilt: float = 0.0, rescale: bool = False,
               seed: int = 0, texts: Optional[Iterable[str]] = None, epochs: int = 1,
               lr: Optional[float] = None, max_chars: int = 1200, holdout: float = 0.2,
               progress: bool = True) -> WarmstartReport:
    """Adds ``words`` as single tokens to ``tokenizer`` and grows ``model``'s token tables to match.

    Args:
        words: domain words; ones the tokenizer already keeps as one token are reported ``existing``.
        init: "subword-mean", "distill", "random" or "mean-resize" (see the module docstring).
        leading_space: add the word with its leading space (" word", as it appears mid-sentence); default
            when the tokenizer marks word starts ("Ġ", "▁").
        tilt: first-piece emphasis of the sub-token mean (default 0, the plain mean: a tilt of 0.1, the old
            default, measured worse on both Lee news and Wikipedia with SmolLM2, see the module docstring).
        rescale: scale each row to the weighted mean norm of its pieces (measured worse on SmolLM2: the
            mean's smaller norm steals less probability mass; off by default).
        seed: for random init and the anti-collision jitter.
        texts: domain text for ``init="distill"`` (cut into chunks of ≤ ``max_chars`` characters; chunks
            without a new token are skipped); ``epochs``, ``lr`` (default 0.05 × the table's RMS) and
            ``progress`` (a line on stderr) set the distillation; ``holdout`` (default 0.2) is the fraction
            of those chunks kept out of training to pick the rows by (0: no check, train every chunk).
    Returns:
        ``WarmstartReport`` (kind "add_tokens") with ``extra["new_ids"]`` and ``new`` (rows to train first).
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, _INITS))}, not {init!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    corpus = _check_distill(model, texts) if init == "distill" else None
    start_id = _start_id(tokenizer) if corpus is not None else None   # checked before anything changes
    marker = word_start_marker(tokenizer)
    surfaces, pieces, existing = _split(tokenizer, words, marker, leading_space)
    if corpus is not None:  # the old tokenisation, taken before the tokenizer learns the new words
        chunks = [c for text in corpus for c in token_distill.split_text(text, max_chars)]
        old_encodings = [_encode(tokenizer, c) for c in chunks]
    report = WarmstartReport("add_tokens")
    report.count("tokenizer", "existing", len(existing))
    start = tables(model).input.shape[0]
    if len(tokenizer) != start:
        report.notes.append(f"tokenizer has {len(tokenizer)} entries, embedding {start} rows: new ids from "
                            f"{len(tokenizer)}")
    added = tokenizer.add_tokens([_added_token(t) for t in surfaces])
    if added != len(surfaces):
        raise RuntimeError(f"tokenizer added {added} of {len(surfaces)} tokens")
    first_id = len(tokenizer) - added
    if len(tokenizer) > start:             # tables padded beyond the tokenizer already hold the new ids
        _resize(model, len(tokenizer), init)
    tab = tables(model)
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    sides = [(tab.input, None)] + ([] if tab.tied or tab.output is None else [(tab.output, tab.output_bias)])
    for table, bias in sides:
        if init in ("subword-mean", "distill"):
            _fill_mean(table.data, None if bias is None else bias.data, first_id, pieces, tilt, rescale)
        elif init == "random":
            _fill_random(table.data, first_id, added, std, generator)
        scale = 1e-3 * float(table.data[:first_id].std())
        jittered = _dejitter(table.data, first_id, added, scale, generator)
        report.count("tokenizer", "jittered", jittered)
    report.count("tokenizer", "added", added)
    report.count("tokenizer", "sub_token", added if init in ("subword-mean", "distill") else 0)
    if corpus is not None and added:
        aligned = token_distill.prepare(chunks, old_encodings, lambda text: _encode(tokenizer, text),
                                        start_id, set(range(first_id, first_id + added)))
        fitted = [p for p, _ in sides]
        stats = token_distill.distill_rows(model, fitted, first_id, aligned, epochs=epochs, lr=lr,
                                           progress=progress, holdout=holdout)
        moved = stats["chunks"] and stats.get("kept_after_chunks", 1) > 0
        report.count("tokenizer", "distilled", added if moved else 0)
        if not stats["chunks"]:
            report.notes.append("distill: no chunk of texts contains a new token; rows stay sub-token means")
        elif stats.get("held_out_chunks") and stats["kept_after_chunks"] == 0:
            report.notes.append("distill: no step improved the held-out NLL; rows stay sub-token means")
        report.extra["distill"] = stats
    report.entries = [{"token": repr(t), "pieces": len(p), "id": first_id + i}
                      for i, (t, p) in enumerate(zip(surfaces, pieces))]
    report.extra.update(new_ids=list(range(first_id, first_id + added)), tied=tab.tied, init=init)
    report.new = [NewSlice(tab.input_name, 0, first_id)]
    if tab.output is not None and not tab.tied:
        report.new.append(NewSlice(tab.output_name, 0, first_id))
    return report
