"""A training state (adapters, AdamW state, step, RNG) saved with torch.distributed.checkpoint resumes to the
same loss curve: at the same world size with dropout on (bit-exact, every rank's generator restored) and
at another world size (2 → 1 and 1 → 2, no dropout: masks depend on how the batch is split). The files
are safetensors and JSON only: no pickle is ever loaded."""
from __future__ import annotations

import json

import pytest

import lowcost
from conftest import needs_gloo
from dist_cases import adamw, patched, train_steps
from launch import torchrun_scenario
from lowcost.distributed import load_training_state, save_training_state

pytestmark = needs_gloo
LOSS_TOL = 1e-5  # fp32 losses after resharded AdamW steps: reduction-order rounding only


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """One process: 2 steps, save, 2 more steps (its uninterrupted curve)."""
    directory = tmp_path_factory.mktemp("world1") / "state"
    model = patched("full", dropout=0.0)
    optimizer = adamw(model)
    train_steps(model, optimizer, range(2))
    save_training_state(directory, model, optimizer, step=2)
    return directory, train_steps(model, optimizer, range(2, 4))


@pytest.fixture(scope="module")
def state(tmp_path_factory, world1):
    out = tmp_path_factory.mktemp("state")
    return out, torchrun_scenario("state", out, args=[world1[0]])


def close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= LOSS_TOL * abs(e), (actual, expected)


def test_same_world_size_resume_with_dropout_is_exact(state):
    _, ranks = state
    for rank in ranks:
        assert rank["dropout_resumed"]["info"] == {"step": 2, "saved_world_size": 2, "world_size": 2,
                                                   "rng": "restored"}
        assert rank["dropout_resumed"]["after"] == rank["dropout"]["after"]


def test_resume_two_ranks_into_one_process(state):
    out, ranks = state
    model = patched("full", dropout=0.0)
    optimizer = adamw(model)
    info = load_training_state(out / "state-w2", model, optimizer)
    assert (info.step, info.saved_world_size, info.world_size, info.rng) == (2, 2, 1, "resharded")
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95) and optimizer.param_groups[0]["lr"] == 1e-2
    close(train_steps(model, optimizer, range(2, 4)), ranks[0]["no_dropout"]["after"])


def test_resume_one_process_into_two_ranks(state, world1):
    _, ranks = state
    for rank in ranks:
        assert rank["from_world1"]["info"]["rng"] == "resharded"
        close(rank["from_world1"]["after"], world1[1])


def test_files_are_safetensors_and_json_written_atomically(state):
    out, _ = state
    for name in ("state-w2", "state-w2-dropout"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["shard-00001-model-00001-of-00001.safetensors",
                         "shard-00002-model-00001-of-00001.safetensors", "training_state.json"], files
        meta = json.loads((out / name / "training_state.json").read_text())
        assert (meta["step"], meta["world_size"]) == (2, 2)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no .incomplete / .old left


def test_overwriting_a_state_replaces_it_whole(tmp_path):
    model = patched("none", dropout=0.0)
    optimizer = adamw(model)
    save_training_state(tmp_path / "s", model, optimizer, step=1)
    (tmp_path / "s" / "stray.safetensors").write_bytes(b"")
    save_training_state(tmp_path / "s", model, optimizer, step=5)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "training_state.json"]
    fresh = patched("none", dropout=0.0)
    assert load_training_state(tmp_path / "s", fresh, adamw(fresh)).step == 5


def test_a_state_that_does_not_fit_is_refused(tmp_path):
    model = patched("none", dropout=0.0)
    save_training_state(tmp_path / "s", model, adamw(model), step=1)
    other = patched("none", dropout=0.0)
    lowcost.unapply(other)
    lowcost.apply(other, lora=lowcost.LoRAConfig(r=2, alpha=8, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"does not fit this model/optimizer: .*shape mismatches: "
                                         r"model\.model\.layers\.0\.self_attn\.q_proj\.lora_A: saved \(4, 32\) "
                                         r"vs now \(2, 32\)"):
        load_training_state(tmp_path / "s", other, adamw(other))
    with pytest.raises(FileNotFoundError, match="holds no training_state.json"):
        load_training_state(tmp_path, model, adamw(model))
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_training_state(tmp_path / "t", model, adamw(model), step=-1)
