"""Plain reference GEMMs for the kernel report: C = A·B with nothing fused, at a given tile.

The report compiles one next to each big GEMM of the LoRA kernels, with the same tile (BLOCK_M x BLOCK_N x
BLOCK_K), warps, stages, operand layouts, load mechanism (TMA descriptors or pointers) and scheduling
(persistent or one tile per program). The difference in registers and shared memory between the two is
what the fusion costs.

    _reference_gemm_kernel              one output tile per program, pointer loads (Triton tutorial style)
    _reference_gemm_persistent_kernel   about one program per SM walking tiles in grouped order, TMA loads
                                        and stores through host-side tensor descriptors

B_KMAJOR: B is stored (N, K) (the forward's W, read as Wᵀ) instead of (K, N) (the dgrad's W).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped(tile, n_rows, n_cols, GROUP: tl.constexpr):
    per_group = GROUP * n_cols
    first = (tile // per_group) * GROUP
    rows = tl.minimum(n_rows - first, GROUP)
    return first + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _reference_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_b0, stride_b1,
                           stride_cm, stride_cn, B_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c[tile] = a[rows, :] @ b[:, cols] for the program's tile; b is (N, K) if B_KMAJOR else (K, N)."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    if B_KMAJOR:
        b_ptrs = b_ptr + offs_k[:, None] * stride_b1 + offs_n[None, :] * stride_b0
        b_step = BLOCK_K * stride_b1
    else:
        b_ptrs = b_ptr + offs_k[:, None] * stride_b0 + offs_n[None, :] * stride_b1
        b_step = BLOCK_K * stride_b0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += b_step
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _reference_gemm_persistent_kernel(a_desc, b_desc, c_desc, M, N, K, B_KMAJOR: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                      GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """Persistent TMA GEMM: program p computes tiles p, p + NUM_PROGRAMS, ... in grouped order."""
    n_rows = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_rows * n_cols, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _grouped(tile, n_rows, n_cols, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            if B_KMAJOR:
                b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


@dataclass(frozen=True)
class ReferenceSpec:
    """What a GEMM of the LoRA kernels is compared with: C (M, N) = A (M, K) · B, same tile and options."""
    M: int
    N: int
    K: int
    dtype: torch.dtype
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    b_kmajor: bool
    tma: bool
    persistent: bool
    num_programs: int = 0  # persistent: the grid (about one program per SM)


def reference_launch(spec: ReferenceSpec) -> tuple:
    """(kernel, grid, args, constexprs) of the reference GEMM for ``spec`` on placeholder tensors (never
    read: compile-only; torch.empty does not touch the memory)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = torch.empty((spec.M, spec.K), dtype=spec.dtype)
    b = torch.empty((spec.N, spec.K) if spec.b_kmajor else (spec.K, spec.N), dtype=spec.dtype)
    c = torch.empty((spec.M, spec.N), dtype=spec.dtype)
    meta = {"B_KMAJOR": spec.b_kmajor, "BLOCK_M": spec.block_m, "BLOCK_N": spec.block_n,
            "BLOCK_K": spec.block_k, "GROUP_M": spec.group_m}
    if spec.persistent:
        assert spec.tma, "the persistent reference GEMM loads through TMA"
        b_block = [spec.block_n, spec.block_k] if spec.b_kmajor else [spec.block_k, spec.block_n]
        args = {"a_desc": TensorDescriptor.from_tensor(a, [spec.block_m, spec.block_k]),
                "b_desc": TensorDescriptor.from_tensor(b, b_block),
                "c_desc": TensorDescriptor.from_tensor(c, [spec.block_m, spec.block_n]),
                "M": spec.M, "N": spec.N, "K": spec.K}
        return (_reference_gemm_persistent_kernel, (spec.num_programs,), args,
                {**meta, "NUM_PROGRAMS": spec.num_programs})
    args = {"a_ptr": a, "b_ptr": b, "c_ptr": c, "M": spec.M, "N": spec.N, "K": spec.K,
            "stride_am": a.stride(0), "stride_ak": a.stride(1), "stride_b0": b.stride(0),
            "stride_b1": b.stride(1), "stride_cm": c.stride(0), "stride_cn": c.stride(1)}
    grid = (triton.cdiv(spec.M, spec.block_m) * triton.cdiv(spec.N, spec.block_n),)
    return _reference_gemm_kernel, grid, args, meta
