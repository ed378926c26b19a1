"""Quantized weights for the tests: each format built from a seeded random (N, K) weight.

GGUF Q8_0 / Q4_0 / Q4_1 come from the ``gguf`` package's own quantizer; it has none for Q4_K / Q6_K, so those
are random block bytes whose float16 scale fields are set to small finite values (every other byte random:
every code, 6-bit scale and min pattern occurs).
"""
from __future__ import annotations

import numpy as np
import torch

from lowcost.reference.quant import BLOCK_TYPES, QuantizedWeight, quantize_int8, quantize_nf4

SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}


def gguf_type(name: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType(BLOCK_TYPES[name].ggml_type)


def random_blocks(name: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """(N, row bytes) uint8 of random blocks with finite, small float16 scales."""
    kind = BLOCK_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(N * K // kind.block, kind.type_size), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        scales = (rng.random(raw.shape[0]) * 0.02 + 1e-3).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(N, -1)


def gguf_bytes(name: str, weight: torch.Tensor, seed: int = 0) -> np.ndarray:
    """The GGUF bytes of ``weight`` (N, K): the gguf package's quantizer where it has one, else random blocks."""
    from gguf.quants import quantize
    if name in ("q4_k", "q6_k"):
        return random_blocks(name, *weight.shape, seed=seed)
    return quantize(weight.double().numpy().astype(np.float32), gguf_type(name))


def make_quantized(scheme: str, N: int, K: int, seed: int = 0, block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64) * K ** -0.5
    if scheme in ("nf4", "nf4-dq"):
        return QuantizedWeight(scheme, (N, K), quantize_nf4(weight, block_size, scheme == "nf4-dq"), block_size, dtype)
    if scheme == "int8":
        return QuantizedWeight("int8", (N, K), quantize_int8(weight), 0, dtype)
    data = torch.from_numpy(np.ascontiguousarray(gguf_bytes(scheme, weight, seed)))
    return QuantizedWeight(scheme, (N, K), {"data": data}, BLOCK_TYPES[scheme].block, dtype)


def k_for(scheme: str, wanted: int) -> int:
    """A K near ``wanted`` that the format takes (GGUF rows are whole blocks; NF4 pads any K)."""
    if scheme in BLOCK_TYPES:
        block = BLOCK_TYPES[scheme].block
        return max(block, wanted // block * block)
    return wanted
