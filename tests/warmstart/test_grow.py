"""grow: wider MLPs and more blocks leave the outputs unchanged (fp32, max |Δ| ≤ 1e-4)."""
import pytest
import torch

import lowcost


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("width,depth", [(40, None), (None, 5), (48, 4)])
def test_tiny_llama_and_bert_preserved(llama_factory, bert_factory, width, depth):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for model in (llama_factory(64), bert_factory(64)):
        before = _out(model, ids)
        lowcost.warmstart.grow(model, width=width, depth=depth)
        after = _out(model, ids)
        assert (after - before).abs().max() <= 1e-5
        report = model.lowcost_grow_report
        if depth:
            assert model.config.num_hidden_layers == depth and report.counts["blocks"]["added"] == depth - 2
        if width:
            assert model.config.intermediate_size == width


def test_new_units_get_gradients(llama_factory):
    model = llama_factory(64)
    lowcost.warmstart.grow(model, width=40, depth=3)
    model.requires_grad_(True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.grad[:, 24:].abs().sum() > 0                     # new zero columns learn at once
    new_block = model.model.layers[1]
    assert new_block.self_attn.o_proj.weight.grad.abs().sum() > 0
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_bad_arguments(llama_factory):
    model = llama_factory(64)
    with pytest.raises(ValueError, match="width= "):
        lowcost.warmstart.grow(model)
    with pytest.raises(ValueError, match="smaller than the current"):
        lowcost.warmstart.grow(model, width=8)
    with pytest.raises(ValueError, match="smaller than the current 2 blocks"):
        lowcost.warmstart.grow(model, depth=1)


def test_minilm_real_preserved(minilm_dir, minilm_tokenizer):
    model = lowcost.load_pretrained(minilm_dir, verbose=False)
    batch = minilm_tokenizer(["Warm starts keep what is trained.", "A second sentence"], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        lowcost.warmstart.grow(model, width=1664, depth=8)
        after = model(**batch).last_hidden_state
    assert (after - before).abs().max() <= 1e-4


@pytest.mark.slow
def test_smollm2_real_preserved(smol_gguf):
    model = lowcost.load_pretrained(smol_gguf, verbose=False)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1789, 30, 2]])
    before = _out(model, ids)
    lowcost.warmstart.grow(model, width=1600, depth=32)
    assert (_out(model, ids) - before).abs().max() <= 1e-4
