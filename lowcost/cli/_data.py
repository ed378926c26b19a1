"""Training data for ``lowcost finetune``: read a file into records, split off a held-out part.

Formats (chosen by the file name):

- ``.txt`` / ``.md`` / ``.text``: plain text, one document (packed into sequences later);
- ``.jsonl``: one JSON object per line, every line of one kind:
  ``{"text": ...}`` (documents, packed), ``{"prompt": ..., "response": ...}`` (``"completion"`` is accepted
  for ``"response"``) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat; the loss counts the
  assistant turns only). Blank lines are ignored.

A bad line is an error naming ``file:line``; with ``skip_bad_lines`` it is skipped and counted instead.
The held-out split is by records (a seeded choice of ``eval_fraction`` of them, at least one) or, for a
single plain-text document, the last ``eval_fraction`` of its characters cut at a line break.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from lowcost.cli import CLIError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Chat:
    """A conversation; the assistant turns are what the model learns to write."""
    messages: tuple[tuple[str, str], ...]          # (role, content)


Record = Union[str, Chat]


@dataclass
class Dataset:
    """What a data file held: records of one kind ("text" or "chat"), and how many lines were skipped."""
    path: str
    kind: str
    records: list = field(default_factory=list)
    skipped: int = 0
    first_skipped: str = ""


def _bad(path: Path, line: int, why: str) -> str:
    return f"{path}:{line}: {why}"


def _messages(value) -> Optional[tuple[tuple[str, str], ...]]:
    """The messages of a chat record, or None when they are not a list of {role, content} strings."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            return None
        out.append((message["role"], message["content"]))
    return tuple(out)


def parse_line(obj) -> tuple[str, Record]:
    """(kind, record) for one decoded JSON line; raises ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _messages(obj["messages"])
        if messages is None:
            raise ValueError(f"'messages' must be a non-empty list of {{\"role\": one of {list(ROLES)}, "
                             "\"content\": string}")
        if not any(role == "assistant" for role, _ in messages):
            raise ValueError("'messages' has no assistant turn (nothing to learn)")
        return "chat", Chat(messages)
    response = obj.get("response", obj.get("completion"))
    if "prompt" in obj or response is not None:
        if not isinstance(obj.get("prompt"), str) or not isinstance(response, str):
            raise ValueError("a prompt/response record needs string 'prompt' and 'response' (or 'completion')")
        return "chat", Chat((("user", obj["prompt"]), ("assistant", response)))
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError("'text' must be a string")
        return "text", obj["text"]
    raise ValueError(f"no 'text', 'prompt'/'response' or 'messages' key (keys: {sorted(obj)[:6]})")


def _read_jsonl(path: Path, skip_bad_lines: bool) -> Dataset:
    data = Dataset(str(path), kind="")
    with path.open(encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                kind, record = parse_line(json.loads(line))
                if data.kind and kind != data.kind:
                    raise ValueError(f"a {kind} record in a file of {data.kind} records (one kind per file)")
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                message = _bad(path, number, str(exc).split("\n")[0])
                if not skip_bad_lines:
                    raise CLIError(message + " (--skip-bad-lines skips such lines)") from None
                data.skipped += 1
                data.first_skipped = data.first_skipped or message
                continue
            data.kind = data.kind or kind
            data.records.append(record)
    return data


def read_data(path, skip_bad_lines: bool = False) -> Dataset:
    """Reads ``path`` (see the module docstring); raises CLIError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            data = Dataset(str(path), "text", [path.read_text(encoding="utf-8")])
        elif suffix in JSONL_SUFFIXES:
            data = _read_jsonl(path, skip_bad_lines)
        else:
            raise CLIError(f"--data {path}: expected a {'/'.join(TEXT_SUFFIXES)} text file or a .jsonl file")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--data {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not data.records or all(not _has_text(r) for r in data.records):
        raise CLIError(f"--data {path}: no usable records" + (f" ({data.skipped} bad lines skipped)"
                                                                if data.skipped else ""))
    return data


def _has_text(record: Record) -> bool:
    if isinstance(record, Chat):
        return any(content for _, content in record.messages)
    return bool(record.strip())


def _split_text(text: str, fraction: float) -> tuple[str, str]:
    """(train, held-out): the held-out part is the last ``fraction`` of the characters, cut at a line break
    (or a space) so that no word is split."""
    cut = len(text) - max(1, math.ceil(fraction * len(text)))
    for sep in ("\n", " "):
        at = text.rfind(sep, 0, cut + 1)
        if at > 0:
            return text[:at + 1], text[at + 1:]
    return text[:cut], text[cut:]


def split(data: Dataset, fraction: float, seed: int) -> tuple[list, list]:
    """(train records, held-out records). ``fraction`` 0 gives no held-out part."""
    if not 0.0 <= fraction < 1.0:
        raise CLIError(f"--eval-fraction must be in [0, 1), got {fraction}")
    records = [r for r in data.records if _has_text(r)]
    if fraction == 0.0:
        return records, []
    if len(records) == 1 and isinstance(records[0], str):
        train, held = _split_text(records[0], fraction)
        if not train.strip() or not held.strip():
            raise CLIError(f"--data {data.path}: too little text to hold out {fraction:g} of it for evaluation")
        return [train], [held]
    if len(records) < 2:
        raise CLIError(f"--data {data.path}: one record cannot be split into training and held-out parts; "
                       "add records or pass --eval-fraction 0")
    count = min(len(records) - 1, max(1, math.ceil(fraction * len(records))))
    held = set(random.Random(seed).sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def read_words(path) -> list[str]:
    """The ``--new-tokens`` file: one word or phrase per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--new-tokens {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CLIError(f"--new-tokens {path}: not UTF-8 text ({exc.reason})") from None
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise CLIError(f"--new-tokens {path}: no words in the file (one per line)")
    return list(dict.fromkeys(words))
