"""Triton Philox4x32-10 and dropout mask: the spec's known answers, the pure-torch reference, drop rates.

Runs under the Triton interpreter on a CPU-only machine (tests/conftest.py sets TRITON_INTERPRET=1 before
the kernels are imported) and natively on a GPU.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lowcost.reference import philox as ref  # noqa: E402

try:
    from lowcost.kernels import lora_linear as triton_lora
    from lowcost.kernels.philox import philox4x32_10
except ImportError:  # source tree without the installed package: kernels/ is lowcost.kernels
    from kernels import lora_linear as triton_lora
    from kernels.philox import philox4x32_10

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK32 = 0xFFFFFFFF

# (counter, key) -> output, docs/lora_linear_spec.md (Random123 known-answer vectors)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@triton.jit
def _philox_rows_kernel(in_ptr, out_ptr, BLOCK: tl.constexpr):
    """Row i of in (int32 bit patterns): c0 c1 c2 c3 k0 k1 -> row i of out: the four Philox words."""
    rows = tl.arange(0, BLOCK)
    c0 = tl.load(in_ptr + rows * 6 + 0).to(tl.uint32, bitcast=True)
    c1 = tl.load(in_ptr + rows * 6 + 1).to(tl.uint32, bitcast=True)
    c2 = tl.load(in_ptr + rows * 6 + 2).to(tl.uint32, bitcast=True)
    c3 = tl.load(in_ptr + rows * 6 + 3).to(tl.uint32, bitcast=True)
    k0 = tl.load(in_ptr + rows * 6 + 4).to(tl.uint32, bitcast=True)
    k1 = tl.load(in_ptr + rows * 6 + 5).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + rows * 4 + 0, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + rows * 4 + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + rows * 4 + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + rows * 4 + 3, w3.to(tl.int32, bitcast=True))


def _as_int32(values) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= (1 << 31) else v for v in values], dtype=torch.int32)


def _triton_philox(rows: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Runs the Triton Philox on each (c0, c1, c2, c3, k0, k1) row; returns uint32 words as Python ints."""
    block = triton.next_power_of_2(len(rows))
    padded = rows + [(0,) * 6] * (block - len(rows))
    inp = _as_int32([v for row in padded for v in row]).to(DEVICE)
    out = torch.empty(block * 4, dtype=torch.int32, device=DEVICE)
    _philox_rows_kernel[(1,)](inp, out, BLOCK=block)
    words = [w & MASK32 for w in out.cpu().tolist()]
    return [tuple(words[4 * i: 4 * i + 4]) for i in range(len(rows))]


def test_philox_known_answers():
    got = _triton_philox([counter + key for counter, key, _ in KNOWN_ANSWERS])
    for (counter, key, expected), words in zip(KNOWN_ANSWERS, got):
        assert words == expected, f"counter {counter} key {key}: {[hex(w) for w in words]}"


def test_philox_matches_reference_on_random_counters():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 1 << 32, (64, 6), generator=gen, dtype=torch.int64)
    got = torch.tensor(_triton_philox([tuple(r) for r in rows.tolist()]), dtype=torch.int64)
    for i in range(rows.shape[0]):
        c0, c1, c2, c3, k0, k1 = rows[i].tolist()
        expected = torch.stack(ref.philox4x32_10(c0, c1, c2, c3, k0, k1))
        assert torch.equal(got[i], expected), f"row {i}: {rows[i].tolist()}"


@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**63 - 1])
@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("M, K", [(37, 100), (19, 45)])  # K % 4 == 0 (4 words per call) and not
def test_mask_matches_reference(M, K, seed, p):
    got = triton_lora.dropout_keep_mask(M, K, seed, p, DEVICE).cpu()
    expected = ref.dropout_keep_mask(M, K, seed, p)
    assert got.dtype == torch.bool and got.shape == (M, K)
    bad = (got != expected).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {M * K} mask bits differ, first at {bad[0].tolist()}"


@pytest.mark.parametrize("K", [100, 45])
def test_mask_indices_past_2_pow_32(K):
    """Rows straddling logical index 2**31 and 2**32 (counter hi word != 0), without allocating them."""
    for start in (2**31 // K - 2, 2**32 // K - 2, 2**34 // K - 2):
        got = triton_lora.dropout_keep_mask(5, K, 99, 0.5, DEVICE, row_offset=start).cpu()
        expected = ref.dropout_keep_mask(5, K, 99, 0.5, row_offset=start)
        assert torch.equal(got, expected), f"rows from {start} (K={K}) differ"


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_mask_drop_fraction(p):
    M, K = 256, 256
    keep = triton_lora.dropout_keep_mask(M, K, 2024, p, DEVICE)
    dropped = 1.0 - keep.float().mean().item()
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert abs(dropped - p) <= 5 * sigma + 1e-12, f"dropped {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"


def test_mask_depends_on_seed_and_is_deterministic():
    a = triton_lora.dropout_keep_mask(16, 64, 1, 0.5, DEVICE)
    assert torch.equal(a, triton_lora.dropout_keep_mask(16, 64, 1, 0.5, DEVICE))
    assert not torch.equal(a, triton_lora.dropout_keep_mask(16, 64, 2, 0.5, DEVICE))
    assert not torch.equal(a, triton_lora.dropout_keep_mask(16, 64, 1 + 2**32, 0.5, DEVICE))
