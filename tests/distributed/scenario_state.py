"""Training-state scenario (2 ranks, FSDP2, AdamW): save with ``save_training_state`` after 2 steps and keep
training (the uninterrupted curve); resume at the same world size with dropout on (RNG restored); resume a
state that one process saved (world 1 → 2). The test resumes the world-2 state in one process (2 → 1)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from dist_cases import DROPOUT_SEED, adamw, patched, train_steps
from lowcost.distributed import load_training_state, save_training_state, seed_rank, shard_model


def _sharded(dropout: float):
    model = patched("full", dropout)
    shard_model(model)
    return model, adamw(model)


def _world() -> dict:
    return {"world_size": dist.get_world_size(), "rank": dist.get_rank()}


def save_then_continue(directory: Path, dropout: float) -> dict:
    model, optimizer = _sharded(dropout)
    seed_rank(DROPOUT_SEED)
    before = train_steps(model, optimizer, range(2), **_world())
    save_training_state(directory, model, optimizer, step=2)
    return {"before": before, "after": train_steps(model, optimizer, range(2, 4), **_world())}


def resume(directory: Path, dropout: float) -> dict:
    model, optimizer = _sharded(dropout)
    info = load_training_state(directory, model, optimizer)
    losses = train_steps(model, optimizer, range(info.step, info.step + 2), **_world())
    return {"info": dataclasses.asdict(info), "after": losses}


def run(out_dir, world1_state) -> dict:
    return {"no_dropout": save_then_continue(out_dir / "state-w2", dropout=0.0),
            "dropout": save_then_continue(out_dir / "state-w2-dropout", dropout=0.1),
            "dropout_resumed": resume(out_dir / "state-w2-dropout", dropout=0.1),
            "from_world1": resume(Path(world1_state), dropout=0.0)}
