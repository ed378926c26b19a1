"""``QuantizedWeight.make_row_shardable`` (what ``lowcost.distributed.shard_model`` does before FSDP2's
``fully_shard``), in one process, for every format: nothing about the weight changes but where its
row-indexed tensors live (frozen integer Parameters instead of buffers); FSDP2's row split, padding and
all-gather (emulated: torch.chunk along dim 0, each shard padded to ceil(N / W) rows with garbage, the
shards concatenated, the first N rows kept, as FSDP2's all-gather output viewed at the original size) give
back the packed tensors bit for bit, on odd row counts; the padding never reaches a result.
The 2-process FSDP2 runs are in tests/distributed/test_quantized_base.py."""
from __future__ import annotations

import math

import pytest
import torch

from lowcost.ops.qlora_linear import quantized_linear
from lowcost.reference.quant.weight import ROW_TENSORS
from quant_cases import SCHEMES, k_for, make_quantized

ROWS = (1, 5, 7)
WORLDS = (2, 3)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bytes(x), _bytes(y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_make_row_shardable_changes_no_byte(scheme):
    weight = make_quantized(scheme, 7, k_for(scheme, 96))
    before, dense, keys, nbytes = [t.clone() for t in weight.packed], weight.dequantize(), \
        set(weight.state_dict()), weight.nbytes
    assert weight.make_row_shardable() is weight
    assert _same_bits(weight.packed, before)
    assert torch.equal(weight.dequantize(), dense)
    assert set(weight.state_dict()) == keys and weight.nbytes == weight.resident_nbytes == nbytes
    params = dict(weight.named_parameters())
    assert set(params) == {n for n in keys if n in ROW_TENSORS}
    for name, p in params.items():
        assert not p.requires_grad and not p.is_floating_point(), name   # MixedPrecisionPolicy casts floats only
        assert p.shape[0] == 7, name
    assert {n for n, _ in weight.named_buffers()} == keys - set(params)  # nf4-dq's scale/offset stay whole
    weight.make_row_shardable()                                           # idempotent
    assert _same_bits(weight.packed, before)


@pytest.mark.parametrize("scheme", ("nf4", "nf4-dq", "int8"))
def test_state_dict_keeps_dtypes_and_moves_between_forms(scheme):
    """The state dict of a row-shardable weight has the unsharded one's keys, dtypes and bytes; each form
    loads the other's state dict bit for bit (no float <-> int value conversion of the bit-cast scales)."""
    plain, other = make_quantized(scheme, 5, 96, seed=1), make_quantized(scheme, 5, 96, seed=2)
    shardable = make_quantized(scheme, 5, 96, seed=1).make_row_shardable()
    expected, got = plain.state_dict(), shardable.state_dict()
    assert list(got) == list(expected)
    assert _same_bits(list(got.values()), list(expected.values()))
    other_shardable = make_quantized(scheme, 5, 96, seed=2).make_row_shardable()
    other_shardable.load_state_dict(expected)
    assert _same_bits(other_shardable.packed, plain.packed)
    assert all(not p.is_floating_point() for p in other_shardable.parameters())
    other.load_state_dict(got)
    assert _same_bits(other.packed, plain.packed)


@pytest.mark.parametrize("scheme", ("nf4", "int8", "q4_1"))
def test_casting_a_row_shardable_weight_sets_the_compute_dtype_only(scheme):
    weight = make_quantized(scheme, 5, k_for(scheme, 64)).make_row_shardable()
    before = [t.clone() for t in weight.packed]
    weight.to(torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and weight.dequantize().dtype == torch.bfloat16
    assert _same_bits(weight.packed, before)
    assert all(isinstance(p, torch.nn.Parameter) for p in weight.parameters())


def _fsdp_round_trip(stored: torch.Tensor, world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What FSDP2 does to one dim-0-sharded tensor: chunk rows, pad each shard to ceil(N / W) rows (here with
    0xFF bytes, so a padding row that leaked would be visible), all-gather, keep the original N rows."""
    rows = stored.shape[0]
    padded_rows = math.ceil(rows / world)
    shards = []
    for chunk in (list(torch.chunk(stored, world, dim=0)) + [stored[:0]] * world)[:world]:
        shard = torch.empty((padded_rows, *stored.shape[1:]), dtype=stored.dtype)
        shard.view(torch.uint8).fill_(0xFF)
        shard[:chunk.shape[0]] = chunk
        shards.append(shard)
    gathered = torch.cat(shards)                        # (W · ceil(N / W), ...): the all-gather output
    return gathered.as_strided(stored.shape, stored.stride()), shards


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_split_pad_and_gather_round_trip_is_exact(scheme, rows, world):
    K = k_for(scheme, 70)
    weight = make_quantized(scheme, rows, K, seed=rows)
    reference = make_quantized(scheme, rows, K, seed=rows)
    weight.make_row_shardable()
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name, p in list(weight.named_parameters()):
        gathered, shards = _fsdp_round_trip(p.detach(), world)
        assert len(shards) == world and all(s.shape[0] == math.ceil(rows / world) for s in shards)
        weight._parameters[name] = torch.nn.Parameter(gathered, requires_grad=False)   # FSDP2's unsharded param
    assert _same_bits(weight.packed, reference.packed)
    assert torch.equal(weight.dequantize(torch.float64), reference.dequantize(torch.float64))
    assert torch.equal(quantized_linear(x, weight, backend="torch"), quantized_linear(x, reference, backend="torch"))


def test_row_tensors_cover_every_format_and_keep_rows_whole():
    """Every stored tensor but nf4-dq's group constants is indexed by rows, and one row is whole blocks, so
    any split of rows is a split of whole blocks."""
    from lowcost.reference.quant import FORMATS
    for scheme in SCHEMES:
        weight = make_quantized(scheme, 3, k_for(scheme, 64))
        for name, t in zip(FORMATS[scheme].tensor_names, weight.packed):
            if name in ROW_TENSORS:
                assert t.shape[0] == 3, (scheme, name)
            else:
                assert scheme == "nf4-dq" and name in ("absmax_scale", "absmax_offset"), (scheme, name)
