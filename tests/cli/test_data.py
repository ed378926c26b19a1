"""The data path of ``lowcost finetune`` piece by piece: record parsing, the held-out split, packing, the
loss mask of chats (responses only), characters per token, batches and the learning-rate schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import build_tokenizer, corpus
from lowcost.cli import CLIError
from lowcost.cli._data import Chat, Dataset, parse_line, read_data, split
from lowcost.cli._encode import IGNORE, collate, encode, render_chat, sequences
from lowcost.cli._train import Batches, WarmupCosine, evaluate


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus())


def test_parse_line_kinds():
    assert parse_line({"text": "a"}) == ("text", "a")
    assert parse_line({"prompt": "p", "completion": "c"}) == ("chat", Chat((("user", "p"), ("assistant", "c"))))
    kind, chat = parse_line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert kind == "chat" and chat.messages == (("user", "q"), ("assistant", "a"))


def test_jsonl_of_mixed_kinds_is_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(CLIError, match=r"mixed.jsonl:2: a chat record in a file of text records"):
        read_data(path)


def test_text_split_is_the_tail_cut_at_a_line_break():
    text = "".join(f"line number {i}\n" for i in range(100))
    train, held = split(Dataset("x.txt", "text", [text]), 0.1, seed=0)
    assert train[0] + held[0] == text
    assert train[0].endswith("\n") and 0.08 < len(held[0]) / len(text) < 0.12


def test_record_split_is_seeded_and_disjoint():
    records = [f"doc {i}" for i in range(50)]
    a = split(Dataset("x.jsonl", "text", records), 0.1, seed=3)
    b = split(Dataset("x.jsonl", "text", records), 0.1, seed=3)
    assert a == b and len(a[1]) == 5 and sorted(a[0] + a[1]) == sorted(records)
    assert split(Dataset("x.jsonl", "text", records), 0.1, seed=4)[1] != a[1]
    chat = Chat((("user", "q"), ("assistant", "a")))
    with pytest.raises(CLIError, match="one record cannot be split"):
        split(Dataset("x.jsonl", "chat", [chat]), 0.1, seed=0)
    assert split(Dataset("x.jsonl", "chat", [chat]), 0.0, seed=0) == ([chat], [])


def _counted_text(tok, seq) -> str:
    return tok.decode([t for t, c in zip(seq.ids, seq.counted) if c])


def test_chat_loss_mask_covers_the_assistant_turns_only(tok):
    chat = Chat((("system", "Be brief."), ("user", "What does dedent do?"), ("assistant", "Removes indentation."),
                 ("user", "And wrap?"), ("assistant", "Splits text into lines.")))
    text, spans = render_chat(tok, chat)
    assert [text[a:b] for a, b in spans] == ["Removes indentation.<|im_end|>\n", "Splits text into lines.<|im_end|>\n"]
    seq = encode(tok, text, spans, add_special_tokens=False)
    assert _counted_text(tok, seq) == "Removes indentation.<|im_end|>\nSplits text into lines.<|im_end|>\n"
    batch = collate([seq], pad_id=0)
    kept = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert tok.decode(kept) == _counted_text(tok, seq)
    # characters of the counted tokens = the characters of the two spans
    assert sum(c for c, k in zip(seq.chars, seq.counted) if k) == sum(b - a for a, b in spans)


def test_prompt_response_without_template_counts_response_and_eos(tok):
    plain = build_tokenizer(corpus())
    plain.chat_template = None
    text, spans = render_chat(plain, Chat((("user", "Question: "), ("assistant", "the answer"))))
    assert text == "Question: the answer<|im_end|>" and text[spans[0][0]:spans[0][1]] == "the answer<|im_end|>"
    with pytest.raises(CLIError, match="chat template"):
        render_chat(plain, Chat((("system", "s"), ("user", "u"), ("assistant", "a"))))


def test_packing_cuts_windows_and_separates_documents_with_eos(tok):
    docs = ["first document about wrapping text", "second document about paths and files"]
    seqs, dropped = sequences(docs, "text", tok, seq_len=8)
    stream = [t for s in seqs for t in s.ids]
    assert dropped == 0 and all(len(s.ids) <= 8 for s in seqs)
    assert stream.count(tok.eos_token_id) == 2 and all(all(s.counted) for s in seqs)
    assert tok.decode(stream) == docs[0] + "<|im_end|>" + docs[1] + "<|im_end|>"
    # characters per token add up to the text, whatever the tokenization
    assert sum(c for s in seqs for c in s.chars) == sum(len(d) for d in docs)


def test_chats_too_long_for_seq_len_are_dropped_and_counted(tok):
    long = Chat((("user", "x " * 200), ("assistant", "short answer")))
    short = Chat((("user", "hi"), ("assistant", "hello there")))
    seqs, dropped = sequences([long, short], "chat", tok, seq_len=32)
    assert dropped == 1 and len(seqs) == 1 and seqs[0].targets() > 0


def test_batches_are_a_function_of_seed_and_step(tok):
    seqs, _ = sequences([corpus()], "text", tok, seq_len=16)
    a, b = Batches(seqs, 3, seed=7, pad_id=0), Batches(seqs, 3, seed=7, pad_id=0)
    for k in (0, 5, a.per_epoch + 2, 3 * a.per_epoch):          # any order of access, across epochs
        assert torch.equal(a.micro(k)["input_ids"], b.micro(k)["input_ids"])
    def epoch(e):
        return [tuple(row[mask.bool()].tolist()) for k in range(e * a.per_epoch, (e + 1) * a.per_epoch)
                for row, mask in zip(a.micro(k)["input_ids"], a.micro(k)["attention_mask"])]
    first, second = epoch(0), epoch(1)
    assert first != second                                        # each epoch has its own order
    assert sorted(first) == sorted(second) == sorted(tuple(s.ids) for s in seqs)   # every sequence once


def test_warmup_then_cosine_to_zero():
    schedule = WarmupCosine(warmup=4, total=20)
    factors = [schedule(s) for s in range(20)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8] and factors[4] == 1.0
    assert all(x >= y for x, y in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.01
    assert schedule(20) == 0.0


def test_evaluate_matches_cross_entropy_by_hand(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    seqs, _ = sequences(["alpha beta gamma delta", "short"], "text", tok, seq_len=6)
    batch = collate(seqs[:3], pad_id=tok.pad_token_id)
    result = evaluate(model, [batch], torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
    n = int((labels != IGNORE).sum())
    assert result["tokens"] == n and result["loss"] == pytest.approx(float(nll) / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["nats_per_char"] == pytest.approx(float(nll) / result["chars"], rel=1e-5)
