"""lowcost.warmstart.embeddings: new tokens, vectors, both (new rows kept or overwritten), neither; one report."""
import numpy as np
import pytest
import torch

import lowcost

NEW = ["Arafat", "Qantas"]            # two pieces or more each in SmolLM2's tokenizer


def _fresh(tok):
    return tok.__class__.from_pretrained(tok.name_or_path)


def _vocab_words(tok, n=300):
    words = []
    for token in tok.convert_ids_to_tokens(list(range(2000, 2000 + 3 * n))):
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 3:
            words.append(token[1:])
    return words[:n]


def _affine_source(tok, model, extra_words=(), dim=8, seed=0):
    """(words, vectors) whose model rows are made an exact affine image ``[v, 1] @ truth`` of the vectors."""
    words = _vocab_words(tok)
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(len(words) + len(extra_words), dim, generator=g)
    truth = torch.randn(dim + 1, model.config.hidden_size, generator=g)
    ids = [tok.convert_tokens_to_ids("Ġ" + w) for w in words]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = torch.cat([vecs[: len(words)], torch.ones(len(words), 1)], 1) @ truth
    return list(words) + list(extra_words), vecs, truth


def test_new_tokens_only_is_add_tokens(smol_tokenizer, llama_factory):
    tok, twin_tok = _fresh(smol_tokenizer), _fresh(smol_tokenizer)
    model, twin = llama_factory(len(tok)), llama_factory(len(tok))
    report = lowcost.warmstart.embeddings(model, tok, new_tokens=NEW + ["the"])
    direct = lowcost.warmstart.add_tokens(twin, twin_tok, NEW + ["the"])
    assert report.kind == "embeddings"
    assert report.counts == direct.counts and report.counts["tokenizer"]["added"] == 2
    assert report.new == direct.new and report.new
    assert [e["token"] for e in report.entries] == [repr(" " + w) for w in NEW]
    assert all(e["init"] == "subword-mean" for e in report.entries)
    torch.testing.assert_close(model.get_input_embeddings().weight, twin.get_input_embeddings().weight,
                               rtol=0, atol=0)
    assert "new_rows_imported" not in report.extra


def test_vectors_only_is_import_vectors(minilm_tokenizer, llama_factory):
    tok = minilm_tokenizer
    model = llama_factory(len(tok), hidden=4)
    words, vecs = ["peace", "War", "keepers"], np.eye(4, dtype=np.float32)[:3]
    report = lowcost.warmstart.embeddings(model, tok, vectors=(words, vecs), project="none")
    assert len(tok) == model.get_input_embeddings().weight.shape[0]          # nothing added
    counts = report.counts["(tokens, matrix)"]
    assert counts["matched"] >= 2 and counts["case_folded"] >= 1 and report.new == [] and report.entries == []
    assert "tokenizer" not in report.counts and report.counts["model"]["random"] > 0
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("peace")], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("war")], torch.tensor([0.0, 1, 0, 0]))


def test_vectors_from_a_fasttext_bin(gensim_data, minilm_tokenizer, llama_factory):
    path = gensim_data("crime-and-punishment.bin")           # dim 5 → PCA to the model's 4
    model, twin = llama_factory(len(minilm_tokenizer), hidden=4), llama_factory(len(minilm_tokenizer), hidden=4)
    report = lowcost.warmstart.embeddings(model, minilm_tokenizer, vectors=path, project="orthogonal")
    direct = lowcost.warmstart.import_vectors(twin, minilm_tokenizer, path, project="orthogonal")
    assert report.counts[path]["matched"] > 50 and report.counts == direct.counts
    torch.testing.assert_close(model.get_input_embeddings().weight, twin.get_input_embeddings().weight)
    fresh = llama_factory(len(minilm_tokenizer), hidden=4).get_input_embeddings().weight
    which = minilm_tokenizer.convert_tokens_to_ids("which")
    assert not torch.equal(model.get_input_embeddings().weight[which], fresh[which])


def test_both_same_space_overwrites_matched_new_rows(smol_tokenizer, llama_factory):
    """project="none" (vectors in the model's space / a fresh model): a new word the source has replaces the
    sub-token mean; one it cannot match keeps it."""
    tok, twin_tok = _fresh(smol_tokenizer), _fresh(smol_tokenizer)
    model, twin = llama_factory(len(tok), hidden=4), llama_factory(len(tok), hidden=4)
    source = (["Arafat", "peace"], np.array([[1, 2, 3, 4], [0, 0, 0, 1]], np.float32))
    report = lowcost.warmstart.embeddings(model, tok, new_tokens=NEW, vectors=source, project="none")
    lowcost.warmstart.add_tokens(twin, twin_tok, NEW)
    emb, twin_emb = model.get_input_embeddings().weight, twin.get_input_embeddings().weight
    arafat, qantas = tok.convert_tokens_to_ids(" Arafat"), tok.convert_tokens_to_ids(" Qantas")
    assert arafat == len(tok) - 2 and qantas == len(tok) - 1
    torch.testing.assert_close(emb[arafat], torch.tensor([1.0, 2, 3, 4]))             # exact match wins
    torch.testing.assert_close(emb[qantas], twin_emb[qantas], rtol=0, atol=0)        # no match: kept
    assert report.extra["overwrite_new"] is True and report.extra["new_rows_imported"] == 1
    assert {e["id"]: e["init"] for e in report.entries} == {arafat: "imported", qantas: "subword-mean"}
    assert report.counts["tokenizer"]["added"] == 2 and report.counts["(tokens, matrix)"]["matched"] >= 2
    assert report.new and report.new[0].start == len(tok) - 2


@pytest.mark.parametrize("overwrite_new", [None, True])
def test_both_lstsq_keeps_new_rows_unless_told(smol_tokenizer, llama_factory, overwrite_new):
    """project="lstsq" (a pretrained model): by default the new rows keep the mean of the model's own pieces
    and stay out of the fit; overwrite_new=True writes the projected vector of an exact match instead."""
    tok, twin_tok = _fresh(smol_tokenizer), _fresh(smol_tokenizer)
    model, twin = llama_factory(len(tok)), llama_factory(len(tok))
    words, vecs, truth = _affine_source(tok, model, extra_words=["Arafat"])
    _affine_source(twin_tok, twin, extra_words=["Arafat"])
    report = lowcost.warmstart.embeddings(model, tok, new_tokens=NEW, vectors=(words, vecs.numpy()),
                                          overwrite_new=overwrite_new)
    lowcost.warmstart.add_tokens(twin, twin_tok, NEW)
    arafat = tok.convert_tokens_to_ids(" Arafat")
    row, kept = model.get_input_embeddings().weight[arafat], twin.get_input_embeddings().weight[arafat]
    projected = torch.cat([vecs[-1], torch.ones(1)]) @ truth
    if overwrite_new:
        assert report.extra["overwrite_new"] is True and report.extra["new_rows_imported"] >= 1
        torch.testing.assert_close(row, projected, atol=1e-2, rtol=1e-2)                # ridge 1e-3
        assert report.extra["fit_r2[(tokens, matrix)]"] > 0.999      # the new rows did not enter the fit
    else:
        assert report.extra["overwrite_new"] is False and report.extra["new_rows_imported"] == 0
        torch.testing.assert_close(row, kept, rtol=0, atol=0)
        assert all(e["init"] == "subword-mean" for e in report.entries)
        assert report.extra["fit_r2[(tokens, matrix)]"] > 0.999      # the new rows did not enter the fit
    assert not torch.allclose(kept, projected, atol=5e-2, rtol=5e-2)   # the two outcomes are distinguishable


def test_neither_is_an_error(minilm_tokenizer, llama_factory):
    with pytest.raises(ValueError, match=r"vectors=.*new_tokens="):
        lowcost.warmstart.embeddings(llama_factory(len(minilm_tokenizer)), minilm_tokenizer)


def test_bad_arguments_fail_before_any_change(tmp_path, minilm_tokenizer, llama_factory):
    tok = _fresh(minilm_tokenizer)
    model = llama_factory(len(tok))
    size = len(tok)
    with pytest.raises(TypeError, match="'tilth'"):
        lowcost.warmstart.embeddings(model, tok, new_tokens=["peacekeepers"], tilth=0.2)
    with pytest.raises(ValueError, match="tilt: add_tokens arguments given without new_tokens"):
        lowcost.warmstart.embeddings(model, tok, vectors=(["peace"], np.ones((1, 16))), tilt=0.2)
    with pytest.raises(TypeError, match="list of words"):
        lowcost.warmstart.embeddings(model, tok, new_tokens="peacekeepers")
    with pytest.raises(ValueError, match="project must be"):
        lowcost.warmstart.embeddings(model, tok, new_tokens=["peacekeepers"], vectors=(["a"], np.ones((1, 16))),
                                     project="pca")
    with pytest.raises(FileNotFoundError):
        lowcost.warmstart.embeddings(model, tok, new_tokens=["peacekeepers"], vectors=str(tmp_path / "no.vec"))
    assert len(tok) == size == model.get_input_embeddings().weight.shape[0]
    report = lowcost.warmstart.embeddings(model, tok, new_tokens=["peacekeepers"], tilt=0.0)   # known: passed on
    assert report.counts["tokenizer"]["added"] == 1
