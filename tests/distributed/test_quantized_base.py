"""LoRA on a quantized frozen base (NF4, int8) under FSDP2 and DDP, 2 gloo processes on the CPU.

The adapters equal one process's on the same global batches (each rank's rows with its own dropout stream),
under FSDP2 also with ``MixedPrecisionPolicy(bf16 params, fp32 reduce)``. Under FSDP2 (``shard_model``)
each rank holds only its rows of every packed tensor (codes and scales), all-gathered in the same one
all-gather per block per forward and per backward as before; DDP keeps them whole. A 5-row layer, whose
shard on rank 1 is padded, gives exactly the unsharded result with garbage written into the padding."""
from __future__ import annotations

import math

import pytest
import torch

from checks import FP32, assert_equal_updates, saved_adapters
from conftest import needs_gloo
from dist_cases import LAYERS, initial_adapters, patched, reference_run, relative_error
from launch import torchrun_scenario
from scenario_quantized import PADDED_SCHEMES, SCHEMES, packed_sha256, quantized_weights

pytestmark = needs_gloo
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down; the head stays dense (all-linear leaves it out)
WORLD = 2


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    return out, torchrun_scenario("quantized", out, nprocs=WORLD)


@pytest.fixture(scope="module")
def references():
    """Per scheme: (one process replaying both ranks' rows and masks, the adapters it started from)."""
    return {scheme: (reference_run(WORLD, quantize=scheme)[0], initial_adapters(quantize=scheme)) for scheme in SCHEMES}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("wrap", ("fsdp", "ddp"))
def test_adapters_equal_one_process(quantized, references, wrap, scheme):
    out, _ = quantized
    expected, initial = references[scheme]
    assert_equal_updates(out / f"{wrap}-{scheme}", expected, initial)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fsdp_and_ddp_save_the_same_adapter_files(quantized, scheme):
    out, ranks = quantized
    for key in (f"fsdp-{scheme}", f"ddp-{scheme}"):
        assert [rank[key]["writes"] for rank in ranks] == [1, 0], key      # rank 0 alone writes
    fsdp, ddp = saved_adapters(out / f"fsdp-{scheme}"), saved_adapters(out / f"ddp-{scheme}")
    assert set(fsdp) == set(ddp)
    for key in fsdp:
        assert fsdp[key].shape == ddp[key].shape and fsdp[key].dtype == ddp[key].dtype, key
        assert relative_error(fsdp[key], ddp[key]) <= FP32, key


def _chunk_rows(rows: int, rank: int) -> int:
    """Rows of rank ``rank``'s shard as FSDP2 splits dim 0 (torch.chunk: ceil(rows / W) per rank)."""
    per = math.ceil(rows / WORLD)
    return max(0, min(per, rows - rank * per))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fsdp_shards_packed_rows_and_each_rank_holds_its_share(quantized, scheme):
    _, ranks = quantized
    for rank, result in enumerate(ranks):
        facts = result[f"fsdp-{scheme}"]["storage"]
        assert facts["quantized_layers"] == LAYERS * LINEARS_PER_BLOCK, facts["quantized_layers"]
        expected_resident = 0
        for stored in (t for weight in facts["stored"] for t in weight):
            rows = stored["shape"][0]
            assert stored["sharded"] and stored["parameter"] and stored["placements"] == ["S(0)"], stored
            assert stored["local_rows"] == _chunk_rows(rows, rank), stored
            assert "float" not in stored["dtype"], stored   # integer storage: mixed precision never casts it
            expected_resident += math.ceil(rows / WORLD) * stored["row_bytes"]
        assert facts["resident_bytes"] == expected_resident       # exact, from the shard shapes (+ padding)
        assert facts["float_params_dtensor"]
    totals = {r[f"fsdp-{scheme}"]["storage"]["total_bytes"] for r in ranks}
    local = sum(t["local_bytes"] for r in ranks for w in r[f"fsdp-{scheme}"]["storage"]["stored"] for t in w)
    assert len(totals) == 1 and local == totals.pop()               # the shards partition the packed bytes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gathered_packed_tensors_equal_the_unsharded_ones_bit_for_bit(quantized, scheme):
    _, ranks = quantized
    own = packed_sha256(t for w in quantized_weights(patched("none", quantize=scheme)) for t in w.packed)
    for rank in ranks:
        assert rank[f"fsdp-{scheme}"]["storage"]["gathered_sha256"] == own
        assert rank[f"ddp-{scheme}"]["storage"]["gathered_sha256"] == own
        assert rank[f"fsdp-{scheme}"]["inside_forward"]["stored_types"] == ["Parameter"]   # gathered, not DTensor


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_state_dict_has_the_unsharded_dtypes_and_bytes(quantized, scheme):
    """model.state_dict() of the sharded model: the quantized entries in their own dtypes (absmax / scale
    float32, not the int32 they are held as), gathered byte for byte equal to the unsharded model's."""
    _, ranks = quantized
    plain = patched("none", quantize=scheme).state_dict()
    names = [k for k in sorted(plain) if k.rsplit(".", 1)[-1] in ("codes", "absmax", "qweight", "scale")]
    expected = {"keys": len(names), "dtypes": sorted({str(plain[k].dtype) for k in names}),
                "sha256": packed_sha256(plain[k] for k in names)}
    for rank in ranks:
        for wrap in ("fsdp", "ddp"):
            assert rank[f"{wrap}-{scheme}"]["storage"]["state_dict"] == expected, wrap


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ddp_keeps_the_packed_tensors_whole(quantized, scheme):
    _, ranks = quantized
    for rank in ranks:
        facts = rank[f"ddp-{scheme}"]["storage"]
        assert not any(t["sharded"] or t["parameter"] for w in facts["stored"] for t in w)
        assert facts["resident_bytes"] == facts["total_bytes"] > 0


def test_packed_outside_forward_is_refused_while_sharded(quantized):
    _, ranks = quantized
    for rank in ranks:
        message = rank["fsdp-nf4"]["storage"]["packed_outside_forward"]
        assert message.startswith("RuntimeError: the nf4 weight's 'codes' is sharded by FSDP2"), message
        assert rank["ddp-nf4"]["storage"]["packed_outside_forward"] == ""


@pytest.mark.parametrize("key", ["fsdp-nf4", "fsdp-int8", "fsdp-nf4-bf16"])
def test_all_gathers_per_step_unchanged_by_sharding_the_codes(quantized, key):
    """As with a dense base (test_fsdp): blocks + root gathered in forward, each block once in backward."""
    _, ranks = quantized
    for rank in ranks:
        for step in rank[key]["gathers"]:
            assert step == {"forward": LAYERS + 1, "backward": LAYERS}, (key, step)


def test_mixed_precision_bf16_leaves_the_packed_tensors_uncast(quantized):
    """MixedPrecisionPolicy(param_dtype=bf16): inside a block's forward the gathered codes are still uint8
    and the absmax still float32, byte for byte the fp32 run's; the adapters equal one process computing in
    bf16 over the same (uncast) quantized base with fp32 master adapters."""
    out, ranks = quantized
    for rank in ranks:
        bf16, fp32 = rank["fsdp-nf4-bf16"]["inside_forward"], rank["fsdp-nf4"]["inside_forward"]
        assert bf16["stored"] == ["torch.uint8", "torch.int32"] and bf16["packed"] == ["torch.uint8", "torch.float32"]
        assert bf16["packed_sha256"] == fp32["packed_sha256"]
    expected = reference_run(WORLD, param_dtype=torch.bfloat16, quantize="nf4")[0]
    assert_equal_updates(out / "fsdp-nf4-bf16", expected, initial_adapters(quantize="nf4"))


@pytest.mark.parametrize("scheme", PADDED_SCHEMES)
def test_padding_rows_never_reach_a_result(quantized, scheme):
    """5 rows on 2 ranks: rank 0 holds 3, rank 1 holds 2 plus 1 padding row (filled with 0xFF bytes in the
    scenario); the gathered layer's output and input gradient equal the unsharded layer's exactly."""
    _, ranks = quantized
    filled = [rank["padded"][scheme]["padding_bytes_filled"] for rank in ranks]
    assert filled[0] == 0 and filled[1] > 0, filled
    for rank in ranks:
        padded = rank["padded"][scheme]
        assert padded["y_equal"] and padded["dx_equal"] and padded["y_shape"] == [3, 5], padded


def test_losses_agree_across_ranks(quantized):
    """Each rank logs its local loss; the two halves of the batch differ, so the values must too (a rank
    that silently trained on the other's rows would log the same numbers)."""
    _, ranks = quantized
    for key in ranks[0]:
        if isinstance(ranks[0][key], dict) and "losses" in ranks[0][key]:
            assert ranks[0][key]["losses"] != ranks[1][key]["losses"], key
