"""The budget planner: budget parsing, the knapsack solver against brute force, the floor error, and the
fit of an installed plan (measured bytes within ±10% of the prediction, never above the budget)."""
import itertools
import random

import pytest
import torch

from ckpt_models import assert_same, build_llama, llama_grads
from lowcost.checkpoint import (BudgetError, CheckpointConfig, apply_checkpointing, parse_budget,
                                remove_checkpointing, track)
from lowcost.checkpoint.planner import Profile, solve


def test_parse_budget():
    assert parse_budget("6GiB", 0) == 6 * 2**30
    assert parse_budget("1.5 MB", 0) == 1_500_000
    assert parse_budget(4096, 0) == 4096
    assert parse_budget(0.25, 1000) == 250
    for bad in ("six", "3 parsecs", 0, 1.5, True):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000)
    with pytest.raises(ValueError, match="picks the policy"):
        CheckpointConfig(policy="selective", budget="1GiB")
    assert CheckpointConfig(budget="1GiB").policy == "budget"


def _random_profile(rng, n):
    modes = ("none", "selective", "full")
    table, secs = [], []
    for _ in range(n):
        full = rng.randint(1, 50)
        sel = full + rng.randint(1, 200)
        table.append({"full": full * 1000, "selective": sel * 1000, "none": (sel + rng.randint(1, 300)) * 1000})
        secs.append({"none": 0.0, "selective": rng.uniform(0.1, 1.0), "full": rng.uniform(1.0, 3.0)})
    return Profile(modes, table, secs, fixed=rng.randint(0, 100) * 1000)


def test_solver_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        prof = _random_profile(rng, rng.randint(1, 6))
        budget = rng.randint(prof.floor, prof.total(["none"] * len(prof.bytes)))
        plan = solve(prof, budget, resolution=100_000)
        assert prof.total(plan) <= budget
        cost = lambda choice: sum(s[m] for s, m in zip(prof.seconds, choice))  # noqa: E731
        best = min(cost(c) for c in itertools.product(prof.modes, repeat=len(prof.bytes))
                   if prof.total(list(c)) <= budget)
        assert cost(plan) == pytest.approx(best)
        coarse = solve(prof, budget, resolution=64)  # coarser units: still never above the budget
        assert prof.total(coarse) <= budget


def test_budget_below_floor_names_the_floor():
    prof = _random_profile(random.Random(1), 3)
    with pytest.raises(BudgetError, match=rf"below the floor .*\({prof.floor} bytes\)"):
        solve(prof, prof.floor - 1)


@pytest.mark.parametrize("fraction", [0.35, 0.7])
def test_budget_plan_fits_and_is_bit_exact(fraction, ids):
    model = build_llama(peft=True, layers=4)
    params = list(model.parameters())
    _, grads_ref = llama_grads(model, ids)
    report = apply_checkpointing(model, CheckpointConfig(budget=fraction),
                                 profile_step=lambda: model(input_ids=ids, labels=ids).loss)
    try:
        assert all(p.grad is None or torch.equal(p.grad, grads_ref[n]) for n, p in model.named_parameters()
                   if p.requires_grad), "profiling must not touch .grad"
        assert report.budget_bytes == int(fraction * report.no_checkpoint_bytes)
        assert report.floor_bytes <= report.predicted_bytes <= report.budget_bytes
        with track(params, hook=True) as measured:
            model(input_ids=ids, labels=ids).loss
        assert abs(measured.bytes() - report.predicted_bytes) <= 0.1 * report.predicted_bytes, str(report)
        assert measured.bytes() <= report.budget_bytes
        _, grads = llama_grads(model, ids)
        assert_same(grads_ref, grads, "budget plan")
        assert "budget" in str(report) and "predicted" in str(report)
    finally:
        remove_checkpointing(model)
    with pytest.raises(BudgetError, match="floor"):
        apply_checkpointing(model, CheckpointConfig(budget=1024),
                            profile_step=lambda: model(input_ids=ids, labels=ids).loss)
    assert remove_checkpointing(model) == 0
