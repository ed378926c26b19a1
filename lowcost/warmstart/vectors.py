"""Streaming readers for word-vector files: word2vec text (with a ``N D`` header), fastText ``.vec`` (the
same layout), GloVe (no header) and word2vec binary. The format is detected from the first bytes.

Files are read line by line (binary: record by record), never whole; words that are not valid UTF-8 are
decoded with replacement characters and counted, not fatal. Malformed input raises ``VectorFormatError``
naming the file, the line and what was wrong.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]
_FASTTEXT_BIN_MAGIC = (793712314).to_bytes(4, "little")
_HEADER = re.compile(rb"^\s*(\d+)\s+(\d+)\s*$")


class VectorFormatError(ValueError):
    """A vector file that cannot be read: empty, unknown format, ragged rows, wrong dimension."""


@dataclass
class VectorFile:
    """What was read: words, a float32 matrix ``(len(words), dim)`` and reading statistics."""
    words: list
    vectors: np.ndarray
    format: str
    path: str = ""
    bad_utf8: int = 0
    duplicates: int = 0
    skipped: int = 0          # rows dropped by the ``keep`` filter
    notes: list = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _parse_floats(parts: list, path: str, lineno: int, dim: Optional[int]) -> np.ndarray:
    if dim is not None and len(parts) != dim:
        raise VectorFormatError(f"{path}:{lineno}: {len(parts)} values, expected {dim} (ragged rows or a "
                                "word containing spaces)")
    try:
        return np.asarray([float(p) for p in parts], dtype=np.float32)
    except ValueError as err:
        raise VectorFormatError(f"{path}:{lineno}: non-numeric vector value ({err})") from None


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _looks_textual(handle: BinaryIO) -> bool:
    """After a header: is the first record a text line (valid UTF-8, no control bytes, a number after the
    word)? Binary float32 records almost never pass all three."""
    pos = handle.tell()
    line = handle.readline().rstrip(b"\r\n")
    handle.seek(pos)
    if any(b < 0x20 and b not in (9, 13) for b in line):
        return False
    try:
        parts = line.decode("utf-8").split()
        float(parts[1])
    except (UnicodeDecodeError, IndexError, ValueError):
        return False
    return True


def detect_format(path: PathLike) -> str:
    """One of ``"word2vec-text"`` (also fastText ``.vec``), ``"glove"``, ``"word2vec-binary"``."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(4)
        if not head.strip():
            raise VectorFormatError(f"{path}: empty file")
        if head == _FASTTEXT_BIN_MAGIC:
            raise VectorFormatError(f"{path}: a fastText binary model (.bin), not a vector file; use the .vec "
                                    "file fastText writes beside it")
        handle.seek(0)
        first = handle.readline()
        header = _HEADER.match(first)
        if header:
            dim = int(header.group(2))
            if dim <= 0:
                raise VectorFormatError(f"{path}: header declares dimension {dim}")
            return "word2vec-text" if _looks_textual(handle) else "word2vec-binary"
    parts = first.rstrip().split()
    if len(parts) >= 2:
        try:
            [float(p) for p in parts[1:]]
            return "glove"
        except ValueError:
            pass
    raise VectorFormatError(f"{path}: unknown vector format (first line is neither a 'count dim' header nor "
                            "'word v1 v2 …')")


def _iter_text(handle: BinaryIO, path: str, dim: Optional[int], first_lineno: int):
    """Yields (word, vector, bad_utf8) from text lines; ``dim`` None is fixed by the first row."""
    for lineno, line in enumerate(handle, start=first_lineno):
        line = line.rstrip(b"\r\n").rstrip(b" \t")
        if not line.strip():
            continue
        raw_word, *parts = line.split(b" ")
        if not parts:
            raise VectorFormatError(f"{path}:{lineno}: a word with no vector")
        vector = _parse_floats(parts, path, lineno, dim)
        dim = len(parts)
        word, bad = _decode(raw_word)
        yield word, vector, bad


def _read_word(handle: BinaryIO) -> bytes:
    chars = bytearray()
    while True:
        byte = handle.read(1)
        if byte in (b" ", b""):
            return bytes(chars)
        if byte != b"\n" or chars:
            chars += byte


def _iter_binary(handle: BinaryIO, path: str, count: int, dim: int):
    """Yields (word, vector, bad_utf8) from word2vec binary records (word, space, ``dim`` float32)."""
    width = 4 * dim
    for index in range(count):
        raw_word = _read_word(handle)
        payload = handle.read(width)
        if len(payload) != width:
            raise VectorFormatError(f"{path}: record {index + 1} of {count} is truncated "
                                    f"({len(payload)} of {width} bytes)")
        word, bad = _decode(raw_word)
        yield word, np.frombuffer(payload, dtype="<f4").astype(np.float32), bad


def iter_vectors(path: PathLike, fmt: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, bool]]:
    """Streams ``(word, vector, bad_utf8)`` from a vector file (format auto-detected unless given)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    with path.open("rb") as handle:
        if fmt == "glove":
            yield from _iter_text(handle, str(path), None, 1)
            return
        header = _HEADER.match(handle.readline())
        if header is None:
            raise VectorFormatError(f"{path}: format {fmt!r} needs a 'count dim' header")
        count, dim = int(header.group(1)), int(header.group(2))
        if fmt == "word2vec-binary":
            yield from _iter_binary(handle, str(path), count, dim)
        elif fmt == "word2vec-text":
            yield from _iter_text(handle, str(path), dim, 2)
        else:
            raise VectorFormatError(f"unknown vector format {fmt!r}")


def read_vectors(path: PathLike, fmt: Optional[str] = None, *, keep: Optional[Callable[[str], bool]] = None,
                 limit: Optional[int] = None, expected_dim: Optional[int] = None) -> VectorFile:
    """Reads a vector file into memory.

    Args:
        keep: optional filter on words (e.g. "is it in the model vocabulary?") so that only the useful rows
            of a large file are held.
        limit: stop after this many rows (the most frequent come first in these formats).
        expected_dim: raise ``VectorFormatError`` unless the vectors have this width.
    Returns:
        ``VectorFile`` with ``vectors: (n, dim)`` float32; the first occurrence of a duplicate word wins.
    """
    fmt = fmt or detect_format(path)
    words, rows, seen = [], [], set()
    bad = duplicates = skipped = 0
    for word, vector, was_bad in iter_vectors(path, fmt):
        if limit is not None and len(rows) + skipped + duplicates >= limit:
            break
        bad += was_bad
        if word in seen:
            duplicates += 1
            continue
        if keep is not None and not keep(word):
            skipped += 1
            continue
        seen.add(word)
        words.append(word)
        rows.append(vector)
    if not rows and not skipped:
        raise VectorFormatError(f"{path}: no vectors")
    dim = rows[0].shape[0] if rows else 0
    if expected_dim is not None and rows and dim != expected_dim:
        raise VectorFormatError(f"{path}: vectors have dimension {dim}, expected {expected_dim}")
    matrix = np.stack(rows) if rows else np.zeros((0, expected_dim or 0), np.float32)
    return VectorFile(words, matrix, fmt, str(path), bad, duplicates, skipped)
