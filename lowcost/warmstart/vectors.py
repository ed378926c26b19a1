"""Streaming readers for word-vector files: word2vec text (with a ``N D`` header), fastText ``.vec`` (the
same layout), GloVe (no header), word2vec binary and fastText binary models (``.bin``). The format is
detected from the first bytes.

Files are read line by line (binary: record by record), never whole; words that are not valid UTF-8 are
decoded with replacement characters and counted, not fatal. Malformed input raises ``VectorFormatError``
naming the file, the line (or byte offset) and what was wrong.

A fastText ``.bin`` model holds no word vectors as such: a word's vector is what fastText's
``get_word_vector`` computes, the mean of the word's own input row and the rows of its character n-grams
(``minn``…``maxn`` characters of ``"<word>"``, hashed into ``bucket`` rows). The dictionary is read record by
record, the input matrix is memory-mapped, and vectors are computed in batches as they are yielded.
Quantised (``.ftz``) and supervised models are refused.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]
_FASTTEXT_BIN_MAGIC = (793712314).to_bytes(4, "little")
_FASTTEXT_VERSIONS = (11, 12)        # same layout; 12 is what fastText ≥ 0.9 writes
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
    """One of ``"word2vec-text"`` (also fastText ``.vec``), ``"glove"``, ``"word2vec-binary"``,
    ``"fasttext-binary"`` (a fastText ``.bin`` model: magic 793712314 and version 12, int32 little-endian)."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(4)
        if not head.strip():
            raise VectorFormatError(f"{path}: empty file")
        if head == _FASTTEXT_BIN_MAGIC:
            version = handle.read(4)
            if len(version) < 4:
                raise VectorFormatError(f"{path}: truncated fastText model: the file ends at byte "
                                        f"{4 + len(version)} inside the header")
            version = int.from_bytes(version, "little", signed=True)
            if version not in _FASTTEXT_VERSIONS:
                raise VectorFormatError(f"{path}: fastText binary model version {version} is not supported "
                                        f"(versions {', '.join(map(str, _FASTTEXT_VERSIONS))})")
            return "fasttext-binary"
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


# --- fastText binary models -------------------------------------------------------------------------------

_FT_ARGS = struct.Struct("<12id")      # dim ws epoch minCount neg wordNgrams loss model bucket minn maxn
_FT_DICT = struct.Struct("<3i2q")      # lrUpdateRate, t | size nwords nlabels ntokens pruneidx_size
_FT_ENTRY = struct.Struct("<qb")       # count, type (0 word, 1 label) after the NUL-terminated word
_FT_SUPERVISED = 3                     # args.model: 1 cbow, 2 skipgram, 3 supervised
_SIGNED_BYTE = [b | 0xFFFFFF00 if b & 0x80 else b for b in range(256)]   # int8 → uint32, as fastText hashes
_CHUNK = 1 << 20                       # bytes read at a time while parsing the dictionary


_FNV_OFFSET = 2166136261


def _fnv_extend(h: int, data: bytes) -> int:
    """Continues a 32-bit FNV-1a hash ``h`` over ``data``, each byte sign-extended first (C ``int8_t``)."""
    for byte in data:
        h = ((h ^ _SIGNED_BYTE[byte]) * 16777619) & 0xFFFFFFFF
    return h


def _fasttext_hash(data: bytes) -> int:
    """fastText's ``Dictionary::hash``: 32-bit FNV-1a over the bytes, each sign-extended first."""
    return _fnv_extend(_FNV_OFFSET, data)


def _fasttext_ngrams(raw: bytes, minn: int, maxn: int, bucket: int) -> list:
    """Bucket indices (0…bucket-1) of the character n-grams of ``"<" + raw + ">"`` in fastText's order.

    Characters are UTF-8 sequences (a byte ``10xxxxxx`` continues the previous one); n runs from ``minn`` to
    ``maxn``; the 1-grams "<" and ">" are left out. Each n-gram extends the previous one from the same start,
    so the hash is carried forward instead of recomputed.
    """
    data = b"<" + raw + b">"
    size = len(data)
    starts = [i for i, byte in enumerate(data) if byte & 0xC0 != 0x80]
    starts.append(size)
    chars = len(starts) - 1
    out = []
    for first in range(chars):
        h, pos = _FNV_OFFSET, starts[first]
        for n in range(1, min(maxn, chars - first) + 1):
            end = starts[first + n]
            h = _fnv_extend(h, data[pos:end])
            pos = end
            if n >= minn and not (n == 1 and (first == 0 or end == size)):
                out.append(h % bucket)
    return out


class _Chunks:
    """Reads a binary handle through a buffer, knowing the absolute offset (for "where it ended" errors)."""

    def __init__(self, handle: BinaryIO, path: str, chunk: Optional[int] = None):
        self.handle, self.path, self.chunk = handle, path, chunk or _CHUNK
        self.buffer, self.pos, self.base = b"", 0, handle.tell()

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _more(self, what: str) -> None:
        data = self.handle.read(self.chunk)
        if not data:
            raise VectorFormatError(f"{self.path}: truncated fastText model: the file ends at byte "
                                    f"{self.base + len(self.buffer)} inside {what} (from byte {self.offset})")
        self.base += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + data, 0

    def take(self, n: int, what: str) -> bytes:
        while len(self.buffer) - self.pos < n:
            self._more(what)
        out = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return out

    def until_nul(self, what: str) -> bytes:
        start = self.pos
        while True:
            end = self.buffer.find(b"\0", start)
            if end >= 0:
                out = self.buffer[self.pos:end]
                self.pos = end + 1
                return out
            searched = len(self.buffer) - self.pos      # _more keeps the unread bytes, from index 0
            self._more(what)
            start = searched


@dataclass
class _FastTextModel:
    words: list          # raw bytes of the dictionary's words (rows 0…nwords-1 of the input matrix)
    dim: int
    minn: int
    maxn: int
    bucket: int
    matrix_offset: int   # byte offset of the input matrix's float32 data
    rows: int


def _read_fasttext_header(handle: BinaryIO, path: str) -> _FastTextModel:
    """Parses a fastText ``.bin`` up to the input matrix data (left unread)."""
    reader = _Chunks(handle, path)
    magic, version = struct.unpack("<2i", reader.take(8, "the header"))
    if magic != int.from_bytes(_FASTTEXT_BIN_MAGIC, "little") or version not in _FASTTEXT_VERSIONS:
        raise VectorFormatError(f"{path}: not a fastText binary model of a supported version "
                                f"(magic {magic}, version {version})")
    (dim, _ws, _epoch, _min_count, _neg, _word_ngrams, _loss, model, bucket, minn, maxn, _lr_update,
     _t) = _FT_ARGS.unpack(reader.take(_FT_ARGS.size, "the model arguments"))
    size, nwords, nlabels, _ntokens, prune_size = _FT_DICT.unpack(reader.take(_FT_DICT.size,
                                                                                 "the dictionary header"))
    if model == _FT_SUPERVISED or nlabels > 0:
        raise VectorFormatError(f"{path}: a supervised fastText model (classifier with {nlabels} labels, no "
                                "sub-word word vectors) is not supported; use an unsupervised (cbow/skipgram) "
                                "model or its .vec file")
    if dim <= 0 or size < 0 or not 0 <= nwords <= size or bucket < 0 or minn < 0 or maxn < 0:
        raise VectorFormatError(f"{path}: implausible fastText header (dim {dim}, dictionary {size} entries, "
                                f"{nwords} words, bucket {bucket}, minn {minn}, maxn {maxn})")
    words = []
    for index in range(size):
        where = f"dictionary entry {index + 1} of {size}"
        raw = reader.until_nul(where)
        _count, kind = _FT_ENTRY.unpack(reader.take(_FT_ENTRY.size, where))
        if kind == 0:
            words.append(raw)
    if len(words) != nwords:
        raise VectorFormatError(f"{path}: the fastText dictionary declares {nwords} words but holds {len(words)}")
    if prune_size > 0:
        reader.take(8 * prune_size, "the pruning index")
    (quantised,) = reader.take(1, "the quantisation flag")
    if quantised:
        raise VectorFormatError(f"{path}: a quantised fastText model (.ftz) is not supported; use the full "
                                ".bin model or its .vec file")
    if prune_size >= 0:
        raise VectorFormatError(f"{path}: a pruned fastText model (n-gram pruning index of {prune_size} entries) "
                                "is not supported")
    rows, cols = struct.unpack("<2q", reader.take(16, "the input matrix header"))
    if cols != dim or rows != nwords + bucket:
        raise VectorFormatError(f"{path}: the fastText input matrix is {rows}×{cols}, expected "
                                f"{nwords + bucket}×{dim} ({nwords} words + {bucket} n-gram buckets)")
    return _FastTextModel(words, dim, minn, maxn, bucket, reader.offset, rows)


def _iter_fasttext(handle: BinaryIO, path: str, batch: int = 4096):
    """Yields (word, vector, bad_utf8) for each word of a fastText ``.bin`` model, as ``get_word_vector``
    computes it: the mean of the word's row and its n-gram rows (float64 sums, float32 out)."""
    model = _read_fasttext_header(handle, path)
    need = model.matrix_offset + 4 * model.rows * model.dim
    size = os.fstat(handle.fileno()).st_size
    if size < need:
        raise VectorFormatError(f"{path}: truncated fastText model: the file ends at byte {size} inside the input "
                                f"matrix ({model.rows}×{model.dim} float32 from byte {model.matrix_offset} "
                                f"need {need} bytes)")
    if not model.words:
        return
    matrix = np.memmap(path, dtype="<f4", mode="r", offset=model.matrix_offset, shape=(model.rows, model.dim))
    nwords = len(model.words)
    subwords = model.maxn > 0 and model.bucket > 0
    try:
        for start in range(0, nwords, batch):
            ids, bounds = [], []
            for row in range(start, min(start + batch, nwords)):
                bounds.append(len(ids))
                ids.append(row)
                if subwords and model.words[row] != b"</s>":   # fastText gives EOS no n-grams
                    ids.extend(nwords + h for h in _fasttext_ngrams(model.words[row], model.minn, model.maxn,
                                                                    model.bucket))
            gathered = np.asarray(matrix[np.asarray(ids, dtype=np.int64)], dtype=np.float64)
            sums = np.add.reduceat(gathered, np.asarray(bounds), axis=0)
            counts = np.diff(np.append(bounds, len(ids)))
            means = (sums / counts[:, None]).astype(np.float32)
            for offset, vector in enumerate(means):
                word, bad = _decode(model.words[start + offset])
                yield word, vector, bad
    finally:
        del matrix


def iter_vectors(path: PathLike, fmt: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, bool]]:
    """Streams ``(word, vector, bad_utf8)`` from a vector file (format auto-detected unless given)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    with path.open("rb") as handle:
        if fmt == "glove":
            yield from _iter_text(handle, str(path), None, 1)
            return
        if fmt == "fasttext-binary":
            yield from _iter_fasttext(handle, str(path))
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
