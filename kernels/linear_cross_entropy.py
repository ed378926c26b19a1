"""Triton row kernel of the fused linear cross-entropy: loss rows and, in place, the logits' gradient.

The caller (``lowcost.ops.linear_cross_entropy``) forms one chunk of logits z (C, V) with a GEMM; this kernel
turns it into per-row losses and overwrites it with dz, so a chunk costs one (C, V) buffer and two passes
over it. One program per row:

    pass 1, over V in BLOCK_V steps:                    online logsumexp (running max m, running sum s),
        zc = c·tanh(z / c) if SOFTCAP else z            Σ_j zc_j for label smoothing
    lse  = m + log(s)
    loss = lse − (1−ε)·zc_y − (ε/V)·Σ_j zc_j            0 if y == ignore_index
    pass 2 (HAS_GRAD), over V again:
        dz = w·(exp(zc − lse) − ε/V − (1−ε)·[j == y])   w = row weight, 0 for an ignored row
        dz *= 1 − (zc/c)²                               if SOFTCAP (d/dz of c·tanh(z/c))
        z[j] = dz                                       rounded to z's dtype, in place

Arithmetic is float32 whatever z's dtype (bf16 logits are upcast on load). tanh is written with exp so the
interpreter and every GPU run the same formula.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_linear_plan import PROGRAMS_PER_SM, Launch, sm_count

Tensor = torch.Tensor
BLOCK_V = 1024
NUM_WARPS = 4
NUM_STAGES = 3  # Triton's default for a JIT launch without num_stages


@triton.jit
def _softcap(z, cap):
    """cap·tanh(z/cap) with tanh(t) = 1 − 2/(exp(2t) + 1) (exact limits ±1 for large |t|)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))


@triton.jit
def _xent_rows_kernel(
    # pointers
    z_ptr, labels_ptr, weight_ptr, loss_ptr,
    # sizes and strides
    V, stride_zm,
    # cross-entropy settings
    ignore_index, smoothing, softcap,
    # meta-parameters
    HAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row ``program_id`` of z (C, V): loss_ptr[row] = its loss; with HAS_GRAD z[row] ← dz (see module doc)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    offs = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    total = s
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + offs < V
        z = tl.load(z_row + v0 + offs, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = _softcap(z, softcap)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        total += tl.sum(tl.where(ok, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.where(valid, label, 0)
    z_y = tl.load(z_row + target).to(tl.float32)
    if SOFTCAP:
        z_y = _softcap(z_y, softcap)
    loss = lse - (1.0 - smoothing) * z_y - smoothing / V * total
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if HAS_GRAD:
        w = tl.where(valid, tl.load(weight_ptr + row), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            ok = cols < V
            z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = _softcap(z, softcap)
            dz = tl.exp(z - lse) - smoothing / V - tl.where(cols == target, 1.0 - smoothing, 0.0)
            dz = dz * w
            if SOFTCAP:
                t = z / softcap
                dz = dz * (1.0 - t * t)
            tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=ok)


def _check(z: Tensor, labels: Tensor, row_weight: Optional[Tensor]) -> None:
    assert z.dim() == 2 and z.stride(1) == 1, f"z must be a row-major 2-D chunk, got strides {z.stride()}"
    assert labels.shape == (z.shape[0],) and labels.dtype == torch.int64, f"labels {labels.dtype} {labels.shape}"
    assert row_weight is None or (row_weight.shape == (z.shape[0],) and row_weight.dtype == torch.float32)
    assert z.dtype in (torch.float32, torch.float16, torch.bfloat16), f"z dtype {z.dtype}"
    tensors = (z, labels) + (() if row_weight is None else (row_weight,))
    assert all(t.device == z.device for t in tensors), "all operands must be on one device"
    assert z.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", (
        f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before import (tensors are on {z.device})")


def min_chunk_rows(device: torch.device) -> int:
    """Rows a logits chunk should have at least on ``device``: one program per row, so PROGRAMS_PER_SM per
    SM fill the GPU (the memory-sized default of the op, 2**23 logits, is 65 rows at vocab 128256: half an
    H100/H200 would idle in this kernel, and the chunk's logits GEMM would have a 65-row M)."""
    return PROGRAMS_PER_SM * sm_count(device)


def plan_xent_rows(z: Tensor, labels: Tensor, row_weight: Optional[Tensor], loss: Tensor, ignore_index: int,
                   label_smoothing: float, softcap: float) -> Launch:
    """The launch of ``_xent_rows_kernel`` over the C rows of z (C, V): one program per row."""
    C, V = z.shape
    args = {"z_ptr": z, "labels_ptr": labels, "weight_ptr": loss if row_weight is None else row_weight,
            "loss_ptr": loss, "V": V, "stride_zm": z.stride(0), "ignore_index": ignore_index,
            "smoothing": float(label_smoothing), "softcap": float(softcap or 1.0)}
    meta = {"HAS_GRAD": row_weight is not None, "SOFTCAP": bool(softcap), "BLOCK_V": BLOCK_V}
    return Launch(_xent_rows_kernel, (C,), args, meta, NUM_WARPS, NUM_STAGES,
                  "xent_rows_grad" if row_weight is not None else "xent_rows")


def softmax_xent_rows(z: Tensor, labels: Tensor, row_weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, softcap: float) -> Tensor:
    """Loss of each row of z (C, V) as float32 (C,); with ``row_weight`` (C,) float32, z ← dz in place."""
    _check(z, labels, row_weight)
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    if z.shape[0] > 0:
        plan_xent_rows(z, labels, row_weight, loss, ignore_index, label_smoothing, softcap).run()
    return loss
