"""import_vectors: exact / case-folded / sub-token mapping, least-squares projection, model sources."""
import numpy as np
import pytest
import torch

import lowcost
from lowcost.warmstart.vectors import VectorFormatError


def _vocab_words(tok, n=400):
    words = []
    for token in tok.convert_ids_to_tokens(list(range(2000, 2000 + 3 * n))):
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 3:
            words.append(token[1:])
    return words[:n]


def test_lstsq_recovers_a_linear_map(smol_tokenizer, llama_factory):
    model = llama_factory(len(smol_tokenizer), hidden=16)
    words = _vocab_words(smol_tokenizer)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(len(words), 8, generator=g)
    truth = torch.randn(9, 16, generator=g)
    ids = [smol_tokenizer.convert_tokens_to_ids("Ġ" + w) for w in words]
    with torch.no_grad():      # make the model's rows an exact affine image of the source vectors
        model.get_input_embeddings().weight[ids] = torch.cat([src, torch.ones(len(words), 1)], 1) @ truth
    fill = ids[:50]
    with torch.no_grad():
        model.get_input_embeddings().weight[fill] = 0
    report = lowcost.warmstart.import_vectors(model, smol_tokenizer, (words, src.numpy()), token_ids=fill)
    counts = report.counts["(tokens, matrix)"]
    assert counts["matched"] == 50 and counts["projected"] == 50
    assert report.extra["fit_r2[(tokens, matrix)]"] > 0.999
    want = torch.cat([src[:50], torch.ones(50, 1)], 1) @ truth
    torch.testing.assert_close(model.get_input_embeddings().weight[fill], want, atol=1e-2, rtol=1e-2)  # ridge 1e-3


def test_case_fold_and_sub_token(minilm_tokenizer, bert_factory):
    tok = minilm_tokenizer
    model = bert_factory(len(tok), hidden=4)
    words = ["Peace", "keepers", "WAR"]
    vecs = np.eye(4, dtype=np.float32)[:3]
    ids = [tok.convert_tokens_to_ids(t) for t in ("peace", "war")]
    report = lowcost.warmstart.import_vectors(model, tok, (words, vecs), token_ids=ids, project="none")
    assert report.counts["(tokens, matrix)"]["case_folded"] == 2
    torch.testing.assert_close(model.get_input_embeddings().weight[ids[0]], torch.tensor([1.0, 0, 0, 0]))


def test_sub_token_mean_from_file(tmp_path, minilm_tokenizer, bert_factory):
    path = tmp_path / "v.txt"
    path.write_text("foot 1 0\nball 0 1\n")
    model = bert_factory(len(minilm_tokenizer), hidden=2)
    tid = minilm_tokenizer.vocab["football"]
    report = lowcost.warmstart.import_vectors(model, minilm_tokenizer, str(path), token_ids=[tid], project="none")
    assert report.counts[str(path)]["sub_token"] == 1
    torch.testing.assert_close(model.get_input_embeddings().weight[tid], torch.tensor([0.5, 0.5]))


def test_model_source_same_tokenizer_matches_everything(minilm_dir, minilm_tokenizer, bert_factory):
    source = lowcost.load_pretrained(minilm_dir, verbose=False)
    target = bert_factory(len(minilm_tokenizer), hidden=384)
    report = lowcost.warmstart.import_vectors(target, minilm_tokenizer, (source, minilm_tokenizer), project="none")
    counts = report.counts["BertModel"]
    assert counts["matched"] >= 30000 and report.counts["model"]["random"] <= 10
    torch.testing.assert_close(target.get_input_embeddings().weight[2000], source.get_input_embeddings().weight[2000])


def test_real_vec_file_orthogonal_into_small_model(gensim_data, smol_tokenizer, llama_factory):
    model = llama_factory(len(smol_tokenizer), hidden=16)
    path = gensim_data("lee_fasttext.vec")
    report = lowcost.warmstart.import_vectors(model, smol_tokenizer, path, project="orthogonal")
    counts = report.counts[path]
    assert counts["matched"] > 1000 and counts["case_folded"] > 100 and counts["sub_token"] > 0
    rms = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
    assert 0.005 < float(rms) < 0.1


def test_several_sources_fill_in_order(tmp_path, minilm_tokenizer, bert_factory):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("peace 1 0\n")
    b.write_text("peace 5 5\nwar 0 1\n")
    model = bert_factory(len(minilm_tokenizer), hidden=2)
    ids = [minilm_tokenizer.convert_tokens_to_ids(t) for t in ("peace", "war")]
    report = lowcost.warmstart.import_vectors(model, minilm_tokenizer, [str(a), str(b)], token_ids=ids,
                                              project="none")
    assert report.counts[str(a)]["matched"] == 1 and report.counts[str(b)]["matched"] == 1
    torch.testing.assert_close(model.get_input_embeddings().weight[ids[0]], torch.tensor([1.0, 0.0]))


def test_errors(tmp_path, minilm_tokenizer, bert_factory):
    model = bert_factory(len(minilm_tokenizer), hidden=4)
    with pytest.raises(VectorFormatError, match="dimension 3, the model 4"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, (["peace"], np.ones((1, 3))), project="none")
    with pytest.raises(VectorFormatError, match="2 tokens but a matrix"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, (["a", "b"], np.ones((3, 4))))
    with pytest.raises(ValueError, match="overlapping tokens"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, (["peace"], np.ones((1, 3))))
    with pytest.raises(ValueError, match="project must be"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, (["peace"], np.ones((1, 4))), project="pca")
    empty = tmp_path / "e.vec"
    empty.write_text("")
    with pytest.raises(VectorFormatError, match="empty"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, str(empty))
    with pytest.raises(TypeError, match="needs its tokenizer"):
        lowcost.warmstart.import_vectors(model, minilm_tokenizer, bert_factory())


def test_added_token_with_its_space_is_a_word_start(smol_tokenizer, llama_factory):
    """add_tokens keeps " Arafat" with a literal space; it must be looked up as the word "Arafat"."""
    from tokenizers import AddedToken
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.add_tokens([AddedToken(" Arafat", normalized=False)])
    model = llama_factory(len(tok), hidden=4)
    tid = len(tok) - 1
    report = lowcost.warmstart.import_vectors(model, tok, (["Arafat"], np.ones((1, 4), np.float32)),
                                              token_ids=[tid], project="none")
    assert report.counts["(tokens, matrix)"]["matched"] == 1
    torch.testing.assert_close(model.get_input_embeddings().weight[tid], torch.ones(4))


def test_new_ids_stay_out_of_the_fit(smol_tokenizer, llama_factory):
    model = llama_factory(len(smol_tokenizer), hidden=16)
    words = _vocab_words(smol_tokenizer, 200)
    g = torch.Generator().manual_seed(0)
    src, truth = torch.randn(len(words), 8, generator=g), torch.randn(9, 16, generator=g)
    ids = [smol_tokenizer.convert_tokens_to_ids("Ġ" + w) for w in words]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = torch.cat([src, torch.ones(len(words), 1)], 1) @ truth
        model.get_input_embeddings().weight[ids[:20]] = 0          # "just initialised": no evidence
    emb = model.get_input_embeddings().weight
    kept = lowcost.warmstart.import_vectors(model, smol_tokenizer, (words, src.numpy()), new_ids=ids[:20],
                                            fill_new=False)
    assert kept.extra["fit_r2[(tokens, matrix)]"] > 0.999 and float(emb[ids[:20]].detach().abs().max()) == 0
    filled = lowcost.warmstart.import_vectors(model, smol_tokenizer, (words, src.numpy()), new_ids=ids[:20])
    assert filled.counts["(tokens, matrix)"]["matched"] == kept.counts["(tokens, matrix)"]["matched"] + 20
    want = torch.cat([src[:20], torch.ones(20, 1)], 1) @ truth
    torch.testing.assert_close(emb[ids[:20]], want, atol=1e-2, rtol=1e-2)
