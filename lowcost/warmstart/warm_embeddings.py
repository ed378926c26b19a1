"""``lowcost.warmstart.embeddings``: one call that warm-starts a model's token embeddings — new domain tokens
(``add_tokens``) and word vectors imported onto the vocabulary (``import_vectors``) — with one report.

(This module is not called ``embeddings`` so that it cannot shadow the function of that name in the package.)
"""
from __future__ import annotations

import inspect
import os
from typing import Iterable, Optional

from torch import nn

from lowcost.warmstart.import_vectors import import_vectors
from lowcost.warmstart.report import WarmstartReport
from lowcost.warmstart.tables import tables
from lowcost.warmstart.tokens import add_tokens
from lowcost.warmstart.vectors import detect_format

_PROJECTS = ("lstsq", "orthogonal", "none")
_OWN = {"model", "tokenizer", "words", "init", "seed"}   # add_tokens parameters embeddings() sets itself


def _check_add_tokens_kwargs(kwargs: dict, new_tokens) -> None:
    params = inspect.signature(add_tokens).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [name for name in params if name not in _OWN]
        for name in kwargs:
            if name not in allowed:
                raise TypeError(f"embeddings() got an unexpected keyword argument {name!r} (extra keyword "
                                f"arguments go to add_tokens, which takes {', '.join(allowed)})")
    if kwargs and new_tokens is None:
        raise ValueError(f"{', '.join(sorted(kwargs))}: add_tokens arguments given without new_tokens")


def _check_sources(vectors) -> None:
    """Fails on a missing or unreadable vector file before anything is changed."""
    for source in vectors if isinstance(vectors, list) else [vectors]:
        if isinstance(source, (str, os.PathLike)):
            detect_format(source)


def _merge(report: WarmstartReport, part: WarmstartReport) -> None:
    for source, bucket in part.counts.items():
        for category, n in bucket.items():
            report.count(source, category, n)
    report.notes.extend(part.notes)
    report.new.extend(part.new)
    report.extra.update(part.extra)


def embeddings(model: nn.Module, tokenizer, *, vectors=None, new_tokens: Optional[Iterable[str]] = None,
               init: str = "subword-mean", project: str = "lstsq", overwrite_new: Optional[bool] = None,
               seed: int = 0, **add_tokens_kwargs) -> WarmstartReport:
    """Warm-starts the token embeddings of ``model``: adds domain words, imports word vectors, or both.

    In this order:

    1. ``new_tokens`` given: ``add_tokens(model, tokenizer, new_tokens, init=init, seed=seed,
       **add_tokens_kwargs)`` adds each word as one token to ``tokenizer``, grows the token tables and fills
       the new rows (by default with the mean of the rows of the pieces the word used to be split into).
    2. ``vectors`` given: ``import_vectors(model, tokenizer, vectors, project=project, seed=seed)`` writes
       vectors onto the vocabulary: every non-special row (new ones included, see ``overwrite_new``) that the
       source matches exactly, case-folded, or as the mean of sub-token vectors. This replaces the model's
       own rows for those tokens, as ``import_vectors`` does; to fill chosen rows only (e.g. just the new
       ones of a pretrained model, with the map fitted on all the others), call ``import_vectors`` with
       ``token_ids``. Only the input embedding is written (a tied output head follows; an untied one keeps
       what step 1 gave it).

    Rows added in step 1 and matched in step 2 (``overwrite_new``):
        ``None`` (default) decides by ``project``. ``"lstsq"`` assumes a pretrained model: vectors from
        another space mapped by least squares only approximate the model's own rows, so a mean of the model's
        own pieces is the better start and the new rows are kept. ``"orthogonal"``/``"none"`` assume a
        freshly initialised model (or vectors already in the model's space): the step-1 mean is a mean of
        random rows, so any match in the source — exact, case-folded or sub-token — is better evidence and
        replaces it. New rows the source cannot match keep their step-1 value. ``True``/``False`` force
        either behaviour. Either way the new rows are left out of the least-squares fit: they carry no
        evidence of their own.

    Args:
        vectors: anything ``import_vectors`` accepts: a vector file path (word2vec text/binary, GloVe,
            fastText ``.vec`` or ``.bin``), ``(tokens, matrix)``, ``(model, tokenizer)``, or a list of these.
        new_tokens: domain words to add as single tokens (a list, not one string).
        init: how ``add_tokens`` fills the new rows ("subword-mean", …; see ``add_tokens``).
        project: how ``import_vectors`` maps the source width to the model's ("lstsq", "orthogonal", "none").
        overwrite_new: see above.
        seed: for ``add_tokens`` (random init, anti-collision jitter) and ``import_vectors`` (orthogonal map).
        **add_tokens_kwargs: further ``add_tokens`` arguments (``leading_space``, ``tilt``, ``rescale``, …);
            an unknown name is a ``TypeError``, and any of them without ``new_tokens`` a ``ValueError``.
    Returns:
        ``WarmstartReport`` (kind "embeddings") holding both steps: ``counts`` per source as the two reports
        key them (``"tokenizer"``: added / existing / sub_token / jittered; each vector source: matched /
        case_folded / sub_token / projected; ``"model"``: random = rows in scope no source filled),
        ``entries`` (one per new token, with ``"init"``: step 1's init, or "imported" when step 2 replaced
        the row), the notes of both, ``new`` (the slices of the new rows, to train first) and ``extra``
        (both steps', plus ``overwrite_new`` and ``new_rows_imported``).
    Raises:
        ValueError: neither ``vectors`` nor ``new_tokens`` given, or a bad ``project``. Arguments and vector
            files are checked before anything is changed.
    """
    if vectors is None and new_tokens is None:
        raise ValueError("embeddings() needs vectors=... (word vectors to import) and/or new_tokens=... "
                         "(domain words to add); both are None")
    if isinstance(new_tokens, (str, bytes)):
        raise TypeError("new_tokens must be a list of words, not one string")
    if project not in _PROJECTS:
        raise ValueError(f"project must be 'lstsq', 'orthogonal' or 'none', not {project!r}")
    _check_add_tokens_kwargs(add_tokens_kwargs, new_tokens)
    if vectors is not None:
        _check_sources(vectors)

    report = WarmstartReport("embeddings")
    new_ids, step1 = [], None
    if new_tokens is not None:
        step1 = add_tokens(model, tokenizer, new_tokens, init=init, seed=seed, **add_tokens_kwargs)
        _merge(report, step1)
        report.entries = [dict(entry, init=step1.extra.get("init", init)) for entry in step1.entries]
        new_ids = list(step1.extra.get("new_ids", []))
    overwrite = project != "lstsq" if overwrite_new is None else bool(overwrite_new)
    report.extra["overwrite_new"] = overwrite
    if vectors is not None:
        table = tables(model).input
        before = table.detach()[new_ids].clone()
        step2 = import_vectors(model, tokenizer, vectors, project=project, seed=seed, new_ids=new_ids,
                               fill_new=overwrite)
        _merge(report, step2)
        changed = (table.detach()[new_ids] != before).any(dim=1).tolist() if new_ids else []
        by_id = dict(zip(new_ids, changed))
        for entry in report.entries:
            if by_id.get(entry.get("id")):
                entry["init"] = "imported"
        report.extra["new_rows_imported"] = int(sum(changed))
    return report
