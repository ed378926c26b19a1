"""Helpers for the CLI tests: a tiny Llama with a small byte-level BPE tokenizer (chat template included),
saved as an HF directory, and data files in every format ``lowcost finetune`` reads. Built from configs and
Python's own standard-library text: nothing is downloaded."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus() -> str:
    """Real English text that ships with Python: the docstrings of a few standard-library modules."""
    import argparse, collections, json as json_module, pathlib, shutil  # noqa: E401
    docs = [inspect.getdoc(m) or "" for m in (textwrap, argparse, collections, json_module, pathlib, shutil)]
    docs += [inspect.getdoc(f) or "" for f in (textwrap.wrap, textwrap.fill, textwrap.dedent, shutil.copytree,
                                                 json_module.dumps, json_module.loads)]
    return "\n\n".join(d for d in docs if d)


def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: Path, tokenizer, max_positions: int = 96) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def paragraphs() -> list[str]:
    return [p.strip() for p in corpus().split("\n\n") if len(p.strip()) > 40]


def run_cli(*args, env=None, timeout=3600) -> subprocess.CompletedProcess:
    """``python -m lowcost.cli ARGS`` in a subprocess (what a user's shell runs)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "lowcost.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def strip_last_checkpoint(out: Path, copy: Path) -> None:
    """``out`` copied to ``copy`` as if the run had been killed just before its last checkpoint."""
    shutil.copytree(out, copy)
    newest = sorted((copy / "checkpoints").glob("step-*"))[-1]
    for path in (newest, copy / "adapter"):
        shutil.rmtree(path)
    for name in ("metrics.json", "loss.png"):
        (copy / name).unlink()
