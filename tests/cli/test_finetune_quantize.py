"""``lowcost finetune --quantize``: LoRA on a base loaded quantized (``load_pretrained(quantize=...)``).

A few steps on the tiny Llama with an nf4 and an int8 base: the held-out loss falls, the adapter is saved in
PEFT layout and loads onto the dense model with PEFT (the same adapter tensors, and they change its output);
``--quantize gguf`` keeps a GGUF file's blocks (and refuses --new-tokens: its embedding is quantized); a scheme that does not exist, or gguf on an HF directory, is a
one-line error naming --quantize.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from cli_helpers import ROOT

FAST = ["--seq-len", "32", "--batch", "2"]


def _finetune(capsys, *args) -> tuple[int, str, str]:
    from lowcost.cli import main
    code = main(["finetune", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_base_trains_and_its_adapter_loads_on_the_dense_model(tiny_model, text_file, tmp_path, capsys,
                                                                        scheme):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    code, stdout, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 8,
                                  "--lr", "0.01", "--dropout", "0", "--quantize", scheme, *FAST)
    assert code == 0, err
    assert f"quantized {scheme}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["quantize"] == scheme
    losses = metrics["history"]["loss"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    held = metrics["held_out"]
    assert held["end"]["loss"] < held["start"]["loss"], held
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model)
    # the quantized weights count as the parameters they are (the summary's trainable share and bytes)
    assert metrics["total_params"] == sum(p.numel() for p in dense.parameters()) + metrics["trainable_params"]
    peft_model = PeftModel.from_pretrained(dense, out / "adapter")
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert {k.replace(".default", "") for k in loaded} == set(saved)
    for key, value in loaded.items():
        assert torch.equal(value, saved[key.replace(".default", "")]), key
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.arange(20).reshape(2, 10)
    assert not torch.allclose(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_gguf_blocks_are_kept_and_trained_on(tmp_path, text_file, capsys):
    sys.path.insert(0, str(ROOT / "tests" / "quant"))
    from gguf_files import write_tiny_llama
    model = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "run"
    code, stdout, err = _finetune(capsys, "--model", model, "--data", text_file, "--out", out, "--steps", 2,
                                  "--quantize", "gguf", "--eval-fraction", "0.2", *FAST)
    assert code == 0, err
    assert "hf-dir+gguf" not in stdout and "+gguf" in stdout
    losses = json.loads((out / "metrics.json").read_text())["history"]["loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    words = tmp_path / "words.txt"
    words.write_text("specified\n")
    code, _, err = _finetune(capsys, "--model", model, "--data", text_file, "--out", tmp_path / "run2", "--steps", 1,
                             "--quantize", "gguf", "--new-tokens", words, *FAST)
    err = err.strip()
    assert code == 2 and "--new-tokens with --quantize gguf: the token embedding is held quantized" in err
    assert "\n" not in err and not (tmp_path / "run2" / "run.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "q4"], "--quantize 'q4': expected one of nf4, int8, gguf"),
    (["--quantize", "gguf"], "--quantize gguf keeps a .gguf file's blocks, but --model"),
])
def test_bad_quantize_is_one_line_naming_the_option(tiny_model, text_file, tmp_path, capsys, argv, message):
    code, _, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", tmp_path / "run",
                             "--steps", 1, *FAST, *argv)
    err = err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "run.json").exists()
