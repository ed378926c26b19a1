"""Records → token sequences → padded batches, keeping what the loss counts and how many characters each
token stands for.

A ``Sequence`` holds the token ids, ``counted`` (the token is a training target: all tokens of plain text,
the assistant turns of a chat) and ``chars``: the characters of the text between the previous token's end
and this token's end that lie in a counted span. Summed over predicted tokens this is the length of the text
the loss covers, whatever the tokenizer, so ``nats per character`` compares tokenizers (``--new-tokens``).

Plain text is packed: documents are tokenized (with the tokenizer's own special tokens), joined with EOS
and cut into windows of ``seq_len`` tokens. A chat is rendered with the tokenizer's chat template; each
assistant turn's character span is found by rendering the conversation up to it (with and without the turn)
and the rendered text is tokenized once with offsets. A chat longer than ``seq_len`` is truncated; one left
without a target token is dropped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowcost.cli import CLIError
from lowcost.cli._data import Chat

IGNORE = -100


@dataclass
class Sequence:
    ids: list = field(default_factory=list)
    counted: list = field(default_factory=list)
    chars: list = field(default_factory=list)

    def extend(self, other: "Sequence") -> None:
        self.ids += other.ids
        self.counted += other.counted
        self.chars += other.chars

    def window(self, start: int, stop: int) -> "Sequence":
        return Sequence(self.ids[start:stop], self.counted[start:stop], self.chars[start:stop])

    def targets(self) -> int:
        """Tokens the loss counts (position 0 is never predicted)."""
        return sum(self.counted[1:])


def _overlap(lo: int, hi: int, spans) -> int:
    return sum(max(0, min(hi, b) - max(lo, a)) for a, b in spans)


def encode(tokenizer, text: str, spans, add_special_tokens: bool) -> Sequence:
    """Tokenizes ``text`` with offsets; ``spans``: [(start, end)] character ranges that count."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    seq, prev_end = Sequence(), 0
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = _overlap(start, end, spans) > 0 or (start == end and _overlap(start, start + 1, spans) > 0)
        seq.ids.append(token)
        seq.counted.append(inside)
        seq.chars.append(_overlap(prev_end, end, spans) if end > prev_end else 0)
        prev_end = max(prev_end, end)
    return seq


def _template(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def render_chat(tokenizer, chat: Chat) -> tuple[str, list]:
    """(rendered text, character spans of the assistant turns)."""
    messages = [{"role": role, "content": content} for role, content in chat.messages]
    if not getattr(tokenizer, "chat_template", None):
        roles = [role for role, _ in chat.messages]
        if roles != ["user", "assistant"]:
            raise CLIError("chat 'messages' need a tokenizer with a chat template; this model's tokenizer has "
                           "none (prompt/response records work without one)")
        prompt, response = chat.messages[0][1], chat.messages[1][1] + (tokenizer.eos_token or "")
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    full = _template(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True) if i else ""
        upto = _template(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise CLIError("the tokenizer's chat template does not render a conversation prefix by prefix, so the "
                           "assistant turns cannot be located for the loss mask")
        spans.append((len(before), len(upto)))
    return full, spans


def _pack(docs: list[Sequence], seq_len: int, eos_id) -> list[Sequence]:
    stream = Sequence()
    for doc in docs:
        stream.extend(doc)
        if eos_id is not None and (not doc.ids or doc.ids[-1] != eos_id):
            stream.extend(Sequence([eos_id], [True], [0]))
    windows = [stream.window(i, i + seq_len) for i in range(0, len(stream.ids), seq_len)]
    return [w for w in windows if len(w.ids) >= 2]


def sequences(records: list, kind: str, tokenizer, seq_len: int) -> tuple[list[Sequence], int]:
    """(sequences of at most ``seq_len`` tokens, chats dropped because truncation left no target)."""
    if kind == "text":
        docs = [encode(tokenizer, text, [(0, len(text))], add_special_tokens=True) for text in records]
        return _pack(docs, seq_len, tokenizer.eos_token_id), 0
    out, dropped = [], 0
    for chat in records:
        text, spans = render_chat(tokenizer, chat)
        seq = encode(tokenizer, text, spans, add_special_tokens=False).window(0, seq_len)
        if seq.targets() == 0:
            dropped += 1
        else:
            out.append(seq)
    return out, dropped


def collate(batch: list[Sequence], pad_id: int) -> dict:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE where not counted or padded) and
    chars (characters per token, 0 on padding), all (B, T) int64."""
    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    chars = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        n = len(seq.ids)
        ids[row, :n] = torch.tensor(seq.ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(seq.counted), torch.tensor(seq.ids), IGNORE)
        chars[row, :n] = torch.tensor(seq.chars)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "chars": chars}


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return value
    return 0
