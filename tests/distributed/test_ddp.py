"""DDP on lowcost-patched models (2 gloo processes on the CPU) and the bad input that lowcost catches under
torch.distributed: mismatched LoRA configs across ranks, a rank whose apply fails, apply after wrapping,
a world size that does not divide the global batch."""
from __future__ import annotations

import pytest

from checks import assert_differ, assert_equal_updates
from conftest import needs_gloo
from dist_cases import POLICIES
from launch import torchrun_scenario

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun_scenario("ddp", out)


@pytest.mark.parametrize("policy", POLICIES)
def test_adapters_equal_one_process(ddp, reference, initial, policy):
    """No 'marked ready twice', no static_graph: lowcost's recomputed graph never reaches a parameter's
    AccumulateGrad, so each LoRA gradient is reduced once per step under every policy."""
    out, ranks = ddp
    assert_equal_updates(out / f"ddp-{policy}", reference[0], initial)
    assert [rank["policies"][policy]["static_graph"] for rank in ranks] == [False, False]
    assert [rank["policies"][policy]["writes"] for rank in ranks] == [1, 0]


def test_dropout_masks_differ_across_ranks(ddp, reference_same_masks, initial):
    out, _ = ddp
    assert_differ(out / "ddp-selective", reference_same_masks[0], initial, at_least=1e-2)


def test_mismatched_lora_configs_detected_at_apply(ddp):
    """Rank 0 asks for r=4, rank 1 for r=2: both ranks raise the same error, naming rank 1, the field and
    both values, and both models are left unpatched."""
    _, ranks = ddp
    messages = [rank["bad_input"]["mismatch"] for rank in ranks]
    assert messages[0] == messages[1]
    assert messages[0].startswith("ValueError: lowcost.apply: rank 1 differs from rank 0")
    assert "LoRAConfig.r: 4 vs 2" in messages[0] and "more" in messages[0]
    assert all(rank["bad_input"]["mismatch_left_unpatched"] for rank in ranks)


def test_a_rank_whose_apply_fails_fails_every_rank(ddp):
    """No rank is left waiting in a collective: rank 1's own error there, a RuntimeError naming it on rank 0."""
    _, ranks = ddp
    own, reported = ranks[1]["bad_input"]["one_rank_fails"], ranks[0]["bad_input"]["one_rank_fails"]
    assert own.startswith("ValueError: ") and "'no_such_module'" in own
    assert reported.startswith(f"RuntimeError: lowcost.apply failed on rank 1 ({own}); every rank must run")
    assert all(rank["bad_input"]["one_rank_fails_left_unpatched"] for rank in ranks)


def test_apply_on_one_rank_only_inside_this_rank_only(ddp):
    """Rank 0 patches a model the other rank never sees; it does not wait for the other rank."""
    _, ranks = ddp
    assert [rank["bad_input"]["this_rank_only_patched"] for rank in ranks] == [True, False]


def test_apply_after_ddp_is_refused_with_the_order(ddp):
    _, ranks = ddp
    for rank in ranks:
        message = rank["bad_input"]["apply_after_ddp"]
        assert message.startswith("RuntimeError: lowcost.apply: the model is already wrapped by "
                                  "DistributedDataParallel; call lowcost.apply(model, ...) first")


def test_world_size_that_does_not_divide_the_batch(ddp):
    _, ranks = ddp
    for rank in ranks:
        assert rank["bad_input"]["indivisible_batch"] == (
            "ValueError: global batch size 5 is not divisible by the world size 2: every rank must get the same "
            "number of samples (use 4 or 6, or change the number of processes)")
