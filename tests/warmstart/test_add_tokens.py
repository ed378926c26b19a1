"""add_tokens: new rows = mean of the old pieces (position-weighted with tilt > 0), tied stays tied, rows distinct."""
import pytest
import torch

import lowcost
from lowcost.warmstart.tokens import _piece_weights

WORDS = ["Arafat", "Qantas", "peacekeepers", "Kandahar", "the"]


def test_tied_llama_rows_are_piece_means(smol_tokenizer, llama_factory):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)   # fresh copy
    model = llama_factory(len(tok))
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = {w: tok.encode(" " + w, add_special_tokens=False) for w in WORDS}
    report = lowcost.warmstart.add_tokens(model, tok, WORDS)
    assert report.counts["tokenizer"]["added"] == 4 and report.counts["tokenizer"]["existing"] == 1
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == old.shape[0] + 4
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()                    # still tied
    torch.testing.assert_close(emb[: old.shape[0]], old, rtol=0, atol=0)       # old rows untouched
    for offset, word in enumerate(WORDS[:4]):
        ids = pieces[word]
        torch.testing.assert_close(emb[old.shape[0] + offset], old[ids].mean(0))   # the default: plain mean
        assert tok.encode(f"said {word} today", add_special_tokens=False)[1] == old.shape[0] + offset
    assert torch.unique(emb[old.shape[0]:], dim=0).shape[0] == 4


def test_untied_output_side_and_bias(minilm_tokenizer, llama_factory):
    tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    model = llama_factory(len(tok), tied=False)
    old_out = model.lm_head.weight.detach().clone()
    ids = tok.encode("peacekeepers", add_special_tokens=False)
    report = lowcost.warmstart.add_tokens(model, tok, ["peacekeepers", "warplanes"])
    assert len(report.new) == 2 and report.extra["tied"] is False
    torch.testing.assert_close(model.lm_head.weight[len(tok) - 2], old_out[ids].mean(0))


def test_tilt_weights_pieces_by_position(smol_tokenizer, llama_factory):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    model = llama_factory(len(tok))
    old = model.get_input_embeddings().weight.detach().clone()
    ids = tok.encode(" Kandahar", add_special_tokens=False)
    lowcost.warmstart.add_tokens(model, tok, ["Kandahar"], tilt=0.1)
    weights = _piece_weights(len(ids), 0.1)
    assert weights[0] > weights[-1] and abs(float(weights.sum()) - 1) < 1e-6
    torch.testing.assert_close(model.get_input_embeddings().weight[-1], weights @ old[ids])


def test_permuted_pieces_and_collisions_stay_distinct(minilm_tokenizer, llama_factory):
    # "Peacekeepers" and "peacekeepers" normalise to the same pieces in an uncased WordPiece tokenizer
    # with the plain mean (default) "keeperspeace" has "peacekeepers"' pieces too: jitter keeps them apart
    for tilt in (0.0, 0.1):
        tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
        model = llama_factory(len(tok))
        report = lowcost.warmstart.add_tokens(model, tok, ["peacekeepers", "Peacekeepers", "keeperspeace"], tilt=tilt)
        new = model.get_input_embeddings().weight[-report.counts["tokenizer"]["added"]:]
        assert torch.unique(new, dim=0).shape[0] == new.shape[0]


@pytest.mark.parametrize("init", ["random", "mean-resize"])
def test_baseline_inits(minilm_tokenizer, llama_factory, init):
    tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    model = llama_factory(len(tok))
    report = lowcost.warmstart.add_tokens(model, tok, ["peacekeepers", "warplanes"], init=init)
    assert report.counts["tokenizer"]["added"] == 2 and report.extra["init"] == init


def test_unknown_init(minilm_tokenizer, llama_factory):
    with pytest.raises(ValueError, match="init must be"):
        lowcost.warmstart.add_tokens(llama_factory(10), minilm_tokenizer, ["x"], init="zeros")


def test_minilm_plus_100_keeps_every_pretrained_row(minilm_dir, minilm_tokenizer, gensim_data):
    model = lowcost.load_pretrained(minilm_dir, verbose=False)
    tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    old = model.get_input_embeddings().weight.detach().clone()
    words = _domain_words(tok, gensim_data, 100)
    report = lowcost.warmstart.add_tokens(model, tok, words)
    emb = model.get_input_embeddings().weight
    assert report.counts["tokenizer"]["added"] == 100 and emb.shape[0] == 30622
    assert torch.equal(emb[:30522], old)
    assert torch.unique(emb[30522:], dim=0).shape[0] == 100


def _domain_words(tok, datapath, n):
    import collections
    import re
    text = open(datapath("lee_background.cor"), encoding="utf-8", errors="replace").read()
    counts = collections.Counter(re.findall(r"[a-z]{4,}", text.lower()))
    return [w for w, _ in counts.most_common() if len(tok.encode(w, add_special_tokens=False)) > 1][:n]


@pytest.mark.slow
def test_smollm2_new_tokens_step0_loss_close(smol_gguf, smol_tokenizer):
    text = ("The Palestinian leader Yasser Arafat met the envoy Anthony Zinni in Ramallah while militants "
            "of Hamas and Islamic Jihad fired on peacekeepers near Kandahar, where Taliban gunmen hid.")
    model = lowcost.load_pretrained(smol_gguf, verbose=False)
    ids = torch.tensor([[smol_tokenizer.eos_token_id] + smol_tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        base = float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    report = lowcost.warmstart.add_tokens(model, tok, ["Arafat", "Zinni", "Ramallah", "Kandahar", "peacekeepers"])
    new = torch.tensor([[tok.eos_token_id] + tok.encode(text, add_special_tokens=False)])
    assert new.shape[1] < ids.shape[1] and report.total("added") == 5
    with torch.no_grad():
        after = float(model(new, labels=new).loss) * (new.shape[1] - 1)
    assert after / base < 1.15                      # same text, total NLL: close to the original tokenizer


def test_padded_table_is_not_shrunk(minilm_tokenizer, llama_factory):
    tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    model = llama_factory(len(tok) + 8)                       # a table padded beyond the tokenizer
    report = lowcost.warmstart.add_tokens(model, tok, ["peacekeepers", "warplanes"])
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 6
    assert report.extra["new_ids"] == [len(tok) - 2, len(tok) - 1]
