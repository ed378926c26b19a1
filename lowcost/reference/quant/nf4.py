"""NF4 (QLoRA's 4-bit NormalFloat): block absmax quantization, optional double quantization of the absmax.

A weight W (N, K) is cut, row by row, into blocks of ``block_size`` consecutive elements; a K that the block
size does not divide is **padded** with zeros to Kp = ceil(K / block) · block (the padding is stored, never
read back: dequantization returns exactly K columns). Per block b with absolute maximum a_b:

    index  = the NF4 code value nearest to clamp(w · (1 / a_b), -1, 1)   (ties to the lower value)
    w'     = NF4[index] · a_b                                             (float32)

Two 4-bit indices share one byte, the even element in the high nibble: codes (N, Kp / 2) uint8. The absmax
(N, Kp / block) is float32, or, with double quantization (QLoRA §3), 8-bit: with c = mean(absmax) and the
flattened absmax cut into groups of 256, each group g with absolute maximum m_g,

    q8 = the dynamic-map value nearest to (a - c) / m_g,   a' = DYNAMIC[q8] · m_g + c   (float32)

This is bitsandbytes' ``quantize_4bit(quant_type="nf4", compress_statistics=...)`` layout when the block size
divides K (its blocks then never cross a row): the codes, the float32 absmax and the dequantized values are
equal to its. The 8-bit absmax of double quantization is the exact nearest code value; bitsandbytes' CPU
search lands one value off for about 1 in 1,000 absmax (always a farther value: tests/quant checks both).

Stored tensors (``QuantizedWeight`` buffers): ``codes``, and ``absmax`` or (``absmax_q``, ``absmax_scale``
(groups,), ``absmax_offset`` ()) — the dynamic code itself is a constant (``codebooks.dynamic_map``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from lowcost.reference.quant.codebooks import dynamic_map, nf4_bounds, nf4_byte_table

Tensor = torch.Tensor
Rows = Union[slice, Tensor]
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DOUBLE_QUANT_GROUP = 256
QUANTIZE_CHUNK_ELEMENTS = 1 << 20


def padded_width(K: int, block_size: int) -> int:
    return -(-K // block_size) * block_size


def _blocks(weight: Tensor, block_size: int) -> Tensor:
    """(N, K) → (N · Kp / block, block) float32, zero-padded on the right of each row."""
    N, K = weight.shape
    pad = padded_width(K, block_size) - K
    w = weight.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(-1, block_size)


def nearest_index(x: Tensor, code: Tensor) -> Tensor:
    """uint8 index of the value of the ascending ``code`` nearest to each x (ties to the lower value)."""
    return torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_absmax_blockwise(values: Tensor, group: int = DOUBLE_QUANT_GROUP) -> tuple[Tensor, Tensor]:
    """8-bit dynamic-map quantization of a flat float32 tensor in groups of ``group``: (q uint8, scale)."""
    n = values.numel()
    groups = -(-n // group)
    padded = torch.nn.functional.pad(values, (0, groups * group - n)).reshape(groups, group)
    scale = padded.abs().amax(dim=1)
    normed = padded / scale.clamp(min=1e-38)[:, None]
    return nearest_index(normed.reshape(-1)[:n], dynamic_map().to(values.device)), scale


def _row_slices(N: int, K: int, limit: int = QUANTIZE_CHUNK_ELEMENTS):
    rows = max(1, limit // max(K, 1))
    return [slice(start, min(start + rows, N)) for start in range(0, N, rows)]


def _quantize_rows(weight: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(codes (R, Kp/2) uint8, absmax (R, Kp/B) float32) of a few rows."""
    R = weight.shape[0]
    blocks = _blocks(weight, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    index = torch.bucketize(scaled.reshape(-1), nf4_bounds(weight.device)).to(torch.uint8)
    return ((index[0::2] << 4) | index[1::2]).reshape(R, -1), absmax.reshape(R, -1)


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = False) -> dict[str, Tensor]:
    """The NF4 tensors of ``weight`` (N, K) (see the module docstring); inputs of any float dtype. Rows are
    quantized a chunk at a time, so the temporaries stay bounded by ``QUANTIZE_CHUNK_ELEMENTS``."""
    N, K = weight.shape
    Kp = padded_width(K, block_size)
    codes = torch.empty((N, Kp // 2), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty((N, Kp // block_size), dtype=torch.float32, device=weight.device)
    for rows in _row_slices(N, Kp):
        codes[rows], absmax[rows] = _quantize_rows(weight[rows], block_size)
    if not double_quant:
        return {"codes": codes, "absmax": absmax}
    offset = absmax.mean()
    q, scale = quantize_absmax_blockwise(absmax.reshape(-1) - offset)
    return {"codes": codes, "absmax_q": q.reshape(absmax.shape), "absmax_scale": scale, "absmax_offset": offset}


def _row_index(rows: Rows, N: int, device) -> Tensor:
    if isinstance(rows, slice):
        return torch.arange(N, device=device)[rows]
    return rows


def absmax_rows(tensors: dict[str, Tensor], N: int, rows: Rows) -> Tensor:
    """The float32 absmax (R, blocks) of the selected rows (dequantizing the 8-bit ones when double)."""
    if "absmax" in tensors:
        return tensors["absmax"][rows].float()
    q = tensors["absmax_q"][rows]
    nb = q.shape[1]
    flat = _row_index(rows, N, q.device)[:, None] * nb + torch.arange(nb, device=q.device)
    scale = tensors["absmax_scale"][flat // DOUBLE_QUANT_GROUP]
    code = dynamic_map().to(q.device)
    return code[q.long()] * scale + tensors["absmax_offset"]


def dequantize_nf4(tensors: dict[str, Tensor], K: int, block_size: int, rows: Rows = slice(None),
                   workspace: Optional[Tensor] = None) -> Tensor:
    """float32 (R, K) of the selected rows (a slice or a LongTensor of row indices): each packed byte is looked
    up whole in ``nf4_byte_table`` (two values), then each block is scaled by its absmax in place. The padded
    (R, Kp) result fills the first R · Kp elements of ``workspace`` when given; the return is its first K
    columns (a strided view when K < Kp)."""
    codes = tensors["codes"][rows]
    R, half = codes.shape
    out = torch.empty((R, 2 * half), dtype=torch.float32, device=codes.device) if workspace is None \
        else workspace[:R * 2 * half].view(R, 2 * half)
    torch.index_select(nf4_byte_table(codes.device), 0, codes.reshape(-1).int(), out=out.view(-1, 2))
    absmax = absmax_rows(tensors, tensors["codes"].shape[0], rows)
    out.view(R, 2 * half // block_size, block_size).mul_(absmax[:, :, None])
    return out[:, :K]
