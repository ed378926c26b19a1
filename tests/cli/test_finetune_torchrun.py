"""``lowcost finetune`` under torchrun: two gloo processes on the CPU, with DDP and with FSDP2
(``--distributed fsdp``), train like one process on the same global batch, only rank 0 prints and writes, a
--batch the world size does not divide is refused, and ``--resume`` continues a two-process run exactly; at
another world size (2 → 1 from DDP and from FSDP2's resharded state, 1 → 2 under DDP) or under the other
data-parallel mode (FSDP2's sharded state resumed by DDP, 2 → 2) it continues the same curve to fp32 rounding.
One torchrun launch (torchrun_finetune.py runs every command).

Data: prompt/response records, so rows hold different numbers of target tokens (the ranks' losses must be
weighted by their token shares, not averaged), and 53 training sequences in micro-batches of 4: the last
micro-batch of the epoch has one row, which is padded to two, so rank 1's rows hold no target at all.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cli_helpers import ROOT, strip_last_checkpoint

sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from launch import torchrun  # noqa: E402

from lowcost.cli._distributed_run import Ranks, check_batch, pad_rows  # noqa: E402
from lowcost.cli._encode import IGNORE  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")
ENTRY = Path(__file__).resolve().parent / "torchrun_finetune.py"
STEPS = 7
# Losses: the ranks' weighted losses are summed by an all-reduce and their gradients averaged by DDP in another
# order than one process sums them, and each rank multiplies matrices of half the rows; both are fp32
# rounding (measured: 6e-8 relative on the losses), so 1e-6 leaves a 16x margin and still catches any
# row or token that is counted twice or not at all (one target token of ~270 per step moves the loss ~1e-3).
LOSS_RTOL = 1e-6
# Adapters: AdamW divides each element's first moment by the root of its second, which amplifies the same
# rounding where an element's gradient is near zero or changes sign between steps (measured worst 5e-5 of the
# tensor's largest value after 7 steps at lr 0.01). 5e-4 is a 10x margin; a wrong split of the batch moves
# every update by O(lr), i.e. by a large fraction of the adapter (lr · steps ≈ the B matrices' size).
ADAPTER_RTOL = 5e-4


def _args(model, data) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--steps", str(STEPS), "--seq-len", "96", "--batch", "4",
            "--grad-accum", "2", "--dropout", "0", "--backend", "torch", "--eval-fraction", "0.1",
            "--save-every", "3", "--eval-every", "3", "--lr", "0.01"]


MODES = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def two(tiny_model, jsonl_files, tmp_path_factory, one):
    """(runs directory, each rank's report, each rank's {stdout, stderr} as torchrun logged them)."""
    top = tmp_path_factory.mktemp("torchrun")
    report, logs, root = top / "report", top / "logs", top / "runs"
    report.mkdir()
    root.mkdir()
    torchrun(ENTRY, [report, root, one, *_args(tiny_model, jsonl_files["pairs"])],
             timeout=600, torchrun_args=["--log-dir", logs, "--redirects", "3"])
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
    rank_logs = [{name: next(logs.glob(f"*/attempt_0/{r}/{name}.log")).read_text() for name in ("stdout", "stderr")}
                 for r in range(2)]
    return root, ranks, rank_logs


@pytest.fixture(scope="module")
def one(tiny_model, jsonl_files, tmp_path_factory):
    from lowcost.cli import main
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["finetune", *_args(tiny_model, jsonl_files["pairs"]), "--out", str(out)]) == 0
    return out


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _close(actual: list, expected: list, rtol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= rtol * abs(e), (actual, expected)


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one_process(two, one, mode):
    root, ranks, _ = two
    assert [r[mode]["code"] for r in ranks] == [[0, ""], [0, ""]]
    a, b = _metrics(one), _metrics(root / mode)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    x, y = a["history"], b["history"]
    assert y["step"] == list(range(1, STEPS + 1))
    assert y["tokens"] == x["tokens"] and y["lr"] == x["lr"]          # the same global batches, the same schedule
    assert x["tokens"][-1] < x["tokens"][0]                            # the last step holds the 1-row micro-batch
    _close(y["loss"], x["loss"], LOSS_RTOL)
    assert [(e["step"], e["tokens"], e["chars"]) for e in y["evals"]] == \
        [(e["step"], e["tokens"], e["chars"]) for e in x["evals"]]
    _close([e["loss"] for e in y["evals"]], [e["loss"] for e in x["evals"]], LOSS_RTOL)
    first, second = _adapter(one), _adapter(root / mode)
    assert first.keys() == second.keys()
    for key in first:
        scale = first[key].abs().max().item()
        assert (first[key] - second[key]).abs().max().item() <= ADAPTER_RTOL * scale, key
    config = json.loads((root / mode / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((one / "adapter" / "adapter_config.json").read_text())


def test_only_rank_0_prints_and_writes(two):
    root, ranks, logs = two
    summary = [line for line in logs[0]["stdout"].splitlines() if line.startswith("lowcost finetune: trained ")]
    assert len(summary) == 6                  # 2 modes × (the run, the resumed run), the one-process run resumed,
    #                                           the FSDP2 run resumed under DDP
    assert "finetune: 100%" in logs[0]["stderr"]                       # rank 0's progress bar
    assert logs[1]["stdout"] == ""
    assert "finetune:" not in logs[1]["stderr"] and "Loading weights" not in logs[1]["stderr"], logs[1]["stderr"]
    outs = [root / name for mode in MODES for name in (mode, f"{mode}-resumed")] + [root / "one-resumed"]
    for out in outs:
        for name in ("run.json", "metrics.json", "loss.png", "adapter/adapter_model.safetensors",
                     "adapter/adapter_config.json"):
            assert (out / name).is_file(), (out, name)
    # rank 1 only checked that --out is writable (creating it if missing, a probe file made and removed) and,
    # under FSDP2, wrote its own optimizer shard into rank 0's temporary checkpoint directory (DCP)
    probes = [(event, Path(path)) for event, path in ranks[1]["changes"]]
    assert probes, "the audit hook recorded nothing: it would not see a write either"
    shards = []
    for event, path in probes:
        if path.parent.name.startswith(".tmp-step-") and path.name == ".training_state.incomplete":
            assert event == "os.mkdir" and path.parents[2].name.startswith("fsdp"), (event, path)
        elif path.parent.name == ".training_state.incomplete":
            shards.append((event, path.name, path.parents[3].name))
        else:
            assert path in outs and event == "os.mkdir" or \
                path.name.startswith(".write-test-") and event in ("open", "os.remove"), (event, path)
    # its shard of the checkpoints at steps 3, 6, 7 and of the resumed run's step 7: its own, and nothing else
    assert shards == [("open", "shard-00002-model-00001-of-00001.safetensors", "fsdp")] * 3 + \
        [("open", "shard-00002-model-00001-of-00001.safetensors", "fsdp-resumed")]
    assert not ranks[0]["changes"]                                     # rank 0 is not watched


@pytest.mark.parametrize("mode", MODES)
def test_checkpoints_hold_every_rank_rng(two, mode):
    root, _, _ = two
    newest = sorted((root / mode / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{STEPS:06d}"
    saved = json.loads((newest / "state.json").read_text())
    assert (saved["world_size"], saved["distributed"]) == (2, mode)
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    assert len(state["rank_rng"]) == 2 and torch.equal(state["rank_rng"][0]["cpu"], state["rng"]["cpu"])
    assert not torch.equal(state["rank_rng"][0]["cpu"], state["rank_rng"][1]["cpu"])   # seed_rank: own streams
    if mode == "ddp":                                                  # the same on every rank: rank 0's is whole
        assert "optimizer" in state and not (newest / "training_state").exists()
    else:                                                              # sharded: each rank's part, through DCP
        assert "optimizer" not in state
        assert sorted(p.name for p in (newest / "training_state").iterdir()) == [
            "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
            "training_state.json"]
    assert not [p for p in (root / mode / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mode", MODES)
def test_resume_under_torchrun_continues_exactly(two, mode):
    root, ranks, _ = two
    assert [r[mode]["resumed"][0] for r in ranks] == [0, 0]
    a, b = _metrics(root / mode)["history"], _metrics(root / f"{mode}-resumed")["history"]
    for key in ("step", "loss", "lr", "tokens", "evals"):             # exact: same world size, same ops
        assert b[key] == a[key], key
    x, y = _adapter(root / mode), _adapter(root / f"{mode}-resumed")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _same_curve(resumed: Path, uninterrupted: Path, saved_world: int, world: int) -> None:
    """The resumed run's history equals the uninterrupted run's: copied up to the checkpoint, continued
    within fp32 rounding after it (another world size sums in another order), and so do the adapters."""
    a, b = _metrics(uninterrupted), _metrics(resumed)
    assert (a["world_size"], b["world_size"]) == (saved_world, world)
    x, y = a["history"], b["history"]
    assert y["step"] == x["step"] and y["tokens"] == x["tokens"] and y["lr"] == x["lr"]
    resumed_at = sorted((resumed / "checkpoints").glob("step-*"))[-2].name   # the one it resumed from, kept
    kept = int(resumed_at.split("-")[1])
    assert y["loss"][:kept] == x["loss"][:kept]
    _close(y["loss"], x["loss"], LOSS_RTOL)
    assert [e["step"] for e in y["evals"]] == [e["step"] for e in x["evals"]]
    _close([e["loss"] for e in y["evals"]], [e["loss"] for e in x["evals"]], LOSS_RTOL)
    first, second = _adapter(uninterrupted), _adapter(resumed)
    assert first.keys() == second.keys()
    for key in first:
        assert (first[key] - second[key]).abs().max().item() <= ADAPTER_RTOL * first[key].abs().max().item(), key


@pytest.mark.parametrize("mode", MODES)
def test_resume_a_two_process_run_in_one_process(two, tiny_model, jsonl_files, tmp_path, capsys, mode):
    """DDP's checkpoint holds the whole optimizer state; FSDP2's is resharded from 2 shards to 1 (DCP)."""
    from lowcost.cli import main
    root, _, _ = two
    out = tmp_path / "resumed"
    strip_last_checkpoint(root / mode, out)
    code = main(["finetune", *_args(tiny_model, jsonl_files["pairs"]), "--distributed", mode, "--out", str(out),
                 "--resume"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"(step 6 of {STEPS}); saved by 2 process(es), continuing with 1: the same global batches" in printed
    assert "dropout masks" not in printed                              # --dropout 0: nothing is lost
    _same_curve(out, root / mode, 2, 1)
    memory = _metrics(out)["memory"]                                   # not rank 0's half-batch figures as ours
    assert "saved_activation_bytes" not in memory and "plain_saved_activation_bytes" not in memory


def test_resume_a_one_process_run_under_torchrun(two, one):
    """1 → 2 under DDP (the whole optimizer state on every rank); FSDP2 cannot shard it and says so."""
    root, ranks, logs = two
    assert [rank["one"]["ddp"] for rank in ranks] == [[0, ""], [0, ""]]
    _same_curve(root / "one-resumed", one, 1, 2)
    assert "saved by 1 process(es), continuing with 2" in logs[0]["stdout"]
    for rank in ranks:
        code, err = rank["one"]["fsdp"]
        assert code == 2 and "holds the whole optimizer state, which --distributed fsdp cannot shard; resume it " \
                             "with --distributed ddp or in one process" in err, err


def test_resume_an_fsdp2_run_under_ddp(two):
    """FSDP2's sharded optimizer state (DCP) loads into DDP's whole tensors at the same world size: the same
    curve to fp32 rounding (each mode reduces the gradients in its own order: all-reduce vs reduce-scatter)."""
    root, ranks, logs = two
    assert [rank["fsdp-to-ddp"] for rank in ranks] == [[0, ""], [0, ""]]
    out = root / "fsdp-to-ddp"
    assert _metrics(out)["options"]["distributed"] == "ddp"
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "state.json").read_text())["distributed"] == "ddp"
    assert "optimizer" in torch.load(newest / "trainer_state.pt", weights_only=True)   # whole again
    assert f"resuming from {sorted((out / 'checkpoints').glob('step-*'))[-2]}" in logs[0]["stdout"]
    _same_curve(out, root / "fsdp", 2, 2)


def test_batch_not_divisible_by_world_size_is_refused(two):
    root, ranks, _ = two
    for rank in ranks:
        code, err = rank["refused"]
        assert code == 2
        assert "--batch 3 is not divisible by the world size 2" in err and "use --batch 2 or 4" in err, err
    assert not (root / "refused").exists()


def test_check_batch_in_one_process():
    check_batch(3, 1)
    check_batch(4, 2)
    with pytest.raises(Exception, match=r"--batch 1 is not divisible by the world size 4 .* use --batch 4$"):
        check_batch(1, 4)


def _batch(rows: int) -> dict:
    ids = torch.arange(rows * 5).reshape(rows, 5) + 1
    labels = ids.clone()
    labels[:, :2] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "chars": ids % 3}


@pytest.mark.parametrize("rows, world", [(1, 2), (3, 2), (5, 4), (4, 2), (7, 3)])
def test_split_gives_every_row_once_and_padding_no_target(rows, world):
    batch = _batch(rows)
    parts = [Ranks(rank, world).split(batch) for rank in range(world)]
    assert len({p["input_ids"].shape[0] for p in parts}) == 1          # every rank the same number of rows
    joined = {k: torch.cat([p[k] for p in parts]) for k in batch}
    for key in batch:
        assert torch.equal(joined[key][:rows], batch[key])             # the real rows, in order, each once
    extra = joined["input_ids"].shape[0] - rows
    assert extra == -rows % world
    assert (joined["labels"][rows:] == IGNORE).all() and (joined["chars"][rows:] == 0).all()
    assert torch.equal(pad_rows(batch, 0)["input_ids"], batch["input_ids"])


def test_one_process_ranks_are_the_identity():
    batch = _batch(3)
    ranks = Ranks()
    assert ranks.main and ranks.split(batch) is batch and ranks.sum([1.5, 2.0]) == [1.5, 2.0]
    assert os.environ.get("WORLD_SIZE", "1") == "1"


def test_resume_at_another_world_size_says_what_dropout_loses():
    """With dropout on, the masks depend on how each global batch is split: the note says the curve differs."""
    from types import SimpleNamespace
    from lowcost.cli._finetune_run import _world_note
    assert _world_note(SimpleNamespace(dropout=0.1), {"world_size": 2}, Ranks(0, 2)) == ""
    note = _world_note(SimpleNamespace(dropout=0.1), {"world_size": 2}, None)
    assert note.startswith("; saved by 2 process(es), continuing with 1") and "the dropout masks cannot" in note
    assert "dropout" not in _world_note(SimpleNamespace(dropout=0.0), {"world_size": 1}, Ranks(1, 4))
