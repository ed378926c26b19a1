"""add_tokens(init="distill"): only the new rows move, the distillation loss falls, alignment is exact,
bad input is refused before anything changes."""
import pytest
import torch

import lowcost
from lowcost.warmstart import token_distill

TEXTS = ["Yasser Arafat met the envoy in Ramallah. Arafat said the envoy was welcome.",
         "Militants near Kandahar fired on the envoy; Arafat condemned the militants.",
         "The envoy flew from Kandahar to Ramallah to see Arafat again."]
WORDS = ["Arafat", "Kandahar", "Ramallah"]


def _fresh(tokenizer):
    return tokenizer.__class__.from_pretrained(tokenizer.name_or_path)


def _loss(model, chunks, first):
    with torch.no_grad():
        return sum(float(token_distill.chunk_loss(model, c, first)) for c in chunks) / len(chunks)


def test_align_spans_cover_each_new_token(smol_tokenizer):
    old_tok, new_tok = _fresh(smol_tokenizer), _fresh(smol_tokenizer)
    new_tok.add_tokens([" Arafat"])
    text = "Yasser Arafat said"
    old = old_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    new = new_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    chunk = token_distill.align(old, new, start_id=0)
    arafat = len(new_tok) - 1
    j = new["input_ids"].index(arafat)    # its index without the start token = the position that predicts it
    k = list(chunk.student_pos).index(j)
    pieces = old_tok.encode(" Arafat", add_special_tokens=False)
    assert len(pieces) >= 2 and len(chunk.spans[k]) == len(pieces)
    assert [int(chunk.old_ids[0, t + 1]) for t in chunk.spans[k]] == pieces
    assert all(len(s) == 1 for i, s in enumerate(chunk.spans) if i != k)   # every other token maps 1:1


@pytest.mark.parametrize("tied", [True, False])
def test_only_new_rows_move_and_loss_falls(smol_tokenizer, llama_factory, tied):
    tok = _fresh(smol_tokenizer)
    model = llama_factory(len(tok), tied=tied)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # the subword-mean start, measured on the same chunks the distillation uses
    ref_model, ref_tok = llama_factory(len(tok), tied=tied), _fresh(smol_tokenizer)
    old_tok = _fresh(smol_tokenizer)
    pieces = [p for t in TEXTS for p in token_distill.split_text(t, 1200)]
    old_enc = [old_tok(p, add_special_tokens=False, return_offsets_mapping=True) for p in pieces]
    mean_report = lowcost.warmstart.add_tokens(ref_model, ref_tok, WORDS)
    first = mean_report.extra["new_ids"][0]
    chunks = token_distill.prepare(pieces, old_enc, lambda t: ref_tok(t, add_special_tokens=False,
                                   return_offsets_mapping=True), ref_tok.bos_token_id or ref_tok.eos_token_id,
                                   set(mean_report.extra["new_ids"]))
    start_loss = _loss(ref_model, chunks, first)

    report = lowcost.warmstart.add_tokens(model, tok, WORDS, init="distill", texts=TEXTS, epochs=20, lr=0.05,
                                          progress=False)
    stats = report.extra["distill"]
    assert stats["chunks"] == len(chunks) == 3 and report.counts["tokenizer"]["distilled"] == 3
    assert _loss(model, chunks, first) < 0.9 * start_loss
    for name, param in model.named_parameters():
        assert param.requires_grad == flags[name]
        if param.shape[0] == len(tok) and param.dim() == 2:           # a token table: old rows bitwise
            torch.testing.assert_close(param[:first], before[name][:first], rtol=0, atol=0)
            mean_rows = dict(ref_model.named_parameters())[name][first:]
            assert not torch.equal(param[first:], mean_rows)           # the new rows did move
        else:
            torch.testing.assert_close(param, before[name], rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() or not tied


def test_chunks_without_new_tokens_leave_the_mean(smol_tokenizer, llama_factory):
    tok = _fresh(smol_tokenizer)
    model = llama_factory(len(tok))
    report = lowcost.warmstart.add_tokens(model, tok, WORDS, init="distill", texts=["nothing relevant here"],
                                          progress=False)
    assert report.extra["distill"]["chunks"] == 0 and "no chunk" in report.notes[-1]


@pytest.mark.parametrize("texts, match", [(None, "needs texts"), ("Arafat said", "one string"),
                                          ([], "non-empty list"), ([3], "non-empty list of strings")])
def test_distill_bad_texts(smol_tokenizer, llama_factory, texts, match):
    tok = _fresh(smol_tokenizer)
    model = llama_factory(len(tok))
    with pytest.raises(ValueError, match=match):
        lowcost.warmstart.add_tokens(model, tok, WORDS, init="distill", texts=texts)
    assert len(tok) == model.get_input_embeddings().weight.shape[0]   # nothing changed


def test_distill_needs_a_causal_lm(minilm_tokenizer, bert_factory):
    tok = _fresh(minilm_tokenizer)
    model = bert_factory(len(tok))
    size = len(tok)
    with pytest.raises(ValueError, match="causal LM"):
        lowcost.warmstart.add_tokens(model, tok, ["peacekeepers"], init="distill", texts=TEXTS)
    assert len(tok) == size


def test_embeddings_entry_passes_distill_through(smol_tokenizer, llama_factory):
    tok = _fresh(smol_tokenizer)
    model = llama_factory(len(tok))
    report = lowcost.warmstart.embeddings(model, tok, new_tokens=WORDS, init="distill", texts=TEXTS,
                                          progress=False)
    assert report.kind == "embeddings" and report.counts["tokenizer"]["distilled"] == 3
    assert report.extra["distill"]["chunks"] == 3


@pytest.mark.slow
def test_smollm2_distill_beats_subword_mean_on_held_out_news(smol_gguf, gensim_data):
    """Real weights and text: 6 Lee documents as domain text, 3 later ones held out. Measured: sub-token mean
    1.040× the original tokenizer's NLL, distill 1.013× (about 20 s); the test asks for a 0.01 gap."""
    docs = open(gensim_data("lee_background.cor"), encoding="utf-8", errors="replace").read().splitlines()
    words = ["Arafat", "Qaeda", "Taliban", "militants", "Kandahar", "envoy"]
    train = [d for d in docs[:220] if sum(w in d for w in words) >= 2][:6]
    held = [d for d in docs[220:] if sum(w in d for w in words) >= 2][:3]

    def total_nll(model, tok):
        out = 0.0
        with torch.no_grad():
            for text in held:
                ids = torch.tensor([[tok.eos_token_id] + tok.encode(text, add_special_tokens=False)])
                out += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        return out

    base = total_nll(lowcost.load_pretrained(smol_gguf, verbose=False), lowcost.load_tokenizer(smol_gguf))
    ratios = {}
    for init, extra in (("subword-mean", {}), ("distill", dict(texts=train, progress=False))):
        model, tok = lowcost.load_pretrained(smol_gguf, verbose=False), lowcost.load_tokenizer(smol_gguf)
        report = lowcost.warmstart.add_tokens(model, tok, words, init=init, **extra)
        assert report.total("added") >= 5
        ratios[init] = total_nll(model, tok) / base
    assert ratios["distill"] < ratios["subword-mean"] - 0.01, ratios
    assert ratios["distill"] < 1.03, ratios


def _start_rows(smol_tokenizer, llama_factory, tied):
    """The sub-token-mean rows add_tokens starts from, and the model they give."""
    model, tok = llama_factory(len(_fresh(smol_tokenizer)), tied=tied), _fresh(smol_tokenizer)
    report = lowcost.warmstart.add_tokens(model, tok, WORDS)
    return model, report.extra["new_ids"][0]


def test_held_out_split_is_spread_and_never_empty():
    chunks = list(range(10))
    train, held = token_distill.split_held_out(chunks, 0.2)
    assert held == [4, 9] and train == [0, 1, 2, 3, 5, 6, 7, 8]
    assert token_distill.split_held_out([0, 1], 0.2) == ([0], [1])
    assert token_distill.split_held_out(chunks, 0.0) == (chunks, [])
    assert token_distill.split_held_out([0], 0.2) == ([0], [])


@pytest.mark.parametrize("tied", [True, False])
def test_distill_never_ends_worse_than_its_start(smol_tokenizer, llama_factory, tied):
    """A step far too large wrecks the rows: held-out NLL rises at every check, so the starting rows (the
    sub-token mean) come back bit for bit and the report says nothing was distilled."""
    start_model, first = _start_rows(smol_tokenizer, llama_factory, tied)
    model, tok = llama_factory(len(_fresh(smol_tokenizer)), tied=tied), _fresh(smol_tokenizer)
    texts = TEXTS * 4
    report = lowcost.warmstart.add_tokens(model, tok, WORDS, init="distill", texts=texts, lr=50.0, epochs=3,
                                          progress=False)
    stats = report.extra["distill"]
    assert stats["held_out_chunks"] >= 1 and stats["kept_after_chunks"] == 0 and stats["stopped_early"]
    assert stats["held_out_nll"] == stats["held_out_nll_start"]
    assert report.counts["tokenizer"]["distilled"] == 0 and "no step improved" in report.notes[-1]
    for (name, param), start in zip(model.named_parameters(), start_model.parameters()):
        torch.testing.assert_close(param, start, rtol=0, atol=0, msg=name)


def test_distill_keeps_the_best_held_out_rows(smol_tokenizer, llama_factory):
    """A sensible step: the kept rows score the held-out chunks no worse than the start (re-measured here)."""
    model, tok = llama_factory(len(_fresh(smol_tokenizer))), _fresh(smol_tokenizer)
    report = lowcost.warmstart.add_tokens(model, tok, WORDS, init="distill", texts=TEXTS * 4, lr=0.05,
                                          epochs=4, progress=False)
    stats = report.extra["distill"]
    assert stats["held_out_nll"] <= stats["held_out_nll_start"]
    old_tok = _fresh(smol_tokenizer)
    pieces = [p for t in TEXTS * 4 for p in token_distill.split_text(t, 1200)]
    chunks = token_distill.prepare(pieces, [old_tok(p, add_special_tokens=False, return_offsets_mapping=True)
                                            for p in pieces],
                                   lambda t: tok(t, add_special_tokens=False, return_offsets_mapping=True),
                                   tok.bos_token_id or tok.eos_token_id, set(report.extra["new_ids"]))
    _, held = token_distill.split_held_out(chunks, 0.2)
    assert token_distill.held_out_nll(model, held) == pytest.approx(stats["held_out_nll"], rel=1e-5)


def test_holdout_must_be_a_fraction(smol_tokenizer, llama_factory):
    tok = _fresh(smol_tokenizer)
    with pytest.raises(ValueError, match="holdout"):
        lowcost.warmstart.add_tokens(llama_factory(len(tok)), tok, WORDS, init="distill", texts=TEXTS, holdout=1.0)
    assert len(tok) == len(_fresh(smol_tokenizer))
