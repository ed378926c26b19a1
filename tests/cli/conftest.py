"""Fixtures for the CLI tests (built by ``cli_helpers``): a tiny Llama HF directory and data files in every
format ``lowcost finetune`` reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import paragraphs, build_model_dir, build_tokenizer, corpus


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An HF directory: a 2-layer Llama (hidden 32, 96 positions) with a 320-entry byte-level BPE tokenizer."""
    text = corpus()
    return build_model_dir(tmp_path_factory.mktemp("tiny_llama"), build_tokenizer(text))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def jsonl_files(tmp_path_factory) -> dict:
    """{"text": ..., "pairs": ..., "chat": ...}: JSONL files of each record kind."""
    root = tmp_path_factory.mktemp("jsonl")
    paras = paragraphs()
    rows = {
        "text": [{"text": p} for p in paras],
        "pairs": [{"prompt": f"Summarise: {p[:60]}", "response": p[:120]} for p in paras],
        "chat": [{"messages": [{"role": "system", "content": "You explain Python."},
                               {"role": "user", "content": p[:50]},
                               {"role": "assistant", "content": p[50:150]},
                               {"role": "user", "content": "More?"},
                               {"role": "assistant", "content": p[150:220] or "No."}]} for p in paras],
    }
    out = {}
    for name, records in rows.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out
