"""LoRA on a quantized frozen base (NF4, int8) under FSDP2 and DDP, 2 gloo processes on the CPU: the adapters
equal one process's on the same global batches (each rank's rows with its own dropout stream), and the
packed codes stay whole and identical on every rank (they are buffers: FSDP2 shards only the float
parameters; a 4-bit base is replicated, at a quarter of a bf16 base's bytes per rank)."""
from __future__ import annotations

import pytest

from checks import assert_equal_updates
from conftest import needs_gloo
from dist_cases import LAYERS, initial_adapters, reference_run
from launch import torchrun_scenario
from scenario_quantized import SCHEMES

pytestmark = needs_gloo
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down; the head stays dense (all-linear leaves it out)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    return out, torchrun_scenario("quantized", out)


@pytest.fixture(scope="module")
def references():
    """Per scheme: (one process replaying both ranks' rows and masks, the adapters it started from)."""
    return {scheme: (reference_run(2, quantize=scheme)[0], initial_adapters(quantize=scheme)) for scheme in SCHEMES}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("wrap", ("fsdp", "ddp"))
def test_adapters_equal_one_process(quantized, references, wrap, scheme):
    out, _ = quantized
    expected, initial = references[scheme]
    assert_equal_updates(out / f"{wrap}-{scheme}", expected, initial)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_codes_replicated_and_identical(quantized, scheme):
    _, ranks = quantized
    for wrap in ("fsdp", "ddp"):
        facts = [rank[f"{wrap}-{scheme}"]["storage"] for rank in ranks]
        assert facts[0]["quantized_layers"] == LAYERS * LINEARS_PER_BLOCK, facts[0]
        assert all(f["packed_are_plain_tensors"] for f in facts), facts
        assert facts[0]["packed_sha256"] == facts[1]["packed_sha256"], "ranks hold different codes"
        assert facts[0]["packed_bytes"] == facts[1]["packed_bytes"] > 0
    assert all(rank[f"fsdp-{scheme}"]["storage"]["float_params_dtensor"] for rank in ranks)


def test_losses_agree_across_ranks(quantized):
    """Each rank logs its local loss; the two halves of the batch differ, so the values must too (a rank
    that silently trained on the other's rows would log the same numbers)."""
    _, ranks = quantized
    for key in ranks[0]:
        assert ranks[0][key]["losses"] != ranks[1][key]["losses"], key
