"""The known answers of the emulated C++ test's Q4_K / Q6_K decoder come from the ``gguf`` package.

csrc/tests/test_dequant_gemm_emulated.cpp (test_kquant_known_answers) builds one super-block of fixed bytes per
k-quant (byte i = (73 i + 41) mod 256, then the float16 fields), checks its host decoder against a table of
(element, value) pairs, and checks the CUDA kernel against that decoder. This test rebuilds the same bytes,
decodes them with ``gguf.quants.dequantize`` (the file format's Python reference) and requires the table to
hold exactly gguf's float32 values, so the C++ test's packing and decoding agree with the GGUF byte layout.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "tests" / "test_dequant_gemm_emulated.cpp"
TABLES = {"q4_k": ("kQ4KKnown", 144), "q6_k": ("kQ6KKnown", 210)}


def _source() -> str:
    return SOURCE.read_text()


def _f16_fields(source: str) -> dict[str, list[tuple[int, int]]]:
    """(byte offset, float16 bits) of each block's float16 fields, from the C++ constants."""
    bits = {name: int(value, 16) for name, value in re.findall(r"(kQ\dK\w*) = (0x[0-9A-Fa-f]+)", source)}
    assert set(bits) == {"kQ4KD", "kQ4KDmin", "kQ6KD"}, bits
    return {"q4_k": [(0, bits["kQ4KD"]), (2, bits["kQ4KDmin"])], "q6_k": [(208, bits["kQ6KD"])]}


def _known(source: str, table: str) -> list[tuple[int, float]]:
    body = re.search(table + r"\[\] = \{(.*?)\};", source, re.S)
    assert body is not None, f"{table} not found in {SOURCE}"
    pairs = re.findall(r"\{(\d+), (-?0x[0-9a-f.]+p[+-]\d+)f\}", body.group(1))
    return [(int(index), float.fromhex(value)) for index, value in pairs]


def _block(type_size: int, fields: list[tuple[int, int]]) -> np.ndarray:
    block = np.array([(73 * i + 41) % 256 for i in range(type_size)], dtype=np.uint8)
    for offset, bits in fields:
        block[offset:offset + 2] = (bits & 0xFF, bits >> 8)
    return block


@pytest.mark.parametrize("scheme", sorted(TABLES))
def test_known_answers_are_gguf_values(scheme):
    quants = pytest.importorskip("gguf.quants", reason="the gguf package is the reference the table comes from")
    from gguf import GGMLQuantizationType
    source = _source()
    table, type_size = TABLES[scheme]
    known = _known(source, table)
    assert len(known) == 16, f"{table}: expected 16 entries, parsed {len(known)}"
    kind = GGMLQuantizationType.Q4_K if scheme == "q4_k" else GGMLQuantizationType.Q6_K
    values = quants.dequantize(_block(type_size, _f16_fields(source)[scheme])[None, :], kind)
    values = values.reshape(-1).astype(np.float32)
    assert values.shape == (256,)
    for index, value in known:
        assert float(values[index]) == value, f"{scheme} element {index}: table {value!r}, gguf {values[index]!r}"
    # The entries cover every Q4_K sub-block twice / every Q6_K scale group once.
    per_group, groups = (2, 8) if scheme == "q4_k" else (1, 16)
    counts = np.bincount([index // (256 // groups) for index, _ in known], minlength=groups)
    assert counts.tolist() == [per_group] * groups
