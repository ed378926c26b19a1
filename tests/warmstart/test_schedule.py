"""FreezeThenUnfreeze: phase 1 trains (and holds optimizer state for) only the new rows/blocks."""
import pytest
import torch

import lowcost
from lowcost.warmstart import FreezeThenUnfreeze, NewSlice


def _batch(vocab):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _add_rows(model, n=4):
    """Grows the tables by ``n`` rows as add_tokens does (without a tokenizer) and names them."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + n, mean_resizing=False)
    model.requires_grad_(False)
    return old, [NewSlice("model.embed_tokens.weight", 0, old)]


def test_new_rows_only_then_unfreeze(llama_factory):
    model = llama_factory(32)
    old, new = _add_rows(model)
    before = model.get_input_embeddings().weight.detach().clone()
    sched = FreezeThenUnfreeze(model, new, warm_steps=2, optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    state_sizes = [p.numel() for p in sched.trainable()]
    assert state_sizes == [4 * 16]                                       # optimizer holds the 4 new rows only
    ids = _batch(old + 4)
    ids[0, :2] = torch.tensor([old, old + 1])
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        sched.step()
    weight = model.get_input_embeddings().weight
    assert sched.phase == "unfreeze" and model.lm_head.weight is weight          # tie survives
    assert torch.equal(weight[:old], before[:old]) and not torch.equal(weight[old:], before[old:])
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for g in sched.optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
    model(ids, labels=ids).loss.backward()
    sched.step()
    assert not torch.equal(model.get_input_embeddings().weight[:old], before[:old])


def test_new_blocks_then_lora(llama_factory):
    model = llama_factory(32)
    lowcost.warmstart.grow(model, width=32, depth=3)
    _, rows = _add_rows(model)
    new = model.lowcost_grow_report.new + rows
    sched = FreezeThenUnfreeze(model, new, warm_steps=1, then="lora", lora=lowcost.LoRAConfig(r=2, alpha=4))
    ids = _batch(32)
    model(ids, labels=ids).loss.backward()
    sched.step()
    assert sched.phase == "lora"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora" in n.lower() for n in names) and any("embed_tokens.parametrizations" in n for n in names)
    assert "model.layers.1.input_layernorm.weight" in names                      # the new block trains whole
    assert "model.layers.0.input_layernorm.weight" not in names
    model(ids, labels=ids).loss.backward()
    sched.step()
    sched.finish()
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_bad_arguments(llama_factory):
    model = llama_factory(32)
    with pytest.raises(KeyError, match="not a parameter"):
        FreezeThenUnfreeze(model, [NewSlice("nope.weight", 0, 3)], warm_steps=1)
    with pytest.raises(ValueError, match="nothing new"):
        FreezeThenUnfreeze(model, [], warm_steps=1)
    with pytest.raises(ValueError, match="needs lora"):
        FreezeThenUnfreeze(model, [NewSlice("lm_head.weight")], warm_steps=1, then="lora")
