"""Bad checkpoint configuration fails early, with one clear line (issue #11, "Late validation" and "Error
messages"): a misspelt policy or an unreadable budget at CheckpointConfig construction, a budget on a model with
nothing trainable before torch's raw autograd error, and every checkpoint error message short and on one line."""
import pytest
import torch

import lowcost
from ckpt_models import build_llama
from lowcost.checkpoint import CheckpointConfig, CheckpointMismatchError, apply_checkpointing, remove_checkpointing


def _one_clear_line(error: BaseException, limit: int = 400) -> str:
    text = str(error)
    assert "\n" not in text.strip(), f"multi-line error: {text!r}"
    assert len(text) <= limit, f"{len(text)} characters: {text[:200]}..."
    return text


def test_misspelt_policy_fails_at_construction_and_suggests_the_name():
    with pytest.raises(ValueError, match=r"unknown checkpoint policy 'selctive'.*did you mean 'selective'") as info:
        CheckpointConfig(policy="selctive")
    _one_clear_line(info.value)
    with pytest.raises(ValueError, match="unknown checkpoint policy 'fast'") as info:
        CheckpointConfig(policy="fast")
    _one_clear_line(info.value)


@pytest.mark.parametrize("budget", ["6 gigs", "lots", "-3GiB", 0, -5, 1.5, 0.0, True, [1]])
def test_unreadable_budget_fails_at_construction(budget):
    with pytest.raises(ValueError, match="budget") as info:
        CheckpointConfig(budget=budget)
    _one_clear_line(info.value)


@pytest.mark.parametrize("field, value", [("k", 0), ("k", 1.5), ("offload_prefetch", -1), ("offload_min_bytes", "1MB")])
def test_bad_integer_fields_fail_at_construction(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int") as info:
        CheckpointConfig(**{field: value})
    _one_clear_line(info.value)


def test_readable_budgets_and_candidates():
    assert CheckpointConfig(budget="6GiB").policy == "budget"
    assert CheckpointConfig(budget="1.5 GB").budget == "1.5 GB"
    assert CheckpointConfig(budget=0.35).budget == 0.35
    with pytest.raises(ValueError, match=r"candidates.*'ful'.*did you mean 'full'") as info:
        CheckpointConfig(budget=0.5, candidates=("none", "ful"))
    _one_clear_line(info.value)


def test_budget_on_a_model_with_nothing_trainable_is_a_clear_error():
    model = build_llama(peft=False, layers=2).requires_grad_(False)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="nothing in the model requires grad") as info:
        apply_checkpointing(model, CheckpointConfig(budget=0.5), profile_step=lambda: model(input_ids=ids).logits)
    _one_clear_line(info.value)
    assert remove_checkpointing(model) == 0


def test_budget_with_trainable_inputs_but_frozen_parameters_works():
    """Only the embeddings' output requires grad (e.g. prompt tuning): profiling differentiates w.r.t. the graph's
    own leaves and leaves every .grad untouched."""
    model = build_llama(peft=False, layers=2).requires_grad_(False)
    ids = torch.randint(0, 64, (2, 8))
    prompt = torch.zeros(1, 1, 32, requires_grad=True)

    def step():
        embeds = model.model.embed_tokens(ids) + prompt
        return model(inputs_embeds=embeds).logits.square().mean()

    report = apply_checkpointing(model, CheckpointConfig(budget=0.5), profile_step=step)
    try:
        assert report.predicted_bytes <= report.budget_bytes and prompt.grad is None
        step().backward()
        assert prompt.grad is not None
    finally:
        remove_checkpointing(model)


def test_runtime_errors_are_one_line():
    """Mismatch, in-place and option errors raised by lowcost.checkpoint stay short and on one line."""
    width = {"n": 8}
    lin = torch.nn.Linear(8, 8)
    out = lowcost.checkpoint(lambda t: lin(t).relu()[:, : width["n"]].exp(), torch.randn(3, 8))
    width["n"] = 5
    with pytest.raises(CheckpointMismatchError) as info:
        out.sum().backward()
    _one_clear_line(info.value)
    x = torch.randn(4)
    w = torch.randn(4, requires_grad=True)
    out = lowcost.checkpoint(lambda t: (t * w).sum(), x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="inplace") as info:
        out.backward()
    _one_clear_line(info.value)
    for bad in (dict(use_reentrant=True), dict(determinism_check="shape"), dict(context_fn=3)):
        with pytest.raises((ValueError, TypeError)) as info:
            lowcost.checkpoint(torch.sin, torch.randn(2, requires_grad=True), **bad)
        _one_clear_line(info.value)
