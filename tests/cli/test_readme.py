"""The README and docs/ stand alone: the Python example runs as written (on a tiny model in place of the
path), and every link points to a file inside the repository (a user's clone has nothing beside it)."""
from __future__ import annotations

import re

import pytest

from cli_helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = [b for b in blocks if 'path = "path/to/hf-dir-or-file.gguf"' in b]   # the quick-start example
    assert len(example) == 1, "the README's Python example (path = \"path/to/hf-dir-or-file.gguf\") is missing"
    return example[0]


def test_readme_example_runs(tiny_model, tmp_path, monkeypatch):
    code = _readme_example()
    for needed in ("load_tokenizer", "requires_grad", "model.train()"):
        assert needed in code, needed
    code = code.replace('"path/to/hf-dir-or-file.gguf"', repr(str(tiny_model)))
    code = code.replace('"out/"', repr(str(tmp_path / "adapter")))
    namespace: dict = {}
    exec(compile(code, "README.md example", "exec"), namespace)  # noqa: S102  our own README
    model = namespace["model"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert model.training and namespace["params"] and all(p.requires_grad for p in namespace["params"])


@pytest.mark.parametrize("document", _documents(), ids=lambda p: p.name)
def test_links_stay_inside_the_repository(document):
    text = document.read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
        assert path.exists(), f"{document.name} links to a missing file: {target}"
