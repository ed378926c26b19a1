"""FSDP2 (``fully_shard`` per decoder block, then the root) on lowcost-patched models: 2 gloo processes on
the CPU train 3 steps of SGD under every checkpoint policy with LoRA dropout on and rank-derived masks.

The adapters must equal one process's on the same global batches (``dist_cases.reference_run`` replays each
rank's rows with that rank's generator stream), which checks at once the sharded gradients, the reduction,
that recomputation replays each rank's masks exactly, and that save_adapter gathers full tensors.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from checks import FP32, assert_differ, assert_equal_updates, saved_adapters
from conftest import needs_gloo
from dist_cases import LAYERS, POLICIES, adapter_params, patched, peft_key
from launch import torchrun_scenario

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, torchrun_scenario("fsdp", out)


@pytest.mark.parametrize("policy", POLICIES)
def test_adapters_equal_one_process(fsdp, reference, initial, policy):
    out, _ = fsdp
    assert_equal_updates(out / f"fsdp-{policy}", reference[0], initial)


def test_dropout_masks_differ_across_ranks(fsdp, reference_same_masks, initial):
    """Had both ranks drawn the same masks, the run would equal this reference; it is far from it."""
    out, _ = fsdp
    assert_differ(out / "fsdp-full", reference_same_masks[0], initial, at_least=1e-2)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_all_gather_per_block_per_backward(fsdp, policy):
    """Every step: blocks + root gathered in forward, each block once in backward (the root keeps its
    parameters after forward); recomputation adds nothing, whatever the policy."""
    _, ranks = fsdp
    for rank in ranks:
        for step in rank["policies"][policy]["gathers"]:
            assert step == {"forward": LAYERS + 1, "backward": LAYERS}, (policy, step)


def test_frozen_base_sharded_and_never_given_gradients(fsdp):
    _, ranks = fsdp
    for rank in ranks:
        for policy, result in rank["policies"].items():
            checks = result["checks"]
            assert checks["all_sharded_dim0"], policy
            assert checks["frozen"] > 0 and checks["frozen_without_grad"], policy
            assert checks["trainable_with_grad"], policy
            assert checks["frozen_local_numel"] * 2 == checks["frozen_numel"], policy  # every dim 0 is even here


def test_mixed_precision_bf16_params_fp32_reduce(fsdp, reference_bf16, reference, initial):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) equals one process computing in bf16 with
    fp32 master adapters; it is not the fp32 run (the compute really was bf16)."""
    out, ranks = fsdp
    assert_equal_updates(out / "fsdp-bf16", reference_bf16[0], initial)
    assert_differ(out / "fsdp-bf16", reference[0], initial, at_least=1e-4)
    for rank in ranks:
        assert rank["bf16"]["checks"]["param_dtypes"] == ["torch.float32"]
        assert rank["bf16"]["checks"]["grad_dtypes"] == ["torch.float32"]
        assert rank["bf16"]["gathers"][0] == {"forward": LAYERS + 1, "backward": LAYERS}


def test_save_adapter_writes_once_from_rank_0_in_peft_layout(fsdp, initial):
    out, ranks = fsdp
    for policy in POLICIES:
        assert [rank["policies"][policy]["writes"] for rank in ranks] == [1, 0], policy
    directory = out / "fsdp-full"
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = saved_adapters(directory)
    for name, value in initial.items():
        assert saved[peft_key(name)].shape == value.shape, name  # full tensors, not shards


def test_saved_adapter_loads_into_peft(fsdp):
    from peft import PeftModel
    out, _ = fsdp
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    ours = patched("none", dropout=0.0)
    lowcost.load_adapter(ours, out / "fsdp-full")
    base = patched("none", dropout=0.0)
    lowcost.unapply(base)
    theirs = PeftModel.from_pretrained(base, str(out / "fsdp-full"))
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits
        actual = ours.eval()(input_ids=ids).logits
    assert (actual - expected).abs().max() <= FP32 * expected.abs().max()


def test_load_adapter_at_any_world_size(fsdp):
    """World 2 (in the run): into a sharded patched model, and into a patched model sharded afterwards;
    world 1 (here): into a plain model. Each equals the file exactly."""
    out, ranks = fsdp
    assert ranks[0]["load"]["sharded_then_loaded"] == 0.0
    assert ranks[0]["load"]["loaded_then_sharded"] == 0.0
    model = patched("none")
    lowcost.load_adapter(model, out / "fsdp-full")
    saved = saved_adapters(out / "fsdp-full")
    for name, param in adapter_params(model).items():
        assert torch.equal(param.detach(), saved[peft_key(name)]), name


def test_fully_shard_before_apply_is_refused_with_the_order(fsdp):
    _, ranks = fsdp
    for rank in ranks:
        for key, caller in (("apply_after_fully_shard", "apply"), ("load_into_unpatched_sharded", "load_adapter")):
            message = rank["load"][key]
            assert message.startswith(f"RuntimeError: lowcost.{caller}: the model is already wrapped by fully_shard")
            assert "call lowcost.apply(model, ...) first" in message and "fully_shard(model)" in message
