"""HF ``Trainer`` under torchrun (accelerate's DDP, gloo, 2 CPU processes) with a lowcost-patched model (LoRA,
``full`` checkpointing): the same logged losses and the same adapters as ``Trainer`` in one process.

accelerate's FSDP2 configuration cannot be exercised on the CPU: accelerate 1.15 ignores ``fsdp_plugin``
for ``MULTI_CPU`` and wraps in DDP (see scenario_trainer.py); lowcost under FSDP2 is tested directly in
test_fsdp.py."""
from __future__ import annotations

import pytest

from checks import assert_equal_updates
from conftest import needs_gloo
from launch import torchrun_scenario
from safetensors.torch import load_file

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import scenario_trainer
    out = tmp_path_factory.mktemp("trainer")
    single = scenario_trainer.run(out, "single")
    return out, single, torchrun_scenario("trainer", out, args=["ddp"])


def test_two_processes_log_the_losses_of_one(runs):
    _, single, ranks = runs
    assert len(single["losses"]) == 3
    for rank in ranks:
        assert rank["wrapped"] == "DistributedDataParallel"
        for got, want in zip(rank["losses"], single["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (rank["losses"], single["losses"])


def test_two_processes_train_the_adapters_of_one(runs, initial):
    out, _, _ = runs
    one = load_file(str(out / "trainer-single-adapter" / "adapter_model.safetensors"))
    expected = {name: one[f"base_model.model.{name}.weight"] for name in initial}
    # AdamW (the Trainer's optimizer), not the SGD of the DDP/FSDP tests: its first steps divide each
    # gradient element by its own running magnitude, and lora_A's gradients are tiny while B is near zero,
    # so fp32 rounding differences between one 4-row batch and two 2-row batches come out larger in the
    # update. Measured: unfused layers within 2e-5; the fused gated MLP (lowcost.apply's default), whose
    # backward sums over rows in another order, up to 9.8e-5 on three mlp lora_A (the rest <= 1.1e-5).
    # The SGD tests hold the fused updates to fp32's 2e-5; a wrong scale, mask or reduction here is O(1).
    assert_equal_updates(out / "trainer-ddp-adapter", expected, initial, tol=2e-4)
