"""transplant: by name, remap table, overlapping-slice copy, every tensor reported, min_loaded guard."""
import pytest
import torch
from safetensors.torch import save_file

import lowcost


def test_same_architecture_copies_everything(llama_factory):
    source, target = llama_factory(64, seed=1), llama_factory(64, seed=2)
    report = lowcost.warmstart.transplant(target, source)
    assert report.extra["loaded_fraction"] == 1.0 and report.total("initialised") == 0
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_changed_shapes_copy_the_overlap(llama_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    source = llama_factory(64, seed=1)
    torch.manual_seed(3)
    target = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=1))
    report = lowcost.warmstart.transplant(target, source, min_loaded=0.3)
    status = {e["tensor"]: e for e in report.entries}
    emb = status["model.embed_tokens.weight"]
    assert emb["status"] == "sliced" and emb["fraction"] == pytest.approx(64 / 80)
    assert torch.equal(target.model.embed_tokens.weight[:64], source.model.embed_tokens.weight)
    assert status["model.layers.0.mlp.up_proj.weight"]["fraction"] == pytest.approx(24 / 32)
    assert status["model.layers.2.mlp.up_proj.weight"]["status"] == "initialised"


def test_mapping_and_unused_keys(tmp_path, llama_factory, bert_factory):
    source = llama_factory(64, seed=1)
    state = {k.replace("model.", "backbone.", 1): v for k, v in source.state_dict().items()}
    state["extra.head.weight"] = torch.ones(3)
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "w.safetensors"))
    target = llama_factory(64, seed=2)
    report = lowcost.warmstart.transplant(target, tmp_path, mapping={"backbone.": "model.", "extra.": None})
    assert report.extra["loaded_fraction"] == 1.0 and report.counts["source"]["unused"] == 1
    assert torch.equal(target.model.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight)


def test_wrong_prefix_fails_and_leaves_model_untouched(llama_factory):
    source = {"encoder." + k: v for k, v in llama_factory(64, seed=1).state_dict().items()}
    target = llama_factory(64, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="prefix mismatch"):
        lowcost.warmstart.transplant(target, source)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_mapping_keys_that_do_not_exist(llama_factory):
    with pytest.raises(KeyError, match="match no source tensor"):
        lowcost.warmstart.transplant(llama_factory(64), llama_factory(64), mapping={"decoder.": "model."})


def test_missing_source(tmp_path, llama_factory):
    with pytest.raises(FileNotFoundError):
        lowcost.warmstart.transplant(llama_factory(64), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        lowcost.warmstart.transplant(llama_factory(64), tmp_path)


def test_minilm_into_a_deeper_bert(minilm_dir, bert_factory):
    from transformers import BertConfig, BertModel
    source = lowcost.load_pretrained(minilm_dir, verbose=False)
    config = BertConfig.from_dict({**source.config.to_dict(), "num_hidden_layers": 8})
    target = BertModel(config)
    report = lowcost.warmstart.transplant(target, minilm_dir)
    assert report.total("copied") > 90 and report.total("initialised") >= 32
    assert 0.7 < report.extra["loaded_fraction"] < 1.0
