"""Import word vectors into a model's input embedding.

Sources: a vector file (``lowcost.warmstart.vectors``), a ``(tokens, matrix)`` pair, or another model with
its tokenizer ``(model, tokenizer)``. Each model token (special tokens aside) is looked up by its surface
text ("Ġhello" → "hello"): exact, then case-folded, then as the mean of sub-token vectors (a file: the
word's alphanumeric runs, else a greedy longest-match split over the source vocabulary; a model: its
tokenizer's pieces). Several sources fill rows in order; a row filled by one is not touched by the next.

Widths differ → a map to the model width: ``project="lstsq"`` fits ``[s, 1] W ≈ e`` by ridge-regularised
least squares on the overlap (exactly or case-folded matched tokens, excluding the rows being filled when
``token_ids`` is given) — right for a pretrained model; ``"orthogonal"`` is data-free (PCA to the model width
when the source is wider, a seeded semi-orthogonal map when narrower), rescaled to the table's RMS — right
for a freshly initialised model whose rows carry no information to fit to; ``"none"`` requires equal widths.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from lowcost.warmstart.report import WarmstartReport
from lowcost.warmstart.tables import tables, token_surface, word_start_marker
from lowcost.warmstart.vectors import VectorFormatError, read_vectors

_RUNS = re.compile(r"\w+", re.UNICODE)


class _Source:
    """Vectors with a lookup: ``exact``/``folded`` give a row, ``pieces`` the rows of sub-tokens."""

    def __init__(self, name: str, words: Sequence[str], matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != len(words):
            raise VectorFormatError(f"{name}: {len(words)} tokens but a matrix of shape {tuple(matrix.shape)}")
        self.name, self.matrix = name, matrix.float()
        self.index = {}
        self.folded = {}
        for row, word in enumerate(words):
            self.index.setdefault(word, row)
            self.folded.setdefault(word.casefold(), row)

    def lookup(self, text: str, starts_word: bool, raw: str = "") -> tuple[Optional[int], str]:
        if text in self.index:
            return self.index[text], "matched"
        if text.casefold() in self.folded:
            return self.folded[text.casefold()], "case_folded"
        return None, ""

    def _row(self, text: str) -> Optional[int]:
        return self.index.get(text, self.folded.get(text.casefold()))

    def pieces(self, text: str, starts_word: bool) -> list:
        runs = _RUNS.findall(text)
        if len(runs) > 1:
            rows = [self._row(r) for r in runs]
            return [r for r in rows if r is not None] if all(r is not None for r in rows) else []
        return self._greedy(text) if len(text) >= 4 else []

    def _greedy(self, text: str) -> list:
        rows, start = [], 0
        while start < len(text):
            for end in range(len(text), start + 1, -1):
                row = self._row(text[start:end])
                if row is not None and end - start >= 2:
                    rows.append(row)
                    start = end
                    break
            else:
                return []
        return rows if len(rows) > 1 else []


class _ModelSource(_Source):
    """Another model's input embedding, looked up through its tokenizer."""

    def __init__(self, name: str, model: nn.Module, tokenizer):
        vocab = tokenizer.get_vocab()
        words = [None] * len(vocab)
        for token, idx in vocab.items():
            if idx < len(words):
                words[idx] = token
        matrix = tables(model).input.detach()[: len(words)]
        words = words[: matrix.shape[0]]
        super().__init__(name, [w if w is not None else f"<unused {i}>" for i, w in enumerate(words)], matrix)
        self.tokenizer, self.marker = tokenizer, word_start_marker(tokenizer)

    def lookup(self, text: str, starts_word: bool, raw: str = ""):
        own = (self.marker + text) if (starts_word and self.marker) else ("##" + text if not starts_word else text)
        for key in (raw, own):
            if key in self.index:
                return self.index[key], "matched"
        return super().lookup(text, starts_word)

    def pieces(self, text: str, starts_word: bool) -> list:
        spaced = (" " + text) if (starts_word and self.marker) else text
        return [i for i in self.tokenizer.encode(spaced, add_special_tokens=False) if i < self.matrix.shape[0]]


def _make_source(source) -> _Source:
    if isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], nn.Module):
        return _ModelSource(type(source[0]).__name__, source[0], source[1])
    if isinstance(source, (tuple, list)) and len(source) == 2:
        tokens, matrix = source
        return _Source("(tokens, matrix)", list(tokens), torch.as_tensor(np.asarray(matrix)))
    if isinstance(source, nn.Module):
        raise TypeError("a model source needs its tokenizer: pass (model, tokenizer)")
    vectors = read_vectors(source)
    src = _Source(str(source), vectors.words, torch.from_numpy(vectors.vectors))
    src.bad_utf8 = vectors.bad_utf8
    return src


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> tuple[torch.Tensor, float]:
    """W minimising ||[x, 1] W - y||² + λ·tr-scaled ||W||²; returns (W, R² on the fit set)."""
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).double()
    gram = x1.T @ x1
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * lam * gram.diagonal().mean()
    w = torch.linalg.solve(gram, x1.T @ y.double())
    resid = ((x1 @ w - y.double()) ** 2).sum()
    total = ((y.double() - y.double().mean(0)) ** 2).sum()
    return w.float(), float(1 - resid / total) if total > 0 else 0.0


def _orthogonal(x: torch.Tensor, width: int, rms: float, seed: int) -> torch.Tensor:
    """Data-free map to ``width``: centred, PCA when narrowing, semi-orthogonal when widening; RMS ``rms``."""
    centred = x - x.mean(0)
    if x.shape[1] >= width:
        _, _, v = torch.linalg.svd(centred.double(), full_matrices=False)
        out = (centred.double() @ v[:width].T).float()
    else:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(width, x.shape[1], generator=g, dtype=torch.float64))
        out = (centred.double() @ q.T).float()
    return out * (rms / out.pow(2).mean().sqrt().clamp_min(1e-12))


def _collect(src: _Source, targets: list, fit: bool = False) -> tuple[list, list, list]:
    """(target ids, source vectors, category) for every target row the source can fill; ``fit``: only
    word-start tokens matched exactly or case-folded (continuation pieces like "ing" are poor fit targets)."""
    ids, vecs, kinds = [], [], []
    for tid, text, starts, raw in targets:
        if fit and not starts:
            continue
        row, kind = src.lookup(text, starts, raw)
        if row is not None:
            vec = src.matrix[row]
        else:
            rows = src.pieces(text, starts) if text.strip() and not fit else []
            if not rows:
                continue
            vec, kind = src.matrix[rows].mean(0), "sub_token"
        ids.append(tid)
        vecs.append(vec)
        kinds.append(kind)
    return ids, vecs, kinds


def _fit_set(src: _Source, pool: list) -> tuple[list, list]:
    """Overlap for the least-squares map: exact word-start matches, plus case-folded ones when exact
    matches are fewer than twice the source width."""
    ids, vecs, kinds = _collect(src, pool, fit=True)
    exact = [k == "matched" for k in kinds]
    if sum(exact) >= 2 * (src.matrix.shape[1] + 1):
        return [i for i, e in zip(ids, exact) if e], [v for v, e in zip(vecs, exact) if e]
    return ids, vecs


def _targets(tokenizer, rows: int, token_ids: Optional[Iterable[int]]) -> list:
    marker = word_start_marker(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []))
    chosen = range(rows) if token_ids is None else sorted(set(int(i) for i in token_ids))
    out = []
    for tid in chosen:
        if tid in special or tid >= rows:
            continue
        token = tokenizer.convert_ids_to_tokens(tid)
        if token is None:
            continue
        if not token.startswith("##") and token.startswith(" "):    # an added token kept with its space
            token = (marker + token[1:]) if marker else token[1:]  # (" Arafat" → "ĠArafat": starts a word)
        text, starts = token_surface(token, marker)
        out.append((tid, text, starts, token))
    return out


def _map(vecs: torch.Tensor, table: torch.Tensor, fit_ids: list, fit_vecs, project: str, seed: int):
    width = table.shape[1]
    if project == "none":
        if vecs.shape[1] != width:
            raise VectorFormatError(f"source vectors have dimension {vecs.shape[1]}, the model {width}; "
                                    "use project='lstsq' or 'orthogonal'")
        return vecs, None
    if project == "orthogonal":
        return _orthogonal(vecs, width, float(table.pow(2).mean().sqrt()), seed), None
    if len(fit_ids) < vecs.shape[1] + 1:
        raise ValueError(f"only {len(fit_ids)} overlapping tokens to fit a {vecs.shape[1]}→{width} map; "
                         "need more than the source width (or use project='orthogonal')")
    w, r2 = _ridge(torch.stack(fit_vecs), table[fit_ids].float())
    x1 = torch.cat([vecs, torch.ones(vecs.shape[0], 1)], 1)
    return x1 @ w, r2


def import_vectors(model: nn.Module, tokenizer, source, *, token_ids: Optional[Iterable[int]] = None,
                   project: str = "lstsq", seed: int = 0, new_ids: Optional[Iterable[int]] = None,
                   fill_new: bool = True) -> WarmstartReport:
    """Writes source vectors into ``model``'s input embedding rows (tied output follows).

    Args:
        source: a vector file path (any format ``lowcost.warmstart.vectors`` reads, fastText ``.bin``
            included), ``(tokens, matrix (n, d))``, ``(model, tokenizer)``, or a list of these (applied in
            order, earlier sources win).
        token_ids: rows to fill (default: all non-special rows); others only serve to fit the projection.
        project: "lstsq", "orthogonal" or "none" (see the module docstring).
        new_ids: rows just initialised (e.g. by ``add_tokens``): never used to fit the projection, as they
            hold no evidence of their own; filled like the others unless ``fill_new`` is False.
        fill_new: with False, ``new_ids`` rows are left as they are, whatever ``token_ids`` says.
    Returns:
        ``WarmstartReport`` (kind "import_vectors"): per source matched / case_folded / sub_token /
        projected, and ``random`` for rows in scope that no source filled (left as they were).
    """
    if project not in ("lstsq", "orthogonal", "none"):
        raise ValueError(f"project must be 'lstsq', 'orthogonal' or 'none', not {project!r}")
    sources = source if isinstance(source, list) else [source]
    table = tables(model).input
    new = set() if new_ids is None else {int(i) for i in new_ids}
    scope = [t for t in _targets(tokenizer, table.shape[0], token_ids) if fill_new or t[0] not in new]
    scope_ids = {t[0] for t in scope}
    fit_pool = _targets(tokenizer, table.shape[0], None) if token_ids is not None else scope
    fit_pool = [t for t in fit_pool if (token_ids is None or t[0] not in scope_ids) and t[0] not in new]
    report, filled = WarmstartReport("import_vectors"), set()
    for item in sources:
        src = _make_source(item)
        todo = [t for t in scope if t[0] not in filled]
        ids, vecs, kinds = _collect(src, todo)
        fit_ids, fit_vecs = _fit_set(src, fit_pool) if project == "lstsq" else ([], [])
        for kind in ("matched", "case_folded", "sub_token"):
            report.count(src.name, kind, kinds.count(kind))
        if not ids:
            report.count(src.name, "projected", 0)
            continue
        mapped, r2 = _map(torch.stack(vecs), table.detach(), fit_ids, fit_vecs, project, seed)
        with torch.no_grad():
            table[ids] = mapped.to(table.dtype)
        report.count(src.name, "projected", len(ids) if project != "none" else 0)
        if r2 is not None:
            report.extra[f"fit_r2[{src.name}]"] = r2
        if getattr(src, "bad_utf8", 0):
            report.notes.append(f"{src.name}: {src.bad_utf8} words with invalid UTF-8 (decoded with U+FFFD)")
        filled.update(ids)
    report.count("model", "random", len(scope) - len(filled))
    return report
