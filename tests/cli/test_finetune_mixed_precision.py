"""``lowcost finetune --distributed fsdp --mixed-precision bf16`` under torchrun (two gloo processes on the
CPU, ``python -m lowcost`` itself): FSDP2 computes in bf16 on fp32 parameters and reduces gradients in fp32.
The loss curve stays close to one fp32 process's on the same global batches, the adapter is saved in fp32 and
is visibly not the fp32 run's (the compute really was bf16). Elsewhere the option is refused up front.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cli_helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from launch import torchrun  # noqa: E402

from lowcost.cli import CLIError  # noqa: E402
from lowcost.cli._distributed_run import check_mixed_precision  # noqa: E402

STEPS = 5
# bf16 keeps 8 significant bits: each parameter and activation FSDP2 hands to the blocks carries a relative
# rounding error up to u = 2^-8 ≈ 3.9e-3 (the CPU's bf16 matmuls accumulate in fp32; HF upcasts the logits to
# fp32 for the loss). A token's NLL moves by -(δz_target - Σ_j p_j δz_j), at most 2u·max|z| for logit errors
# |δz| <= u|z|; this near-uniform tiny model has |z| far below NLL/2 ≈ 2.9, so each NLL, and their mean, moves
# by less than u relative. Measured: at most 2.0e-5 relative over these 5 steps (the bf16 gradients shift the
# trajectory a little each step). u is the bound; other rows would show (the steps' losses here are 5.72 to
# 5.79, up to 1.2% apart), and so would a diverged run.
LOSS_RTOL = 2.0 ** -8
# The compute really was bf16: the same run in fp32 (FSDP2, 2 processes) keeps every lora_B (zero at the start,
# so the tensor is its update) within fp32 reduction-order rounding of one process's, as AdamW amplifies it
# (measured: at most 2.6e-4; test_finetune_torchrun.py allows 5e-4). Under bf16, AdamW amplifies the
# gradients' rounding where they are tiny (measured: every lora_B 5.0e-2 to 0.41 off the fp32 run's).
# 1e-2 sits between, 38x above the fp32 worst and 5x below the bf16 least.
FP32_SAME = 5e-4
B_DIFFER_AT_LEAST = 1e-2


def _args(model, data) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--steps", str(STEPS), "--seq-len", "96", "--batch", "4",
            "--dropout", "0", "--backend", "torch", "--eval-fraction", "0.1", "--save-every", "100",
            "--eval-every", "5", "--lr", "0.01"]


@pytest.fixture(scope="module")
def runs(tiny_model, jsonl_files, tmp_path_factory):
    """--out directories: the bf16 FSDP2 run under torchrun, one fp32 process, the fp32 FSDP2 run."""
    from lowcost.cli import main
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    top = tmp_path_factory.mktemp("mixed")
    args = _args(tiny_model, jsonl_files["pairs"])
    for name, extra in (("bf16", ["--mixed-precision", "bf16"]), ("fsdp-fp32", [])):
        torchrun(Path("lowcost"), ["finetune", *args, "--distributed", "fsdp", *extra, "--out", top / name],
                 timeout=600, torchrun_args=["-m"])
    assert main(["finetune", *args, "--out", str(top / "fp32")]) == 0
    return top / "bf16", top / "fp32", top / "fsdp-fp32"


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_bf16_loss_curve_close_to_fp32_and_not_equal(runs):
    bf16, fp32 = (_metrics(out) for out in runs[:2])
    assert bf16["world_size"] == 2 and bf16["options"]["mixed_precision"] == "bf16"
    x, y = fp32["history"], bf16["history"]
    assert y["step"] == list(range(1, STEPS + 1)) and y["tokens"] == x["tokens"] and y["lr"] == x["lr"]
    errors = [_relative(b, a) for a, b in zip(x["loss"], y["loss"])]
    errors += [_relative(b["loss"], a["loss"]) for a, b in zip(x["evals"], y["evals"])]
    assert all(torch.isfinite(torch.tensor(y["loss"]))), y["loss"]
    assert max(errors) <= LOSS_RTOL, errors


def _lora_b_differences(a: dict, b: dict) -> dict:
    """max |a - b| / max |b| of each lora_B (zero at the start: the tensor is its update)."""
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b if "lora_B" in k}


def test_adapter_saved_in_fp32_from_bf16_compute(runs):
    from safetensors.torch import load_file
    bf16, fp32, fsdp_fp32 = (load_file(out / "adapter" / "adapter_model.safetensors") for out in runs)
    assert bf16.keys() == fp32.keys()
    assert {t.dtype for t in bf16.values()} == {torch.float32}
    assert all(t.shape == fp32[k].shape and torch.isfinite(t).all() for k, t in bf16.items())
    assert max(_lora_b_differences(fsdp_fp32, fp32).values()) <= FP32_SAME
    assert min(_lora_b_differences(bf16, fp32).values()) >= B_DIFFER_AT_LEAST


@pytest.mark.parametrize("mode, dtype, world, message", [
    ("fsdp", "float32", 1, "needs --distributed fsdp under torchrun with 2 or more processes; it is not available "
                           "in one process"),
    ("ddp", "float32", 2, "it is not available with --distributed ddp"),
    ("fsdp", "bfloat16", 2, "needs --dtype float32 (the default), got --dtype bfloat16"),
])
def test_refused_where_it_cannot_be_honoured(mode, dtype, world, message):
    with pytest.raises(CLIError, match="--mixed-precision bf16") as caught:
        check_mixed_precision("bf16", mode, dtype, world)
    assert message in str(caught.value)
    check_mixed_precision(None, mode, dtype, world)
    check_mixed_precision("bf16", "fsdp", "float32", 2)


def test_refused_in_one_process_before_any_work(tiny_model, jsonl_files, tmp_path, capsys):
    from lowcost.cli import main
    out = tmp_path / "out"
    code = main(["finetune", *_args(tiny_model, jsonl_files["pairs"]), "--mixed-precision", "bf16", "--out", str(out)])
    assert code == 2 and "--mixed-precision bf16 is FSDP2's MixedPrecisionPolicy" in capsys.readouterr().err
    assert not out.exists()


