"""GGUF (ggml) block formats, dequantized from the file's bytes as they are.

A GGUF tensor of shape (N, K) in a block type is N rows of K / block elements' blocks, each block a fixed
byte struct; lowcost keeps those bytes unchanged as ``data`` (N, K / block · type_size) uint8 and decodes
rows on demand. Every product below is the float32 operation ggml's reference (and the ``gguf`` package's
numpy ``dequantize``) performs, in the same order, so the result is bit-identical to theirs.

    Q8_0  (32 el., 34 B): d f16 | q int8[32]                    w = q · d
    Q4_0  (32 el., 18 B): d f16 | nibbles[16]                   w = d · (q - 8)       q: low nibbles then high
    Q4_1  (32 el., 20 B): d f16 | m f16 | nibbles[16]           w = d · q + m
    Q4_K (256 el., 144 B): d f16 | dmin f16 | scales 6-bit ×8, mins 6-bit ×8 packed in 12 B | nibbles[128]
                            sub-block j of 32: w = (d · sc_j) · q - (dmin · m_j)
    Q6_K (256 el., 210 B): ql[128] | qh[64] | scales int8[16] | d f16
                            q = (ql nibble | qh 2 bits << 4) - 32; 16 groups of 16: w = (d · sc_g) · q
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml_type: int          # GGMLQuantizationType value in the GGUF header
    block: int              # elements per block
    type_size: int          # bytes per block
    decode: Callable[[Tensor], Tensor]   # (blocks, type_size) uint8 -> (blocks, block) float32


def _f16(raw: Tensor) -> Tensor:
    """(n, 2) little-endian bytes → (n, 1) float32 of their float16 value."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """(n, bytes) → (n, 2 · bytes): per run of ``group`` bytes, their low nibbles, then their high nibbles."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, 1, group)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return ((runs >> shifts) & 15).reshape(n, -1)


def _decode_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _decode_q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _decode_q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).float() + _f16(b[:, 2:4])


def q4_k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of Q4_K/Q5_K blocks from their 12 packed bytes, (n, 8) each.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 are a nibble of bytes 8-11 plus the
    top two bits of bytes 0-3 / 4-7."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mins = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return scales, mins


def _decode_q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = q4_k_scales(b[:, 4:16])
    scale = (_f16(b[:, 0:2]) * sc.float())[:, :, None]
    offset = (_f16(b[:, 2:4]) * mn.float())[:, :, None]
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (scale * q - offset).reshape(n, 256)


def _decode_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (scale[:, :, None] * q).reshape(n, 256)


BLOCK_TYPES = {t.name: t for t in (
    BlockType("q8_0", 8, 32, 34, _decode_q8_0),
    BlockType("q4_0", 2, 32, 18, _decode_q4_0),
    BlockType("q4_1", 3, 32, 20, _decode_q4_1),
    BlockType("q4_k", 12, 256, 144, _decode_q4_k),
    BlockType("q6_k", 14, 256, 210, _decode_q6_k),
)}


def row_bytes(name: str, K: int) -> int:
    kind = BLOCK_TYPES[name]
    if K % kind.block:
        raise ValueError(f"a {name.upper()} row of K={K} elements is not a whole number of {kind.block}-element "
                         "blocks")
    return K // kind.block * kind.type_size


def dequantize_blocks(name: str, tensors: dict[str, Tensor], K: int, block_size: int,
                      rows: Rows = slice(None)) -> Tensor:
    """float32 (R, K) of the selected rows of a block-format tensor (``tensors["data"]`` (N, row bytes))."""
    kind = BLOCK_TYPES[name]
    data = tensors["data"][rows]
    R = data.shape[0]
    return kind.decode(data.reshape(-1, kind.type_size)).reshape(R, K)
