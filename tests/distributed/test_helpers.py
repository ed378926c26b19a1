"""lowcost.distributed's helpers and lowcost.patch.ranks in one process (no launch): batch splitting and its
errors, rank seeds, the all-gather counter, and the refusals, with a world-1 gloo group where one is needed."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lowcost
from conftest import needs_gloo
from dist_cases import adapter_params, patched
from lowcost.distributed import AllGatherCounter, local_batch_size, rank_seed, seed_rank, shard_batch, shard_model, \
    unsharded
from lowcost.patch import lora_layers, ranks
from tiny_models import randomize_adapters


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank in this process, destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_local_batch_size():
    assert local_batch_size(8, world_size=2) == 4
    assert local_batch_size(3) == 3  # no process group: world size 1
    with pytest.raises(ValueError, match=r"global batch size 7 is not divisible by the world size 2: every rank "
                                         r"must get the same number of samples \(use 6 or 8, or change"):
        local_batch_size(7, world_size=2)
    with pytest.raises(ValueError, match=r"global batch size 1 is not divisible by the world size 4:.*\(use 4,"):
        local_batch_size(1, world_size=4)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="global_batch_size must be an int >= 1"):
            local_batch_size(bad, world_size=1)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        local_batch_size(4, world_size=0)


def test_shard_batch_takes_contiguous_rows_of_every_tensor():
    ids = torch.arange(12).reshape(6, 2)
    batch = {"input_ids": ids, "labels": ids + 100, "meta": "kept", "scalar": torch.tensor(3.0)}
    part = shard_batch(batch, rank=1, world_size=3)
    assert torch.equal(part["input_ids"], ids[2:4]) and torch.equal(part["labels"], ids[2:4] + 100)
    assert part["meta"] == "kept" and part["scalar"].item() == 3.0
    first, second = shard_batch((ids, [ids]), rank=0, world_size=2)
    assert torch.equal(first, ids[:3]) and torch.equal(second[0], ids[:3])
    assert torch.equal(shard_batch(ids), ids)  # one process: the whole batch


def test_shard_batch_errors():
    with pytest.raises(ValueError, match="global batch size 5 is not divisible by the world size 2"):
        shard_batch(torch.zeros(5, 3), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"same number of rows \(dim 0\), got \[2, 4\]"):
        shard_batch({"a": torch.zeros(4), "b": torch.zeros(2)}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch holds no tensor to split"):
        shard_batch({"a": 1}, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        shard_batch(torch.zeros(4), rank=2, world_size=2)


def test_rank_seeds_are_stable_distinct_and_checked():
    seeds = [rank_seed(1234, r) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(1234, 3) == rank_seed(1234, 3) != rank_seed(1235, 3)
    assert seed_rank(7) == rank_seed(7, 0)
    assert torch.initial_seed() == rank_seed(7, 0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        rank_seed(-1, 0)
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        rank_seed(1, -1)


def test_differences_and_single_process_collectively():
    assert ranks.differences({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == \
        ["b: 2 vs 3", "c: <missing> vs 4"]
    described = []
    assert ranks.collectively("x", lambda: 5, lambda r: described.append(r)) == 5
    assert described == []  # one process: nothing to compare, nothing gathered


@needs_gloo
def test_all_gather_counter_counts_and_restores(world_of_one):
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor")
                 if hasattr(dist, name)}
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    name = gather.__name__
    out, x = torch.empty(3), torch.ones(3)
    with AllGatherCounter() as gathers:
        gathers.phase("a")
        getattr(dist, name)(out, x)
        gathers.phase("b")
        getattr(dist, name)(out, x)
        getattr(dist, name)(out, x)
        with pytest.raises(RuntimeError, match="already active"):
            gathers.__enter__()
    assert dict(gathers.counts) == {"a": 1, "b": 2} and gathers.total == 3
    assert {name: getattr(dist, name) for name in originals} == originals


@needs_gloo
def test_wrapped_models_are_refused_with_the_order(world_of_one):
    ddp = DistributedDataParallel(patched("none"))
    for call in (lambda: lowcost.apply(ddp, lora=lowcost.LoRAConfig()), lambda: lowcost.unapply(ddp),
                 lambda: lowcost.merge(ddp)):
        with pytest.raises(RuntimeError, match=r"already wrapped by DistributedDataParallel; call "
                                               r"lowcost\.apply\(model, \.\.\.\) first, then wrap"):
            call()
    sharded = shard_model(patched("none"))
    for call in (lambda: lowcost.unapply(sharded), lambda: lowcost.merge(sharded)):
        with pytest.raises(RuntimeError, match=r"already wrapped by fully_shard \(FSDP2\)"):
            call()
    with pytest.raises(RuntimeError, match=r"shard_model: the model is already wrapped by fully_shard"):
        shard_model(sharded)


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match=r"shard_model needs torch\.distributed\.init_process_group"):
        shard_model(patched("none"))


@needs_gloo
def test_unsharded_gathers_every_unit_then_reshards(world_of_one):
    """Inside ``unsharded`` no parameter is a DTensor shard (the model computes as usual); after it every one
    is again; a model without FSDP2 units is refused (nothing to gather: likely a mistake)."""
    def is_shard(p):
        return type(p).__name__ == "DTensor"
    plain = patched("none")
    with pytest.raises(ValueError, match=r"unsharded: the model has no FSDP2 unit \(shard_model\(model\) first\)"):
        with unsharded(plain):
            pass
    model = shard_model(patched("none"))
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        expected = plain(ids).logits
        with unsharded(model):
            assert not any(is_shard(p) for p in model.parameters())
            assert torch.equal(model(ids).logits, expected)
    assert all(is_shard(p) for p in model.parameters())


def test_save_adapter_of_a_ddp_model_unwraps_it(world_of_one, tmp_path):
    model = patched("none")
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(DistributedDataParallel(model), tmp_path / "a")
    fresh = patched("none")
    lowcost.load_adapter(DistributedDataParallel(fresh), tmp_path / "a")
    for (name, a), (_, b) in zip(adapter_params(model).items(), adapter_params(fresh).items()):
        assert torch.equal(a, b), name
