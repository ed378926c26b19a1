"""``lowcost finetune`` end to end on a tiny Llama: text and every JSONL kind, new tokens, outputs a user
can load with PEFT, and a SIGKILL mid-run followed by ``--resume`` giving exactly the uninterrupted curve."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli_helpers import ROOT, run_cli

FAST = ["--seq-len", "32", "--batch", "2"]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _finetune(capsys, *args) -> tuple[int, str, str]:
    from lowcost.cli import main
    code = main(["finetune", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_file_few_steps_writes_every_output(tiny_model, text_file, tmp_path):
    out = tmp_path / "run"
    result = run_cli("finetune", "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 3, *FAST,
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("lowcost finetune: trained ") and "saved activations" in summary
    assert "full fine-tuning" in summary and "held-out loss" in summary
    for name in ("run.json", "metrics.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    metrics = _metrics(out)
    history = metrics["history"]
    assert history["step"] == [1, 2, 3] and all(math.isfinite(v) for v in history["loss"])
    assert history["evals"][0]["step"] == 0 and history["evals"][-1]["step"] == 3
    assert 0 < metrics["trainable_fraction"] < 1
    memory = metrics["memory"]
    # full checkpointing keeps less than the same LoRA model without it
    assert 0 < memory["saved_activation_bytes"] < memory["plain_saved_activation_bytes"]
    assert memory["optimizer_state_bytes"] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["text", "pairs", "chat"])
def test_jsonl_records_train(tiny_model, jsonl_files, tmp_path, capsys, kind):
    out = tmp_path / kind
    code, stdout, err = _finetune(capsys, "--model", tiny_model, "--data", jsonl_files[kind], "--out", out,
                                  "--steps", 2, "--seq-len", 96, "--batch", 2, "--grad-accum", 2,
                                  "--checkpoint", "selective")
    assert code == 0, err
    metrics = _metrics(out)
    assert metrics["data_stats"]["kind"] == ("text" if kind == "text" else "chat")
    assert len(metrics["history"]["loss"]) == 2 and all(math.isfinite(v) for v in metrics["history"]["loss"])
    assert metrics["held_out"]["end"]["tokens"] > 0


def test_adapter_loads_with_peft(tiny_model, text_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    code, _, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 2,
                             "--lr", "0.05", *FAST, "--dropout", "0")
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.arange(20).reshape(2, 10)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    # trained adapters change the output (lr 0.05: B is clearly non-zero after two steps)
    assert not torch.allclose(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_new_tokens_report_step0_nats_per_char(tiny_model, text_file, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("# domain words\nspecified\nequivalent\nencountered\n\nspecified\n")
    out = tmp_path / "run"
    code, stdout, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 1,
                                  *FAST, "--new-tokens", words)
    assert code == 0, err
    new = _metrics(out)["new_tokens"]
    assert new["words"] == 3 and new["added"] + new["existing"] == 3 and new["added"] >= 1
    assert new["before"]["nats_per_char"] > 0 and new["after"]["nats_per_char"] > 0
    assert new["after"]["tokens"] < new["before"]["tokens"]        # the held-out text uses the new words
    assert abs(new["after"]["chars"] - new["before"]["chars"]) <= 16   # the same text, whatever the tokens
    assert "nats/char before → after adding them" in stdout.strip().splitlines()[-1]
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_steps_zero_evaluates_and_saves(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 0,
                                  *FAST)
    assert code == 0, err
    metrics = _metrics(out)
    assert metrics["history"]["loss"] == [] and metrics["held_out"]["end"]["step"] == 0
    assert metrics["held_out"]["end"]["perplexity"] < 1e4       # a real perplexity, not exp of garbage
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_overwrite_replaces_the_run(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 1, *FAST)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = _finetune(capsys, "--model", tiny_model, "--data", text_file, "--out", out, "--steps", 2, *FAST,
                             "--overwrite")
    assert code == 0, err
    assert _metrics(out)["history"]["step"] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"          # only the run's own files are replaced


def _wait_for(path, process, timeout=1800.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_resume_after_sigkill_gives_the_uninterrupted_curve(tiny_model, text_file, tmp_path):
    args = ["--model", tiny_model, "--data", text_file, "--steps", 10, *FAST, "--save-every", 2, "--eval-every", 3,
            "--dropout", "0.1"]
    env = {"OMP_NUM_THREADS": "1"}
    whole = run_cli("finetune", *args, "--out", tmp_path / "whole", env=env)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **env}
    process = subprocess.Popen([sys.executable, "-m", "lowcost.cli", "finetune", *map(str, args), "--out", str(out)],
                               cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "checkpoints" / "step-000004", process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()                 # it really died mid-run
    resumed = run_cli("finetune", *args, "--out", out, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    a, b = _metrics(tmp_path / "whole")["history"], _metrics(out)["history"]
    assert b["step"] == list(range(1, 11))
    assert b["loss"] == a["loss"] and b["lr"] == a["lr"] and b["tokens"] == a["tokens"]   # exact, fp32 CPU
    assert b["evals"] == a["evals"]
    from safetensors.torch import load_file
    x, y = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole", out))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
