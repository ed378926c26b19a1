"""GGUF (ggml) block formats, dequantized from the file's bytes as they are.

A GGUF tensor of shape (N, K) in a block type is N rows of K / block elements' blocks, each block a fixed
byte struct; lowcost keeps those bytes unchanged as ``data`` (N, K / block · type_size) uint8 and decodes
rows on demand. Every product below is the float32 operation ggml's reference (and the ``gguf`` package's
numpy ``dequantize``) performs, in the same order, so the result is bit-identical to theirs. Each decoder
writes into a float32 output it is given (a workspace the caller may reuse): the codes are split eight at a
time as int64 words (per byte, so independent of byte order), converted to float32 once, then scaled in place
(only integer-exact steps, such as q - 8, are reordered).

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
from typing import Callable, Optional, Union

import torch

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml_type: int          # GGMLQuantizationType value in the GGUF header
    block: int              # elements per block
    type_size: int          # bytes per block
    decode: Callable[[Tensor, Tensor], Tensor]   # ((blocks, type_size) uint8, out (blocks, block) float32) -> out


_NIBBLE_MASK = 0x0F0F0F0F0F0F0F0F     # the low nibble of each byte of an int64 word
_FIELD_WORDS = {2: torch.int16, 4: torch.int32}


def _f16_fields(b: Tensor, start: int, count: int) -> Tensor:
    """(n, bytes) → (n, count) float32: ``count`` (1 or 2) consecutive little-endian float16 fields from byte
    ``start``, read as one 16/32-bit word per block where the layout allows (one strided 1-D copy)."""
    width, n = 2 * count, b.shape[0]
    if start % width == 0 and b.shape[1] % width == 0 and b.storage_offset() % width == 0 and b.stride(1) == 1:
        words = b.view(_FIELD_WORDS[width])[:, start // width].clone(memory_format=torch.contiguous_format)
        return words.view(torch.float16).view(n, count).float()
    return b[:, start:start + width].clone(memory_format=torch.contiguous_format).view(torch.float16).float()


def _split_nibbles(qs: Tensor, group: int) -> Tensor:
    """(n, bytes) uint8 → (n, 2 · bytes) uint8 codes: per run of ``group`` bytes (a multiple of 8), their low
    nibbles, then their high nibbles. The bytes are copied once, then masked and shifted as int64 words (eight
    codes per operation) and interleaved by one ``stack``."""
    n, width = qs.shape
    words = qs.clone(memory_format=torch.contiguous_format).view(torch.int64).view(n, width // group, group // 8)
    low = words & _NIBBLE_MASK
    high = (words >> 4).bitwise_and_(_NIBBLE_MASK)
    return torch.stack((low, high), dim=2).view(torch.uint8).view(n, 2 * width)


def _decode_q8_0(b: Tensor, out: Tensor) -> Tensor:
    return out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16_fields(b, 0, 1))


def _decode_q4_0(b: Tensor, out: Tensor) -> Tensor:
    return out.copy_(_split_nibbles(b[:, 2:], 16)).sub_(8.0).mul_(_f16_fields(b, 0, 1))


def _decode_q4_1(b: Tensor, out: Tensor) -> Tensor:
    dm = _f16_fields(b, 0, 2)
    return out.copy_(_split_nibbles(b[:, 4:], 16)).mul_(dm[:, :1]).add_(dm[:, 1:])


def q4_k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of Q4_K/Q5_K blocks from their 12 packed bytes, (n, 8) each.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 are a nibble of bytes 8-11 plus the
    top two bits of bytes 0-3 / 4-7."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mins = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return scales, mins


def _decode_q4_k(b: Tensor, out: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = q4_k_scales(b[:, 4:16])
    dm = _f16_fields(b, 0, 2)
    scale = (dm[:, :1] * sc.float())[:, :, None]
    offset = (dm[:, 1:] * mn.float())[:, :, None]
    out.copy_(_split_nibbles(b[:, 16:], 32))
    out.view(n, 8, 32).mul_(scale).sub_(offset)
    return out


def _q6_k_codes(b: Tensor) -> Tensor:
    """(n, 256) uint8 6-bit codes of Q6_K blocks: the ql nibble, plus qh's 2-bit field at bits 4-5."""
    n = b.shape[0]
    codes = _split_nibbles(b[:, :128], 64).view(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 32)
    high = torch.empty((n, 2, 4, 32), dtype=torch.uint8, device=b.device)
    for j in range(4):
        torch.bitwise_and(qh >> (2 * j), 3, out=high[:, :, j])
    return codes.bitwise_or_(high.bitwise_left_shift_(4)).view(n, 256)


def _decode_q6_k(b: Tensor, out: Tensor) -> Tensor:
    n = b.shape[0]
    scale = _f16_fields(b, 208, 1) * b[:, 192:208].view(torch.int8).float()
    out.copy_(_q6_k_codes(b)).sub_(32.0)
    out.view(n, 16, 16).mul_(scale[:, :, None])
    return out


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
                      rows: Rows = slice(None), workspace: Optional[Tensor] = None) -> Tensor:
    """float32 (R, K) of the selected rows of a block-format tensor (``tensors["data"]`` (N, row bytes)),
    decoded into the first R · K elements of ``workspace`` (1-D float32) when given, else into a new tensor."""
    kind = BLOCK_TYPES[name]
    data = tensors["data"][rows]
    R = data.shape[0]
    out = torch.empty((R, K), dtype=torch.float32, device=data.device) if workspace is None \
        else workspace[:R * K].view(R, K)
    kind.decode(data.reshape(-1, kind.type_size), out.view(-1, kind.block))
    return out
