"""LoRA linear on a quantized frozen weight, Triton: the two GEMMs dequantize W's tile inside their loop.

    qlora_linear_fwd(x, packed, scheme, N, B, A, Bl, bias, s, p, seed)   -> y (M, N), u (M, r) float32
    qlora_linear_bwd(g, x, packed, scheme, B, A, Bl, u, s, p, seed, needs, norm=None) -> dx, dA, dB, dbias
    quantized_linear_fwd(x, packed, scheme, N, B, bias)                 -> y = x Wᵀ + bias
    quantized_linear_dgrad(g, packed, scheme, K, B)                     -> dx = g W

Everything but the GEMMs is the dense op's (lora_linear.py): the u-pass and its reduction (s·u in x's dtype),
the g-pass with its reductions, the x-pass (with ``norm``, x is an RMSNorm's input and the x-pass rebuilds the
op's input in its loads, as for the dense op: kernels/norm_tile.py). The GEMMs are the dense ones with W's loads
replaced:

_qlora_fwd_y_kernel (persistent, as _lora_fwd_y_kernel):
    for k0 in range(0, K, BLOCK_K):
        wt = dequant_tile(W, cols of this tile, k0 : k0+BLOCK_K)     (BLOCK_N, BLOCK_K) float32 from the bytes
        acc += x[rows, k-block] @ round(wt)ᵀ                        W rounded to x's dtype, as the reference does
    acc += su[rows, :] @ B[cols, :]ᵀ  (r more K-steps);  y = acc + bias

_qlora_bwd_dx_kernel (persistent, as _lora_bwd_dx_kernel; the transposed access):
    for n0 in range(0, N, BLOCK_K):
        wt = dequant_tile(W, n0 : n0+BLOCK_K, cols of this tile)     (BLOCK_K, BLOCK_N): W read along its rows
        acc += g[rows, n-block] @ round(wt)
    acc += du @ A (when p = 0);  dx = acc                           (p > 0: the x-pass adds D ⊙ (du A))

Formats: kernels/qlora_dequant.py (nf4, nf4-dq, int8, q8_0, q4_0, q4_1, q4_k, q6_k). Pointer loads (no TMA: the packed
bytes are not a dense tile). Saved for backward: the op layer keeps x, u, the seed and the packed tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_linear import _check_devices, _check_norm, _empty_batch_grads, _plan_g_pass, _plan_x_pass
from .lora_linear_plan import (RANK_STEP, BlockConfig, Launch, _persistent_grid, dot_meta, fwd_u_splits,
                               lowrank_buffer, lowrank_operand, plan_fwd_u, plan_reduce, sm_count)
from .qlora_dequant import FORMAT_IDS, dequant_tile
from .tiles import dot_operand, grouped_tile, load_2d, round_to, store_2d

Tensor = torch.Tensor


@triton.jit
def _qlora_fwd_y_kernel(
    # tensors: x, the weight's stored tensors q0..q4, su = s·u, B, bias, y
    x_ptr, q0, q1, q2, q3, q4, su_ptr, b_ptr, bias_ptr, y_ptr,
    # sizes (NB: quantization blocks per row of W)
    M, N, K, R, NB, num_programs,
    # strides
    stride_xm, stride_xk, stride_q0, stride_q1, stride_sum, stride_sur, stride_bn, stride_br, stride_ym, stride_yn,
    # the double-quantized absmax offset
    offset,
    # meta-parameters
    FMT: tl.constexpr, QBLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = x Wᵀ + su Bᵀ + bias with W (N, K) dequantized tile by tile; R = 0 gives the frozen layer."""
    n_rows = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_rows * n_cols, num_programs, flatten=True):
        pid_m, pid_n = grouped_tile(tile, n_rows, n_cols, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xt = load_2d(x_ptr, off_m, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, False)
            wt = dequant_tile(q0, q1, q2, q3, q4, offs_n, k0 + tl.arange(0, BLOCK_K), N, K, NB, stride_q0,
                              stride_q1, offset, FMT, QBLOCK)
            acc = tl.dot(dot_operand(xt, DOT_DTYPE, UPCAST), dot_operand(wt, DOT_DTYPE, UPCAST).T, acc,
                         input_precision=DOT_PRECISION)
        for r0 in range(0, R, RANK_STEP):
            ut = load_2d(su_ptr, off_m, r0, M, R, stride_sum, stride_sur, BLOCK_M, RANK_STEP, False)
            bt = load_2d(b_ptr, pid_n * BLOCK_N, r0, N, R, stride_bn, stride_br, BLOCK_N, RANK_STEP, False)
            acc = tl.dot(dot_operand(ut, DOT_DTYPE, UPCAST), dot_operand(bt, DOT_DTYPE, UPCAST).T, acc,
                         input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        store_2d(y_ptr, round_to(acc, DOT_DTYPE, UPCAST), off_m, pid_n * BLOCK_N, M, N, stride_ym, stride_yn,
                 BLOCK_M, BLOCK_N, False)


@triton.jit
def _qlora_bwd_dx_kernel(
    # tensors: g, the weight's stored tensors, du, A, dx
    g_ptr, q0, q1, q2, q3, q4, du_ptr, a_ptr, dx_ptr,
    # sizes
    M, N, K, R, NB, num_programs,
    # strides
    stride_gm, stride_gn, stride_q0, stride_q1, stride_dum, stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
    # the double-quantized absmax offset
    offset,
    # meta-parameters
    FMT: tl.constexpr, QBLOCK: tl.constexpr, LOWRANK: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr = False,
):
    """dx = g W (+ du A if LOWRANK): the output (M, K) tiled BLOCK_M x BLOCK_N, the reduction over N by
    BLOCK_K, each (BLOCK_K, BLOCK_N) tile of W dequantized in the loop. ACCUMULATE: dx += g W (+ du A), dx's
    value added in fp32 to the finished accumulator before the one store (one rounding to dx's dtype per
    launch), for the grouped op's dx = Σ_i g_i W_i (kernels/qlora_grouped_linear.py). Added after the loops,
    not as the accumulator's start value: starting from it, ptxas (sm_90a, Triton 3.6.0) spilled the fp32
    tiles 10x more (64x64x32: 11 KB instead of 0.8 KB); the 16-bit tiles compile either way without spills."""
    n_rows = tl.cdiv(M, BLOCK_M)
    n_cols = tl.cdiv(K, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_rows * n_cols, num_programs, flatten=True):
        pid_m, pid_k = grouped_tile(tile, n_rows, n_cols, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            gt = load_2d(g_ptr, off_m, n0, M, N, stride_gm, stride_gn, BLOCK_M, BLOCK_K, False)
            wt = dequant_tile(q0, q1, q2, q3, q4, n0 + tl.arange(0, BLOCK_K), offs_k, N, K, NB, stride_q0,
                              stride_q1, offset, FMT, QBLOCK)
            acc = tl.dot(dot_operand(gt, DOT_DTYPE, UPCAST), dot_operand(wt, DOT_DTYPE, UPCAST), acc,
                         input_precision=DOT_PRECISION)
        if LOWRANK:
            for r0 in range(0, R, RANK_STEP):
                duj = load_2d(du_ptr, off_m, r0, M, R, stride_dum, stride_dur, BLOCK_M, RANK_STEP, False)
                aj = load_2d(a_ptr, r0, pid_k * BLOCK_N, R, K, stride_ar, stride_ak, RANK_STEP, BLOCK_N, False)
                acc = tl.dot(dot_operand(duj, DOT_DTYPE, UPCAST), dot_operand(aj, DOT_DTYPE, UPCAST), acc,
                             input_precision=DOT_PRECISION)
        if ACCUMULATE:   # after the loops: the dx tile is live only for this add (see the docstring)
            acc += load_2d(dx_ptr, off_m, pid_k * BLOCK_N, M, K, stride_dxm, stride_dxk, BLOCK_M, BLOCK_N,
                           False).to(tl.float32)
        store_2d(dx_ptr, round_to(acc, DOT_DTYPE, UPCAST), off_m, pid_k * BLOCK_N, M, K, stride_dxm, stride_dxk,
                 BLOCK_M, BLOCK_N, False)


# ------------------------------------------------------------------------------------------------ plans
def qgemm_configs(dtype: torch.dtype) -> tuple[BlockConfig, BlockConfig]:
    """(wide, narrow) tiles of the dequantizing GEMMs: smaller than the dense GEMMs' and two stages, because
    the decoded W tile and the gathers that build it need registers and shared memory of their own (the dense
    128x256x64, 3-stage tile needs 464 KiB here, twice what an sm_90 block has). Untuned, no GPU measured."""
    if dtype == torch.float32:
        return BlockConfig("wide", 64, 64, 32, 4, 2), BlockConfig("narrow", 32, 64, 32, 4, 2)
    return BlockConfig("wide", 128, 128, 64, 8, 2), BlockConfig("narrow", 64, 64, 64, 4, 2)


def pick_qgemm_config(rows: int, cols: int, dtype: torch.dtype, num_sms: int, dgrad: bool = False) -> BlockConfig:
    """The wide tile when the (rows, cols) output has at least one such tile per SM, else the narrow one.

    The 16-bit dgrad's wide tile steps N by 32, not 64: with 64, Triton 3.9 (not 3.6) gives the nf4, nf4-dq,
    q4_k and q6_k dgrads 255 registers and 64-512 bytes of spills at the benchmark shapes; with 32 every
    format compiles to at most 246 registers and no spills on both (tools/kernel_report.py --op qlora_linear)."""
    wide, narrow = qgemm_configs(dtype)
    if dgrad and dtype != torch.float32:
        wide = BlockConfig("wide", wide.block_m, wide.block_n, 32, wide.num_warps, wide.num_stages)
    tiles = triton.cdiv(rows, wide.block_m) * triton.cdiv(cols, wide.block_n)
    return wide if tiles >= num_sms else narrow


def quant_args(packed: list, scheme: str) -> dict:
    """The kernels' weight arguments (q0..q4, strides, NB, offset) and FMT for one stored weight.

    ``packed``: the format's stored tensors in ``QuantizedWeight`` order, followed for nf4 by the NF4 table
    (16 float32) and for nf4-dq also by the dynamic code (256 float32), on the weight's device (the op layer
    appends them: the code books live in lowcost.reference.quant)."""
    if scheme not in FORMAT_IDS:
        raise ValueError(f"the Triton kernels take {sorted(FORMAT_IDS)}, not {scheme!r}")
    nb, offset = 0, 0.0
    if scheme == "nf4":
        codes, absmax, table = packed
        q = [codes, absmax, table, codes, codes]
        nb = absmax.shape[1]
    elif scheme == "nf4-dq":
        codes, absmax_q, scale, off, table, dynamic = packed
        q = [codes, absmax_q, table, scale, dynamic]
        nb, offset = absmax_q.shape[1], float(off)
    else:
        q = list(packed) + [packed[0]] * (5 - len(packed))
    stride_1 = q[1].stride(0) if q[1].dim() == 2 else 0
    return {"q0": q[0], "q1": q[1], "q2": q[2], "q3": q[3], "q4": q[4], "NB": nb, "stride_q0": q[0].stride(0),
            "stride_q1": stride_1, "offset": offset, "FMT": FORMAT_IDS[scheme]}


def plan_qfwd_y(x, qargs, N, block_size, su, lora_b, bias, y, num_sms) -> Launch:
    """y (M, N) = x Wᵀ (+ su Bᵀ when su is given) + bias, W dequantized in the loop."""
    M, K = x.shape
    r = 0 if su is None else lora_b.shape[1]
    su = x if su is None else su
    lora_b = x if lora_b is None else lora_b
    cfg = pick_qgemm_config(M, N, x.dtype, num_sms)
    programs = _persistent_grid(M, N, cfg, num_sms)
    fmt = qargs["FMT"]
    args = {"x_ptr": x, **{k: v for k, v in qargs.items() if k != "FMT"}, "su_ptr": su, "b_ptr": lora_b,
            "bias_ptr": y if bias is None else bias, "y_ptr": y, "M": M, "N": N, "K": K, "R": r,
            "num_programs": programs, "stride_xm": x.stride(0), "stride_xk": x.stride(1),
            "stride_sum": su.stride(0), "stride_sur": su.stride(1), "stride_bn": lora_b.stride(0),
            "stride_br": lora_b.stride(1), "stride_ym": y.stride(0), "stride_yn": y.stride(1)}
    meta = {"FMT": fmt, "QBLOCK": max(block_size, 1), "HAS_BIAS": bias is not None, "RANK_STEP": RANK_STEP,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
            **dot_meta(x.dtype)}
    return Launch(_qlora_fwd_y_kernel, (programs,), args, meta, cfg.num_warps, cfg.num_stages, "qfwd_y",
                  role="gemm", persistent=True)


def plan_qbwd_dx(grad_y, qargs, K, block_size, du, lora_a, dx, num_sms, accumulate: bool = False) -> Launch:
    """dx (M, K) = g W (+ du A when du is given), W dequantized in the loop along its rows; ``accumulate``:
    dx += that instead (dx must hold its earlier value)."""
    M, N = grad_y.shape
    lowrank = du is not None
    du = grad_y if du is None else du
    lora_a = grad_y if lora_a is None else lora_a
    cfg = pick_qgemm_config(M, K, grad_y.dtype, num_sms, dgrad=True)
    programs = _persistent_grid(M, K, cfg, num_sms)
    args = {"g_ptr": grad_y, **{k: v for k, v in qargs.items() if k != "FMT"}, "du_ptr": du, "a_ptr": lora_a,
            "dx_ptr": dx, "M": M, "N": N, "K": K, "R": lora_a.shape[0] if lowrank else 0,
            "num_programs": programs, "stride_gm": grad_y.stride(0), "stride_gn": grad_y.stride(1),
            "stride_dum": du.stride(0), "stride_dur": du.stride(1), "stride_ar": lora_a.stride(0),
            "stride_ak": lora_a.stride(1), "stride_dxm": dx.stride(0), "stride_dxk": dx.stride(1)}
    meta = {"FMT": qargs["FMT"], "QBLOCK": max(block_size, 1), "LOWRANK": lowrank, "RANK_STEP": RANK_STEP,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
            **dot_meta(grad_y.dtype), **({"ACCUMULATE": True} if accumulate else {})}
    return Launch(_qlora_bwd_dx_kernel, (programs,), args, meta, cfg.num_warps, cfg.num_stages, "qbwd_dx",
                  role="gemm", persistent=True)


# --------------------------------------------------------------------------------------------- launchers
def _check(x: Tensor, packed: list, scheme: str) -> None:
    assert x.dim() == 2 and x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x {x.dtype} {x.dim()}-D"
    assert scheme in FORMAT_IDS, f"the Triton kernels do not take {scheme!r}"
    _check_devices(x.device, [x, *packed])


def qlora_linear_fwd(x, packed, scheme, N, block_size, lora_a, lora_b, bias, scale, dropout, seed):
    """(y (M, N) in x's dtype, u (M, r) float32): the u-pass of the dense op, then the dequantizing GEMM."""
    _check(x, packed, scheme)
    (M, K), r = x.shape, lora_a.shape[0]
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device), torch.empty((0, r), device=x.device)
    num_sms = sm_count(x.device)
    lora_a, lora_b = lowrank_operand(lora_a, x.dtype), lowrank_operand(lora_b, x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, r), dtype=torch.float32, device=x.device)
    su = lowrank_buffer(M, r, x.dtype, x.device)
    u_part = torch.empty((fwd_u_splits(M, K, x.dtype, num_sms), M, r), dtype=torch.float32, device=x.device)
    launches = [plan_fwd_u(x, lora_a, u_part, dropout, seed, num_sms),
                plan_reduce(u_part, u, num_sms, "u", out2=su, scale2=scale)]
    if N > 0:
        launches.append(plan_qfwd_y(x, quant_args(packed, scheme), N, block_size, su, lora_b, bias, y,
                                    num_sms))
    for launch in launches:
        launch.run()
    return y, u


def qlora_linear_bwd(grad_y, x, packed, scheme, block_size, lora_a, lora_b, u, scale, dropout, seed, needs,
                     norm=None):
    """(dx, dA, dB, dbias), None where ``needs`` says no: the dense op's passes around the dequantizing dgrad.
    ``norm`` = (rstd (M,) fp32, w (K,), "llama" | "gemma"): x is an RMSNorm's input and the op's input its output
    (autocast's copy in grad_y's dtype when x is fp32), rebuilt in the x-pass's loads as ``lora_linear_bwd``
    does; the outputs are in grad_y's dtype, the op's input dtype."""
    _check(x, packed, scheme)
    dtype = grad_y.dtype
    assert norm is not None or dtype == x.dtype, f"grad_y {dtype}, x {x.dtype}"
    if norm is not None:
        _check_norm(x, norm, dtype)
    needs = tuple(bool(n) for n in needs)
    need_dx, need_da, need_db, need_dbias = needs
    (M, K), (N, r) = x.shape, lora_b.shape
    if M == 0:
        return _empty_batch_grads(x, lora_a, lora_b, needs, dtype)
    num_sms = sm_count(x.device)
    a_dtype, b_dtype = lora_a.dtype, lora_b.dtype
    lora_a, lora_b = lowrank_operand(lora_a, dtype), lowrank_operand(lora_b, dtype)
    launches = []
    lowrank = need_dx or need_da or need_db
    du, db, dbias = _plan_g_pass(launches, grad_y, lora_b, u, scale, lowrank, need_dbias, b_dtype, num_sms)
    dx = torch.empty((M, K), dtype=dtype, device=x.device) if need_dx else None
    if need_dx and N > 0 and K > 0:
        inline = dropout == 0
        launches.append(plan_qbwd_dx(grad_y, quant_args(packed, scheme), K, block_size,
                                     du if inline else None, lora_a if inline else None, dx, num_sms))
    elif need_dx:
        dx.zero_()
    x_pass_dx = dx if need_dx and dropout > 0 and N > 0 else None
    da = _plan_x_pass(launches, x, du, lora_a, x_pass_dx, need_da or x_pass_dx is not None, dropout, seed,
                      a_dtype, num_sms, norm)
    for launch in launches:
        launch.run()
    return dx, da if need_da else None, db if need_db else None, dbias


def quantized_linear_fwd(x, packed, scheme, N, block_size, bias):
    """y = x Wᵀ + bias (M, N) in x's dtype, W dequantized in the GEMM loop."""
    _check(x, packed, scheme)
    y = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device)
    if x.shape[0] and N:
        plan_qfwd_y(x, quant_args(packed, scheme), N, block_size, None, None, bias, y,
                    sm_count(x.device)).run()
    return y


def quantized_linear_dgrad(grad_y, packed, scheme, K, block_size):
    """dx = g W (M, K) in g's dtype."""
    _check(grad_y, packed, scheme)
    M, N = grad_y.shape
    dx = torch.zeros((M, K), dtype=grad_y.dtype, device=grad_y.device)
    if M and N and K:
        plan_qbwd_dx(grad_y, quant_args(packed, scheme), K, block_size, None, None, dx,
                     sm_count(grad_y.device)).run()
    return dx


# ----------------------------------------------------------------------------------------- kernel report
def report_launches(scheme: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, p: float,
                    num_sms: int) -> list[Launch]:
    """The dequantizing GEMMs of one LoRA step on a ``scheme`` weight (N, K), x (M, K), rank r: the forward
    y = x Wᵀ + su Bᵀ and the dgrad dx = g W (+ du A, inlined when p == 0). The u-, g- and x-passes around them
    are the dense op's launches (``kernels.lora_linear.report_launches``). Placeholder tensors, nothing runs."""
    packed = _placeholder_weight(scheme, N, K)
    x, y = torch.empty((M, K), dtype=dtype), torch.empty((M, N), dtype=dtype)
    su, lora_b, lora_a = (torch.empty(shape, dtype=dtype) for shape in ((M, r), (N, r), (r, K)))
    g, du, dx = torch.empty((M, N), dtype=dtype), torch.empty((M, r), dtype=dtype), torch.empty((M, K), dtype=dtype)
    launches = [plan_qfwd_y(x, quant_args(packed, scheme), N, 64, su, lora_b, None, y, num_sms),
                plan_qbwd_dx(g, quant_args(packed, scheme), K, 64, du if p == 0 else None,
                             lora_a if p == 0 else None, dx, num_sms)]
    for launch in launches:
        launch.label = f"{launch.label} {scheme}"
    return launches


# ----------------------------------------------------------------------------------------- AOT coverage
def _placeholder_weight(scheme: str, N: int, K: int, block_size: int = 64) -> list:
    """Placeholder stored tensors (never read) of one format, code books appended as the op layer does."""
    u8, f32 = torch.uint8, torch.float32
    nb = K // block_size
    shapes = {"nf4": [((N, K // 2), u8), ((N, nb), f32), ((16,), f32)],
              "nf4-dq": [((N, K // 2), u8), ((N, nb), u8), ((1,), f32), ((), f32), ((16,), f32), ((256,), f32)],
              "int8": [((N, K), torch.int8), ((N,), f32)],
              "q8_0": [((N, K // 32 * 34), u8)], "q4_0": [((N, K // 32 * 18), u8)], "q4_1": [((N, K // 32 * 20), u8)],
              "q4_k": [((N, K // 256 * 144), u8)], "q6_k": [((N, K // 256 * 210), u8)]}
    return [torch.zeros(s, dtype=d) if s == () else torch.empty(s, dtype=d) for s, d in shapes[scheme]]


def aot_launches(dtypes=(torch.bfloat16, torch.float16, torch.float32), num_sms: int = 132):
    """Every dequantizing GEMM configuration the launchers can launch: per format and x dtype, both block
    configs of the forward (with and without bias) and of the dgrad (with and without the du A steps)."""
    M, N, K = 4096, 4096, 4096   # big enough for the wide tiles; a second, small shape gives the narrow ones
    for scheme, dtype, (m, n) in ((s, d, mn) for s in FORMAT_IDS for d in dtypes for mn in ((M, N), (64, 64))):
        packed = _placeholder_weight(scheme, n, K)
        x, y = torch.empty((m, K), dtype=dtype), torch.empty((m, n), dtype=dtype)
        su, b = torch.empty((m, 16), dtype=dtype), torch.empty((n, 16), dtype=dtype)
        g, dx, a = torch.empty((m, n), dtype=dtype), torch.empty((m, K), dtype=dtype), torch.empty((16, K), dtype=dtype)
        for bias in (None, torch.empty(n, dtype=dtype)):
            launch = plan_qfwd_y(x, quant_args(packed, scheme), n, 64, su, b, bias, y, num_sms)
            yield _aot_label(launch, scheme, dtype)
        for lowrank in (False, True):
            launch = plan_qbwd_dx(g, quant_args(packed, scheme), K, 64, su if lowrank else None,
                                  a if lowrank else None, dx, num_sms)
            yield _aot_label(launch, scheme, dtype)


def _aot_label(launch: Launch, scheme: str, dtype) -> Launch:
    flags = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if k in ("HAS_BIAS", "LOWRANK"))
    launch.label = f"{launch.label} {scheme} {str(dtype).replace('torch.', '')} {launch.config_text()} {flags}"
    return launch
