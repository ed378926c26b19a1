"""The stored formats against their references: bitsandbytes for NF4 (its CPU path), the ``gguf`` package's
``dequantize`` for the GGUF blocks (bit-identical), and the published NF4 code book."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowcost.reference.quant import (BLOCK_TYPES, NF4_VALUES, QuantizedWeight, dynamic_map, nf4_code, padded_width,
                                     quantize_int8, quantize_nf4)
from lowcost.reference.quant.nf4 import absmax_rows, dequantize_nf4
from lowcost.reference.quant import dequantize_packed, workspace_elements
from quant_cases import SCHEMES, gguf_type, k_for, make_quantized, random_blocks

try:
    import bitsandbytes.functional as bnb_f
    bnb_f.quantize_4bit(torch.zeros(64), blocksize=64, quant_type="nf4")
    HAS_BNB = True
except Exception:  # not installed, or no CPU path in this release
    HAS_BNB = False
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes with a CPU path is not installed "
                               "(pip install bitsandbytes); the code-book tests below still run")
SHAPES = [(1, 64), (7, 128), (33, 192), (300, 320)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(N, K, dtype, seed=0, zero_block=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.02 * (torch.rand(N, 1, generator=gen) * 3)
    if zero_block:
        w[0, : min(K, 64)] = 0  # an all-zero block
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------ NF4
def test_nf4_code_book_is_the_published_one():
    code = nf4_code()
    assert code.tolist() == list(NF4_VALUES) and len(code) == 16
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1 and bool((code[1:] > code[:-1]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", SHAPES)
def test_nf4_picks_the_nearest_code_value(N, K, dtype):
    """Without bitsandbytes: each index is the code value nearest to w / absmax (ties to the lower value)."""
    w = _weight(N, K, dtype)
    t = quantize_nf4(w, 64)
    blocks = w.float().reshape(-1, 64)
    assert torch.equal(t["absmax"].reshape(-1), blocks.abs().amax(1))
    scaled = (blocks / t["absmax"].reshape(-1, 1).clamp(min=1e-38)).reshape(-1)
    index = torch.stack((t["codes"] >> 4, t["codes"] & 15), -1).reshape(-1).long()
    dist = (scaled[:, None] - nf4_code()[None, :]).abs()
    assert bool((dist.gather(1, index[:, None]).squeeze(1) <= dist.min(1).values + 1e-7).all())


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", SHAPES)
def test_nf4_equals_bitsandbytes(N, K, dtype):
    w = _weight(N, K, dtype)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    mine = quantize_nf4(w, 64)
    assert torch.equal(mine["codes"].reshape(-1), packed.reshape(-1))
    assert torch.equal(mine["absmax"].reshape(-1), state.absmax)
    assert torch.equal(dequantize_nf4(mine, K, 64).to(dtype), bnb_f.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("N, K", SHAPES[1:] + [(1000, 512)])  # one block: absmax - mean(absmax) = 0
def test_nf4_double_quant_against_bitsandbytes(N, K):
    """Codes, group scales and offset equal; each 8-bit absmax equals bitsandbytes' or is strictly nearer to the
    value it encodes (bitsandbytes' CPU search lands one value off now and then); where they agree the
    dequantized weights are equal. (No all-zero absmax group here: bitsandbytes divides 0 by 0 for it.)"""
    w = _weight(N, K, torch.float32, zero_block=False)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    mine = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(mine["codes"].reshape(-1), packed.reshape(-1))
    assert torch.equal(mine["absmax_scale"], state.state2.absmax) and torch.equal(mine["absmax_offset"], state.offset)
    theirs, ours = state.absmax.long(), mine["absmax_q"].reshape(-1).long()
    absmax = w.reshape(-1, 64).abs().amax(1)
    target = (absmax - absmax.mean()) / mine["absmax_scale"].repeat_interleave(256)[: absmax.numel()]
    code = dynamic_map()
    differ = theirs != ours
    assert int(differ.sum()) <= max(1, absmax.numel() // 100)
    assert bool(((target - code[ours]).abs() < (target - code[theirs]).abs())[differ].all())
    if not bool(differ.any()):
        assert torch.equal(dequantize_nf4(mine, K, 64), bnb_f.dequantize_4bit(packed, state))


@needs_bnb
def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map(signed=True).float())


def test_nf4_pads_a_k_the_block_does_not_divide():
    """K = 100 with blocks of 64: each row is padded with zeros to 128 (stored), and exactly K columns return."""
    w = _weight(5, 100, torch.float32)
    t = quantize_nf4(w, 64)
    assert padded_width(100, 64) == 128 and t["codes"].shape == (5, 64) and t["absmax"].shape == (5, 2)
    padded = quantize_nf4(torch.nn.functional.pad(w, (0, 28)), 64)
    assert torch.equal(t["codes"], padded["codes"]) and torch.equal(t["absmax"], padded["absmax"])
    out = dequantize_nf4(t, 100, 64)
    assert out.shape == (5, 100)
    assert torch.equal(out, dequantize_nf4(padded, 128, 64)[:, :100])


@pytest.mark.parametrize("double", [False, True])
def test_nf4_error_is_within_half_a_code_step(double):
    """|w' - w| <= a·gap/2 + |a' - a|: half the widest code step at the block's absmax a, plus what the 8-bit
    absmax a' (double quantization) is off by."""
    w = _weight(16, 256, torch.float32, seed=3)
    t = quantize_nf4(w, 64, double)
    out = dequantize_nf4(t, 256, 64)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    stored = absmax_rows(t, 16, slice(None)).reshape(-1, 1)
    worst_gap = float((nf4_code()[1:] - nf4_code()[:-1]).max())
    bound = absmax * worst_gap / 2 + (stored - absmax).abs() + 1e-7
    assert bool(((out - w).reshape(-1, 64).abs() <= bound).all())
    assert double or torch.equal(stored, absmax)


# ------------------------------------------------------------------------------------------------ int8
def test_int8_rows():
    w = _weight(9, 70, torch.float32)
    w[3] = 0
    t = quantize_int8(w)
    assert t["qweight"].dtype == torch.int8 and t["scale"].shape == (9,)
    q = QuantizedWeight("int8", w.shape, t)
    out = q.dequantize()
    assert bool(((out - w).abs() <= t["scale"][:, None] / 2 + 1e-9).all())
    assert torch.equal(out[3], torch.zeros(70)) and int(t["qweight"].abs().max()) == 127


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_block_layouts_match_gguf(name):
    from gguf import GGML_QUANT_SIZES
    kind = BLOCK_TYPES[name]
    assert gguf_type(name).name.lower() == name
    assert GGML_QUANT_SIZES[gguf_type(name)] == (kind.block, kind.type_size)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_gguf_dequantize_is_bit_identical_on_every_byte_pattern(name):
    """Random block bytes (every code, scale and min pattern), each f16 field random too (inf/NaN included)."""
    from gguf.quants import dequantize
    kind = BLOCK_TYPES[name]
    raw = np.random.default_rng(1).integers(0, 256, size=(6, 3 * kind.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = dequantize(raw, gguf_type(name))
    q = QuantizedWeight(name, (6, 3 * kind.block), {"data": torch.from_numpy(raw)}, kind.block)
    got = q.dequantize().numpy()
    assert got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)) or \
        np.array_equal(got, expected, equal_nan=True)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_gguf_dequantize_of_quantized_weights(name):
    from gguf.quants import dequantize, quantize
    w = _weight(11, 96, torch.float32).numpy()
    raw = quantize(w, gguf_type(name))
    q = QuantizedWeight(name, w.shape, {"data": torch.from_numpy(raw)}, BLOCK_TYPES[name].block)
    assert np.array_equal(q.dequantize().numpy(), dequantize(raw, gguf_type(name)))


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_gguf_blocks_at_an_odd_byte_offset_decode_the_same(name):
    """The decoders read float16 scales as one 16/32-bit word per block when the bytes are aligned for it; bytes
    at an odd offset in their storage (a view into a larger buffer) take the byte-wise path, same values."""
    q = make_quantized(name, 5, k_for(name, 256), seed=2)
    buffer = torch.empty(q.data.numel() + 1, dtype=torch.uint8)
    buffer[1:] = q.data.reshape(-1)
    shifted = QuantizedWeight(name, q.shape, {"data": buffer[1:].view(q.data.shape)}, q.block_size)
    assert shifted.data.storage_offset() == 1
    assert torch.equal(shifted.dequantize(), q.dequantize())
    assert torch.equal(shifted.dequantize(rows=slice(2, 3)), q.dequantize(rows=slice(2, 3)))


# ------------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_by_slice_and_by_index_equal_the_whole(scheme):
    q = make_quantized(scheme, 37, 256)
    whole = q.dequantize()
    assert torch.equal(q.dequantize(rows=slice(5, 30)), whole[5:30])
    index = torch.tensor([36, 0, 7, 7, 20])
    assert torch.equal(q.dequantize(rows=index), whole[index])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoding_into_a_reused_workspace_equals_a_fresh_decode(scheme):
    """The op's row loop decodes every block of rows into one workspace: a block, then a smaller last block, one
    row and no row, each bit-identical to the fresh decode, and each a view of the workspace (no new buffer).
    The workspace starts as NaN, so a value the decoder failed to write would show; K = 200 pads NF4's rows."""
    K = k_for(scheme, 200)
    q = make_quantized(scheme, 37, K, seed=3)
    whole = q.dequantize()
    workspace = torch.full((workspace_elements(scheme, 25, K, q.block_size),), float("nan"))
    for rows in (slice(5, 30), slice(30, 37), slice(36, 37), slice(3, 3)):
        got = dequantize_packed(scheme, q.packed, K, q.block_size, rows, workspace=workspace)
        assert got.shape == (rows.stop - rows.start, K) and torch.equal(got, whole[rows])
        assert got.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr()
    as_bf16 = dequantize_packed(scheme, q.packed, K, q.block_size, slice(0, 9), torch.bfloat16, workspace)
    assert torch.equal(as_bf16, whole[:9].to(torch.bfloat16))


def test_casting_changes_the_compute_dtype_not_the_stored_bytes():
    q = make_quantized("nf4-dq", 8, 128)
    stored = {n: (t.dtype, t.clone()) for n, t in q.named_buffers()}
    module = torch.nn.Module()
    module.q = q
    module.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    for n, t in q.named_buffers():
        assert t.dtype == stored[n][0] and torch.equal(t, stored[n][1])
    copy = make_quantized("nf4-dq", 8, 128, seed=5)
    copy.load_state_dict(q.state_dict())
    assert torch.equal(copy.dequantize(torch.float32), q.dequantize(torch.float32))


def test_bytes_of_each_format():
    N, K = 64, 1024
    dense_bf16 = N * K * 2
    assert make_quantized("nf4", N, K).nbytes == N * (K // 2 + 4 * K // 64)
    assert make_quantized("nf4", N, K).nbytes / dense_bf16 <= 0.29
    assert make_quantized("nf4-dq", N, K).nbytes / dense_bf16 <= 0.27
    assert make_quantized("int8", N, K).nbytes / dense_bf16 <= 0.52
    assert make_quantized("q4_1", N, K).nbytes == N * K // 32 * 20


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown quantized format 'q5_1'"):
        QuantizedWeight("q5_1", (2, 32), {"data": torch.zeros(2, 24, dtype=torch.uint8)}, 32)
    with pytest.raises(ValueError, match="missing"):
        QuantizedWeight("nf4", (2, 64), {"codes": torch.zeros(2, 32, dtype=torch.uint8)}, 64)
