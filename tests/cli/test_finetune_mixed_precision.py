"""``lowcost finetune --mixed-precision bf16``: under torchrun with ``--distributed fsdp`` (two gloo processes
on the CPU, ``python -m lowcost`` itself) FSDP2 computes in bf16 on fp32 parameters and reduces gradients in
fp32; in one process and under DDP (two gloo processes) the forward runs under ``torch.autocast(bf16)``, with
lowcost's ops cast by ``lowcost.ops.autocast``. Each loss curve stays close to one fp32 process's on the same
global batches, the adapter is saved in fp32 and is visibly not the fp32 run's (the compute really was bf16).
Where it cannot be honoured (bf16 parameters, a GPU without bf16) the option is refused up front. With an
NF4-quantized base (``--quantize nf4``) it works too, in one process and under FSDP2: the codes are decoded to
bf16 inside lowcost's ops, and the runs keep to an fp32 NF4 run's curve as the dense ones do to theirs.
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
from lowcost.cli._distributed_run import (Ranks, check_autocast_device, check_mixed_precision,  # noqa: E402
                                          forward_context)

STEPS = 5
# bf16 keeps 8 significant bits: each parameter and activation FSDP2 hands to the blocks carries a relative
# rounding error up to u = 2^-8 ≈ 3.9e-3 (the CPU's bf16 matmuls accumulate in fp32; HF upcasts the logits to
# fp32 for the loss). A token's NLL moves by -(δz_target - Σ_j p_j δz_j), at most 2u·max|z| for logit errors
# |δz| <= u|z|; this near-uniform tiny model has |z| far below NLL/2 ≈ 2.9, so each NLL, and their mean, moves
# by less than u relative. Measured: at most 2.0e-5 relative over these 5 steps (the bf16 gradients shift the
# trajectory a little each step). u is the bound; other rows would show (the steps' losses here are 5.72 to
# 5.79, up to 1.2% apart), and so would a diverged run. Autocast rounds the same operands (activations and
# frozen weights into every matmul; the adapters stay fp32 in lowcost's ops, the logits' log-softmax stays
# fp32): the same bound holds; measured at most 4.5e-5 relative in one process.
LOSS_RTOL = 2.0 ** -8
# The compute really was bf16: the same run in fp32 (FSDP2, 2 processes) keeps every lora_B (zero at the start,
# so the tensor is its update) within fp32 reduction-order rounding of one process's, as AdamW amplifies it
# (measured: at most 2.6e-4; test_finetune_torchrun.py allows 5e-4). Under bf16, AdamW amplifies the
# gradients' rounding where they are tiny (measured: every lora_B 5.0e-2 to 0.41 off the fp32 run's).
# 1e-2 sits between, 38x above the fp32 worst and 5x below the bf16 least. Under autocast the fp32 adapters
# enter lowcost's ops unrounded, so fewer roundings reach the gradients: measured every lora_B 1.9e-2 to 0.36
# off the fp32 run's in one process; 5e-3 is 10x above the fp32 worst and 3.9x below that least.
FP32_SAME = 5e-4
# NF4 bases (measured against one fp32 NF4 process: losses within 4.6e-5, every lora_B 1.4e-2 to 0.45 off in
# one process, 5.1e-2 to 0.39 under FSDP2; an fp32 FSDP2 NF4 run stays within 2.9e-5): the same bounds.
B_DIFFER_AT_LEAST = {"fsdp-bf16": 1e-2, "bf16": 5e-3, "ddp-bf16": 5e-3, "nf4-bf16": 5e-3, "fsdp-nf4-bf16": 1e-2}
BF16_RUNS = ("fsdp-bf16", "bf16", "ddp-bf16")
NF4_RUNS = ("nf4-bf16", "fsdp-nf4-bf16")


def _args(model, data) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--steps", str(STEPS), "--seq-len", "96", "--batch", "4",
            "--dropout", "0", "--backend", "torch", "--eval-fraction", "0.1", "--save-every", "100",
            "--eval-every", "5", "--lr", "0.01"]


@pytest.fixture(scope="module")
def runs(tiny_model, jsonl_files, tmp_path_factory) -> dict:
    """{name: --out directory}: one process in fp32 ("fp32") and in bf16 ("bf16"); under torchrun, FSDP2 in
    bf16 and fp32 ("fsdp-bf16", "fsdp-fp32") and DDP in bf16 ("ddp-bf16")."""
    from lowcost.cli import main
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    top = tmp_path_factory.mktemp("mixed")
    args = _args(tiny_model, jsonl_files["pairs"])
    bf16 = ["--mixed-precision", "bf16"]
    for name, extra in (("fsdp-bf16", ["--distributed", "fsdp", *bf16]), ("fsdp-fp32", ["--distributed", "fsdp"]),
                        ("ddp-bf16", ["--distributed", "ddp", *bf16])):
        torchrun(Path("lowcost"), ["finetune", *args, *extra, "--out", top / name], timeout=600, torchrun_args=["-m"])
    for name, extra in (("fp32", []), ("bf16", bf16)):
        assert main(["finetune", *args, *extra, "--out", str(top / name)]) == 0
    return {name: top / name for name in ("fp32", "bf16", "fsdp-fp32", "fsdp-bf16", "ddp-bf16")}


@pytest.fixture(scope="module")
def nf4_runs(tiny_model, jsonl_files, tmp_path_factory) -> dict:
    """{name: --out directory} with --quantize nf4: one process in fp32 and bf16, FSDP2 in bf16."""
    from lowcost.cli import main
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    top = tmp_path_factory.mktemp("mixed-nf4")
    args = [*_args(tiny_model, jsonl_files["pairs"]), "--quantize", "nf4"]
    bf16 = ["--mixed-precision", "bf16"]
    torchrun(Path("lowcost"), ["finetune", *args, "--distributed", "fsdp", *bf16, "--out", top / "fsdp-nf4-bf16"],
             timeout=600, torchrun_args=["-m"])
    for name, extra in (("nf4-fp32", []), ("nf4-bf16", bf16)):
        assert main(["finetune", *args, *extra, "--out", str(top / name)]) == 0
    return {name: top / name for name in ("nf4-fp32", "nf4-bf16", "fsdp-nf4-bf16")}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check_curve(bf16: dict, fp32: dict, world: int) -> None:
    assert bf16["world_size"] == world and bf16["options"]["mixed_precision"] == "bf16"
    x, y = fp32["history"], bf16["history"]
    assert y["step"] == list(range(1, STEPS + 1)) and y["tokens"] == x["tokens"] and y["lr"] == x["lr"]
    errors = [_relative(b, a) for a, b in zip(x["loss"], y["loss"])]
    errors += [_relative(b["loss"], a["loss"]) for a, b in zip(x["evals"], y["evals"])]
    assert all(torch.isfinite(torch.tensor(y["loss"]))), y["loss"]
    assert max(errors) <= LOSS_RTOL, errors


@pytest.mark.parametrize("name", BF16_RUNS)
def test_bf16_loss_curve_close_to_fp32(runs, name):
    _check_curve(_metrics(runs[name]), _metrics(runs["fp32"]), 1 if name == "bf16" else 2)


@pytest.mark.parametrize("name", NF4_RUNS)
def test_bf16_on_an_nf4_base_close_to_fp32(nf4_runs, name):
    bf16 = _metrics(nf4_runs[name])
    assert bf16["options"]["quantize"] == "nf4"
    _check_curve(bf16, _metrics(nf4_runs["nf4-fp32"]), 1 if name == "nf4-bf16" else 2)


def _lora_b_differences(a: dict, b: dict) -> dict:
    """max |a - b| / max |b| of each lora_B (zero at the start: the tensor is its update)."""
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b if "lora_B" in k}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_fp32_runs_agree(runs):
    """The reference the bf16 runs are told apart from: fp32 under FSDP2 is one fp32 process to rounding."""
    assert max(_lora_b_differences(_adapter(runs["fsdp-fp32"]), _adapter(runs["fp32"])).values()) <= FP32_SAME


@pytest.mark.parametrize("name", BF16_RUNS + NF4_RUNS)
def test_adapter_saved_in_fp32_from_bf16_compute(runs, nf4_runs, name):
    dirs = {**runs, **nf4_runs}
    bf16, fp32 = _adapter(dirs[name]), _adapter(dirs["nf4-fp32" if name in NF4_RUNS else "fp32"])
    assert bf16.keys() == fp32.keys()
    assert {t.dtype for t in bf16.values()} == {torch.float32}
    assert all(t.shape == fp32[k].shape and torch.isfinite(t).all() for k, t in bf16.items())
    assert min(_lora_b_differences(bf16, fp32).values()) >= B_DIFFER_AT_LEAST[name]


def test_refused_with_bf16_parameters():
    with pytest.raises(CLIError, match="--mixed-precision bf16") as caught:
        check_mixed_precision("bf16", "bfloat16")
    assert "needs --dtype float32 (the default), got --dtype bfloat16" in str(caught.value)
    check_mixed_precision(None, "bfloat16")
    check_mixed_precision("bf16", "float32")


def test_refused_on_a_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(CLIError, match=r"--mixed-precision bf16: cuda:0 \(compute capability 7.5\) has no native bf16"):
        check_autocast_device("bf16", torch.device("cuda", 0))
    check_autocast_device(None, torch.device("cuda", 0))
    check_autocast_device("bf16", torch.device("cpu"))


def test_autocast_only_where_fsdp2_does_not_shard():
    cpu = torch.device("cpu")
    for ranks, expected in ((Ranks(), True), (Ranks(0, 2, mode="ddp"), True), (Ranks(0, 2, mode="fsdp"), False)):
        context = forward_context("bf16", ranks, cpu)
        with context():
            assert torch.is_autocast_enabled("cpu") == expected
            assert not expected or torch.get_autocast_dtype("cpu") == torch.bfloat16
        with forward_context(None, ranks, cpu)():
            assert not torch.is_autocast_enabled("cpu")


def test_refused_before_any_work(tiny_model, jsonl_files, tmp_path, capsys):
    from lowcost.cli import main
    out = tmp_path / "out"
    code = main(["finetune", *_args(tiny_model, jsonl_files["pairs"]), "--mixed-precision", "bf16",
                 "--dtype", "bfloat16", "--out", str(out)])
    assert code == 2 and "--mixed-precision bf16 keeps fp32 parameters" in capsys.readouterr().err
    assert not out.exists()
