"""``lowcost plan``: the table and JSON on a tiny config, the shipped GPU table, and every bad input as one
line with exit status 2 (checked before anything is traced)."""
import json

import pytest

from lowcost.cli import main
from lowcost.plan import gpus

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 128}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def _error(capsys, argv) -> str:
    assert main(["plan"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowcost plan: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_help_names_the_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "fake tensors" in capsys.readouterr().out


def test_json_plan_on_a_tiny_config(tiny_config, capsys):
    assert main(["plan", "--model", str(tiny_config), "--seq-len", "16", "--batch", "2", "--checkpoint",
                 "selective", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [s["setup"] for s in result["setups"]]
    assert names == ["full fine-tuning", "full fine-tuning + selective", "LoRA", "LoRA + full", "LoRA + every_k",
                     "LoRA + sqrt", "LoRA + selective", "LoRA + offload"]
    assert [s["setup"] for s in result["setups"] if s["selected"]] == ["LoRA + selective"]
    for s in result["setups"]:
        assert s["peak_bytes"] == sum(s["at_peak_bytes"].values())
        assert s["cheapest_gpu"]["name"] == "L4 24GB" and s["cheapest_gpu"]["fits"]
        assert s["flops_per_step"] > 0 and s["cheapest_gpu"]["step_seconds_estimate"] > 0
    by_name = {s["setup"]: s for s in result["setups"]}
    assert by_name["LoRA"]["trainable_parameters"] < by_name["full fine-tuning"]["trainable_parameters"]
    assert by_name["LoRA + full"]["saved_activation_bytes"]["total"] < by_name["LoRA"]["saved_activation_bytes"]["total"]


def test_table_on_a_tiny_config_with_a_gpu(tiny_config, capsys):
    assert main(["plan", "--model", str(tiny_config), "--seq-len", "8", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "your GPU" in out and "H100 80GB" in out and "ESTIMATES" in out and "* LoRA " in out


@pytest.mark.parametrize("argv, match", [
    (["--model", "no/such/dir/config.json", "--seq-len", "8"], "no such file"),
    (["--model", "meta-llama/Llama-3-8B", "--seq-len", "8"], "not a local path"),
    (["--seq-len", "4096"], "beyond the model's 128 positions"),
    (["--seq-len", "8", "--checkpoint", "selctive"], "not a policy"),
    (["--seq-len", "8", "--checkpoint", "budget"], "budget needs a measured profiling step"),
    (["--seq-len", "8", "--dtype", "int8"], "--dtype"),
    (["--seq-len", "8", "--gpu", "a100"], "matches several"),
    (["--seq-len", "8", "--gpu", "tpu"], "matches no"),
    (["--seq-len", "8", "--dropout", "1.5"], "--dropout"),
])
def test_bad_input_is_one_line(tiny_config, capsys, argv, match):
    if "--model" not in argv:
        argv = ["--model", str(tiny_config)] + argv
    assert match in _error(capsys, argv)


def test_not_a_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    assert "model_type" in _error(capsys, ["--model", str(bad), "--seq-len", "8"])
    bad.write_text("{not json")
    assert "not a JSON model config" in _error(capsys, ["--model", str(bad), "--seq-len", "8"])


def test_bad_gpu_table(tiny_config, tmp_path, capsys):
    table = tmp_path / "gpus.json"
    table.write_text(json.dumps({"gpus": [{"name": "X", "memory_gib": -1, "bf16_tflops": 1, "usd_per_hour": 1}]}))
    assert "memory_gib" in _error(capsys, ["--model", str(tiny_config), "--seq-len", "8", "--gpus", str(table)])


@pytest.mark.parametrize("argv", [["--seq-len", "0"], ["--seq-len", "8", "--batch", "-1"]])
def test_argument_types(tiny_config, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", str(tiny_config)] + argv)
    assert exit_info.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_shipped_table_and_cheapest_fit():
    table = gpus.load_table()
    assert len(table) >= 5 and all(g.memory_gib > 0 and g.bf16_tflops > 0 for g in table)
    l4 = gpus.find(table, "l4")
    assert gpus.cheapest_fit(table, 10 * 2**30, 0.1) == l4                   # the cheapest holds 10 GiB
    big = gpus.cheapest_fit(table, 60 * 2**30, 0.1)
    assert big.memory_gib >= 80 and all(g.usd_per_hour >= big.usd_per_hour for g in table if gpus.fits(g, 60 * 2**30, 0.1))
    assert gpus.cheapest_fit(table, 10**15, 0.1) is None
    assert gpus.fits(l4, int(0.9 * 24 * 2**30), 0.1) and not gpus.fits(l4, int(0.91 * 24 * 2**30), 0.1)
    assert gpus.step_seconds(l4, int(121e12), 0.5) == pytest.approx(2.0)


def test_shipped_llama3_8b_config():
    from lowcost.plan import load_config
    from lowcost.plan.build import DEFAULT_CONFIGS
    config = load_config(DEFAULT_CONFIGS / "llama-3-8b.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == \
        (4096, 32, 8, 128256)
