"""``QuantizedWeight``: a frozen (N, K) weight held as packed codes plus scales, dequantized on demand.

It is an ``nn.Module`` whose buffers are the stored tensors (so ``.to(device)``, ``state_dict`` and
``deepcopy`` work), plus the format name, the logical shape, the block size and the compute dtype that
``dequantize()`` returns. Formats (``FORMATS``):

    scheme   buffers                                             bytes per row of K
    nf4      codes (N, Kp/2) u8, absmax (N, Kp/B) f32             Kp/2 + 4·Kp/B
    nf4 dq   codes, absmax_q (N, Kp/B) u8, absmax_scale f32, absmax_offset f32     Kp/2 + Kp/B (+ 4 per 256 blocks)
    int8     qweight (N, K) i8, scale (N,) f32                    K + 4
    q8_0, q4_0, q4_1, q4_k, q6_k   data (N, row bytes) u8: the GGUF file's blocks as they are

Casting the module (``model.to(torch.bfloat16)``) never touches the stored bytes: it changes the compute
dtype only (``_apply`` keeps every stored tensor's dtype and follows only the device).

Row sharding (FSDP2, ``lowcost.distributed.shard_model``): ``make_row_shardable()`` turns every stored
tensor whose dim 0 is the weight's N rows (codes, absmax, absmax_q, qweight, scale, data) from a buffer into
a frozen ``nn.Parameter`` under the same name, so that ``fully_shard`` shards it along rows like any frozen
weight: each rank keeps ceil(N / W) rows of it, the rows are all-gathered with the block's other parameters
and freed after. A row is whole blocks in every format, so any row split is a valid split. Floating tensors
are stored bit-cast to the integer dtype of their width (float32 absmax/scale as int32): FSDP2's
``MixedPrecisionPolicy(param_dtype=...)`` casts floating parameters only, so no stored byte is ever cast;
``packed`` bit-casts them back. The double-quantization constants (``absmax_scale``, one float per 256
blocks, and ``absmax_offset``, 0-D) group blocks across rows; they stay buffers, whole on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from lowcost.reference.quant.gguf_blocks import BLOCK_TYPES, dequantize_blocks
from lowcost.reference.quant.int8 import dequantize_int8
from lowcost.reference.quant.nf4 import dequantize_nf4, padded_width

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


ROW_TENSORS = ("codes", "absmax", "absmax_q", "qweight", "scale", "data")   # dim 0 is the weight's N rows
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class QuantFormat:
    name: str
    tensor_names: tuple[str, ...]      # buffers in the order the op passes them
    dequantize: Callable[..., Tensor]   # (tensors, K, block_size, rows, workspace=None) -> float32 (R, K)
    description: str


def _gguf_format(name: str) -> QuantFormat:
    kind = BLOCK_TYPES[name]
    return QuantFormat(name, ("data",), lambda t, K, B, rows, workspace=None: dequantize_blocks(name, t, K, B, rows,
                                                                                              workspace),
                       f"GGUF {name.upper()} blocks ({kind.block} elements in {kind.type_size} bytes)")


FORMATS: dict[str, QuantFormat] = {
    "nf4": QuantFormat("nf4", ("codes", "absmax"), dequantize_nf4, "NF4, float32 block absmax"),
    "nf4-dq": QuantFormat("nf4-dq", ("codes", "absmax_q", "absmax_scale", "absmax_offset"), dequantize_nf4,
                          "NF4, double-quantized (8-bit) block absmax"),
    "int8": QuantFormat("int8", ("qweight", "scale"), dequantize_int8, "int8, float32 absmax scale per row"),
    **{name: _gguf_format(name) for name in BLOCK_TYPES},
}


def quant_format(scheme: str) -> QuantFormat:
    if scheme not in FORMATS:
        raise ValueError(f"unknown quantized format {scheme!r}; lowcost has {sorted(FORMATS)}")
    return FORMATS[scheme]


def workspace_elements(scheme: str, n_rows: int, K: int, block_size: int) -> int:
    """float32 elements a decode of ``n_rows`` rows writes into its workspace (NF4 decodes its padded rows)."""
    return n_rows * (padded_width(K, block_size) if scheme.startswith("nf4") else K)


def dequantize_packed(scheme: str, tensors: Sequence[Tensor], K: int, block_size: int, rows: Rows = slice(None),
                      dtype: torch.dtype = torch.float32, workspace: Optional[Tensor] = None) -> Tensor:
    """(R, K) in ``dtype`` of the selected rows, from the format's tensors in ``tensor_names`` order.

    ``workspace``: a 1-D float32 tensor of at least ``workspace_elements(...)`` elements that the float32 decode
    is written into (reused across calls by the op's row loop, so no new weight-sized buffer per block of
    rows); the result is then a view of it, valid until the next decode into the same workspace."""
    fmt = quant_format(scheme)
    out = fmt.dequantize(dict(zip(fmt.tensor_names, tensors)), K, block_size, rows, workspace)
    return out if out.dtype == dtype else out.to(dtype)


class QuantizedWeight(nn.Module):
    """A frozen weight (N, K) in a quantized format; ``dequantize()`` → (N, K) in the compute dtype."""

    def __init__(self, scheme: str, shape: Sequence[int], tensors: dict[str, Tensor], block_size: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        fmt = quant_format(scheme)
        missing = [n for n in fmt.tensor_names if n not in tensors]
        if missing:
            raise ValueError(f"a {scheme} weight needs tensors {list(fmt.tensor_names)}, missing {missing}")
        self.scheme, self.block_size, self.dtype = scheme, int(block_size), dtype
        self.shape = torch.Size((int(shape[0]), int(shape[1])))
        self.bitcast: dict[str, torch.dtype] = {}   # stored name -> dtype ``packed`` views it as (row sharding)
        for name in fmt.tensor_names:
            self.register_buffer(name, tensors[name])

    def _stored(self) -> list[Tensor]:
        """The stored tensors as held (buffers, or row-shardable Parameters, possibly FSDP2 DTensor shards)."""
        return [getattr(self, n) for n in quant_format(self.scheme).tensor_names]

    @property
    def stored(self) -> list[Tensor]:
        """The stored tensors as held: stable objects with their version counters, for identity checks (``packed``
        gives fresh bit-cast views of them once the weight is row-shardable)."""
        return self._stored()

    @property
    def packed(self) -> list[Tensor]:
        """The format's tensors (``tensor_names`` order) in their own dtypes, whole. RuntimeError while FSDP2
        holds them sharded (outside the owning block's forward/backward: ``unshard()`` the block first)."""
        out = []
        for name, t in zip(quant_format(self.scheme).tensor_names, self._stored()):
            if _is_dtensor(t):
                raise RuntimeError(f"the {self.scheme} weight's {name!r} is sharded by FSDP2 (rows "
                                   f"{tuple(t.to_local().shape)} of {tuple(t.shape)} on this rank): its packed "
                                   "tensors exist whole only inside the block's forward/backward or after "
                                   "unshard()")
            out.append(t.view(self.bitcast[name]) if name in self.bitcast else t)
        return out

    @property
    def device(self) -> torch.device:
        return self._stored()[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of the whole stored tensors (every row, on one process or summed over the shards)."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    @property
    def resident_nbytes(self) -> int:
        """Bytes this process holds: ``nbytes`` unsharded; under FSDP2 the storage of this rank's (padded)
        row shards plus the whole buffers."""
        return sum(_local_storage_bytes(t) for t in self._stored())

    def make_row_shardable(self) -> "QuantizedWeight":
        """Turns the row-indexed stored tensors into frozen Parameters (floating ones bit-cast to the integer
        dtype of their width) so that FSDP2 shards them by rows; values and ``packed`` are unchanged.
        Idempotent; returns self."""
        for name in quant_format(self.scheme).tensor_names:
            if name not in ROW_TENSORS or name not in self._buffers:
                continue
            t = self._buffers.pop(name)
            if t.is_floating_point():
                self.bitcast[name] = t.dtype
                t = t.view(_SAME_WIDTH_INT[t.element_size()])
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        return self

    def dequantize(self, dtype: Optional[torch.dtype] = None, rows: Rows = slice(None)) -> Tensor:
        """The dense weight (or the rows selected by a slice / LongTensor), in ``dtype`` (default: compute)."""
        return dequantize_packed(self.scheme, self.packed, self.shape[1], self.block_size, rows,
                                 dtype or self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Entries keep their own dtypes whether or not the tensors are held bit-cast for row sharding (so a
        state dict moves between sharded and unsharded models without a value conversion)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, dtype in self.bitcast.items():
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].detach().view(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Reads entries in their own dtypes into tensors held bit-cast (the reverse of ``_save_to_state_dict``)."""
        for name, dtype in self.bitcast.items():
            value = state_dict.get(prefix + name)
            if value is not None and value.dtype == dtype:
                state_dict[prefix + name] = value.view(self._parameters[name].dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        """Devices follow ``fn``; stored dtypes never change: a floating cast sets the compute dtype instead."""
        cast = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if cast.is_floating_point():
            self.dtype = cast.dtype
        for name in quant_format(self.scheme).tensor_names:
            old = getattr(self, name)
            new = fn(old)
            if new.dtype != old.dtype:
                new = old.to(new.device)
            if name in self._parameters:
                if new is not old:
                    self._parameters[name] = nn.Parameter(new, requires_grad=False)
            else:
                self._buffers[name] = new
        return self

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return f"{self.scheme}, shape={tuple(self.shape)}{block}, dtype={self.dtype}, bytes={self.nbytes}"


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local_storage_bytes(t: Tensor) -> int:
    """Bytes of the storage behind this process's part of ``t`` (an FSDP2 shard's storage holds its padding)."""
    if not _is_dtensor(t):
        return t.numel() * t.element_size()
    return t.to_local().untyped_storage().nbytes()
