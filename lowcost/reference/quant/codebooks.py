"""The fixed code books of the quantized formats.

NF4 (QLoRA, Dettmers et al. 2023, appendix E): the 16 values of the 4-bit NormalFloat type, quantiles of a
standard normal scaled to [-1, 1] with an exact zero; a weight w in a block with absolute maximum a is stored
as the index of the code value nearest to w / a.

Dynamic map (8-bit "dynamic tree" quantization, Dettmers et al. 2022): the signed 8-bit code bitsandbytes
uses to double-quantize NF4's block absmax. With E = 7 exponent bits, level i = 0..E-1 holds the 2^i
midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i - E + 1), each with both signs; with 0 and 1 that is
2·127 + 2 = 256 values, sorted.
"""
from __future__ import annotations

import functools

import torch

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


def nf4_code(device=None) -> torch.Tensor:
    """The NF4 code book, (16,) float32, ascending."""
    code = _nf4_code_cpu()
    return code if device is None or torch.device(device).type == "cpu" else code.to(device)


@functools.lru_cache(maxsize=None)
def _nf4_byte_table_cpu() -> torch.Tensor:
    code = _nf4_code_cpu()
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1).contiguous()


def nf4_byte_table(device=None) -> torch.Tensor:
    """(256, 2) float32: row b is (NF4[b >> 4], NF4[b & 15]), the two values one packed byte holds (the even
    element in the high nibble), so a whole byte decodes with one lookup."""
    table = _nf4_byte_table_cpu()
    return table if device is None or torch.device(device).type == "cpu" else table.to(device)


def nf4_bounds(device=None) -> torch.Tensor:
    """(15,) float32 decision bounds between neighbouring NF4 values (their midpoints, in float32)."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def dynamic_map(exponent_bits: int = 7) -> torch.Tensor:
    """The signed 8-bit dynamic code, (256,) float32 ascending (see the module docstring). Formed in float32
    steps (linspace, midpoint, power-of-ten scaling), so the values are bitsandbytes' to the bit."""
    values = [0.0, 1.0]
    for level in range(exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2 ** level + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        power = 10 ** (level - exponent_bits + 1)
        values += (power * mids).tolist() + (-power * mids).tolist()
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)
