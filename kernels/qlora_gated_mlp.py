"""Triton kernels of the fused LoRA gated MLP on quantized frozen weights (NF4, int8, GGUF blocks).

The math, the launches and what is saved are the dense fused MLP's (kernels/lora_gated_mlp.py); only the
frozen weights' loads differ: every W tile is decoded from the stored bytes inside the GEMM loop
(``dequant_tile``, kernels/qlora_dequant.py), so no dense W exists at any time.

    forward:  gate, u_g = qlora_linear_fwd(x, W_g, A_g, B_g)        the dequantizing LoRA-linear kernels
              up,   u_u = qlora_linear_fwd(x, W_u, A_u, B_u)
              u_d = (D_d⊙h) A_dᵀ                                     _gated_down_u_kernel (no W: the dense one)
              y   = h W_dᵀ + s_d·u_d B_dᵀ                           _qgated_down_y_kernel (h in the A tile, W_d
                                                                     decoded in the B tile, x Wᵀ access)
    backward: du_d = s_d·g B_d,  dB_d = s_d·gᵀu_d                    two (M, H) × r GEMMs (torch), as dense
              dh = g W_d + D_d⊙(du_d A_d);  dgate = dh⊙up⊙act'(gate);  dup = dh⊙act(gate)
                                                                     _qgated_dh_kernel (W_d decoded along its
                                                                     rows: the dgrad's transposed access)
              dA_d = du_dᵀ(D_d⊙h)                                    _gated_da_kernel + reduce (no W: dense)
              gate and up: qlora_linear_bwd(dgate, x, …), qlora_linear_bwd(dup, x, …);  dx = dx_g + dx_u

_qgated_down_y_kernel, one program per (BLOCK_M, BLOCK_N) tile of y (N = H), reduction over K = I:
    for k0 in range(0, I, BLOCK_K):
        ht = act(gate[rows, k-block]) ⊙ up[rows, k-block]
        wt = dequant_tile(W_d, cols, k-block)                      (BLOCK_N, BLOCK_K) fp32, rounded to x's dtype
        acc += ht @ wtᵀ
    y = acc + s·u_d B_dᵀ                                           (finish_y, shared with the dense kernel)

_qgated_dh_kernel, one program per (BLOCK_M, BLOCK_K) tile of (M, I), reduction over N = H:
    acc = Σ_n g[rows, n-block] @ dequant_tile(W_d, n-block, cols)  (BLOCK_N, BLOCK_K): W_d read along its rows
    dgate, dup from dh = acc + D_d ⊙ (du_d A_d)                    (finish_dh, shared with the dense kernel)

W rounded to x's dtype before the dot, as the torch backend decodes it (``lowcost.reference.quant``). Tile
sizes: the dense kernels' (``_blocks``), the dh kernel on 8 warps (``_dh_config``: its registers); the decoded
tile is (64, 32|64), small next to the qlora_linear GEMMs' 128x128 wide tile. Formats: every one
kernels/qlora_dequant.py decodes (``FORMAT_IDS``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .lora_gated_mlp import (ACT_CODES, MAX_RANK, RANK_STEP, _blocks, _dropout_meta, _h_tile, _meta, _strides,
                             da_chunks, finish_dh, finish_y, plan_da, plan_down_u)
from .lora_linear_plan import BlockConfig, Launch, dot_meta, dropout_args, plan_reduce, sm_count
from .qlora_dequant import FORMAT_IDS, dequant_tile
from .qlora_linear import _placeholder_weight, qlora_linear_bwd, qlora_linear_fwd, quant_args
from .tiles import dot_operand, grouped_tile, load_tile

Tensor = torch.Tensor


@triton.jit
def _qgated_down_y_kernel(
    gate_ptr, up_ptr, q0, q1, q2, q3, q4, u_ptr, b_ptr, y_ptr,
    M, N, K, R, NB,
    stride_gm, stride_gk, stride_pm, stride_pk, stride_q0, stride_q1, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_yn,
    scale, offset,
    FMT: tl.constexpr, QBLOCK: tl.constexpr, ACT: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y = h W_dᵀ + s·u_d B_dᵀ for one (BLOCK_M, BLOCK_N) tile, W_d (N=H, K=I) decoded tile by tile."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT)
        wt = dequant_tile(q0, q1, q2, q3, q4, offs_n, offs_k, N, K, NB, stride_q0, stride_q1, offset, FMT, QBLOCK)
        acc = tl.dot(dot_operand(ht, DT, UPCAST), dot_operand(wt, DT, UPCAST).T, acc, input_precision=DOT_PRECISION)
    finish_y(acc, u_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br,
             stride_ym, stride_yn, scale, DT, RANK_STEP, DOT_PRECISION, UPCAST)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _qgated_dh_kernel(
    g_ptr, q0, q1, q2, q3, q4, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    M, N, K, R, NB,
    stride_gm, stride_gn, stride_q0, stride_q1, stride_dum, stride_dur, stride_ar, stride_ak, stride_xm, stride_xk,
    offset, seed_lo, seed_hi, threshold, keep_scale,
    FMT: tl.constexpr, QBLOCK: tl.constexpr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr,
    RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of (M, K=I): dgate and dup, with g W_d summed over N = H on decoded
    (BLOCK_N, BLOCK_K) tiles of W_d. Every output element has one writer: no atomics."""
    DT: tl.constexpr = g_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gt = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        wt = dequant_tile(q0, q1, q2, q3, q4, offs_n, offs_k, N, K, NB, stride_q0, stride_q1, offset, FMT, QBLOCK)
        acc = tl.dot(dot_operand(gt, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    finish_dh(acc, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, offs_m, offs_k, pid_k * BLOCK_K, M, K, R,
              stride_dum, stride_dur, stride_ar, stride_ak, stride_xm, stride_xk, seed_lo, seed_hi, threshold,
              keep_scale, DT, ACT, HAS_DROPOUT, MASK_VEC4, RANK_STEP, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST)


# ------------------------------------------------------------------------------------------------ plans
def _weight_args(qargs: dict) -> dict:
    """The runtime weight arguments of ``quant_args`` (FMT is a constexpr)."""
    return {k: v for k, v in qargs.items() if k != "FMT"}


def _weight_meta(qargs: dict, block_size: int) -> dict:
    return {"FMT": qargs["FMT"], "QBLOCK": max(block_size, 1)}


def plan_qdown_y(gate, up, qargs, H, block_size, u, b_down, y, scale, act) -> Launch:
    """y (M, H) = h W_dᵀ + s_d·u_d B_dᵀ with W_d (H, I) decoded in the loop; grouped (BLOCK_M, BLOCK_N) tiles."""
    (M, inter), r = gate.shape, b_down.shape[1]
    cfg = _blocks(gate.dtype)["y"]
    names = ("stride_gm", "stride_gk", "stride_pm", "stride_pk", "stride_um", "stride_ur", "stride_bn",
             "stride_br", "stride_ym", "stride_yn")
    args = {"gate_ptr": gate, "up_ptr": up, **_weight_args(qargs), "u_ptr": u, "b_ptr": b_down, "y_ptr": y,
            "M": M, "N": H, "K": inter, "R": r,
            **_strides(names, gate.stride() + up.stride() + u.stride() + b_down.stride() + y.stride()),
            "scale": float(scale)}
    meta = {**_weight_meta(qargs, block_size), **_meta(gate.dtype, act), "RANK_STEP": RANK_STEP,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(H, cfg.block_n),)
    return Launch(_qgated_down_y_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "qmlp_down_y",
                  role="gemm")


def _dh_config(dtype: torch.dtype, fmt: int) -> BlockConfig:
    """The dense dh tile (``_blocks``) with 8 warps, and 2 stages for double-quantized NF4.

    From the registers compiled for sm_90a at the benchmark launch (bf16, benchmarks/results/
    kernel_report_qlora.md): with 4 warps NF4's decode, the 64x64 accumulator and the epilogue's tiles held
    255 registers per thread (Triton 3.6.0; 2 CTAs of 4 warps per SM); 8 warps (two warpgroups on the wgmma
    tile) halve the per-thread share. Double-quantized NF4 stages more decode state in shared memory (129 KiB at
    3 stages: 1 CTA per SM); 2 stages bring it to 73 KiB. Neither changes a result: the tile sizes, hence the
    reduction steps, stay; warps and stages only distribute and pipeline the same MMA steps."""
    cfg = _blocks(dtype)["dh"]
    return replace(cfg, num_warps=8, num_stages=2 if fmt == FORMAT_IDS["nf4-dq"] else cfg.num_stages)


def plan_qdh(grad_y, qargs, block_size, du, a_down, gate, up, dgate, dup, dropout, seed, act) -> Launch:
    """dgate, dup (M, I) from dh = g W_d + D_d ⊙ (du A_d), W_d (H, I) decoded along its rows."""
    (M, inter), H, r = gate.shape, grad_y.shape[1], a_down.shape[0]
    cfg = _dh_config(gate.dtype, qargs["FMT"])
    assert dgate.stride() == dup.stride() == gate.stride() == up.stride()
    names = ("stride_gm", "stride_gn", "stride_dum", "stride_dur", "stride_ar", "stride_ak", "stride_xm",
             "stride_xk")
    args = {"g_ptr": grad_y, **_weight_args(qargs), "du_ptr": du, "a_ptr": a_down, "gate_ptr": gate, "up_ptr": up,
            "dgate_ptr": dgate, "dup_ptr": dup, "M": M, "N": H, "K": inter, "R": r,
            **_strides(names, grad_y.stride() + du.stride() + a_down.stride() + gate.stride()),
            **dropout_args(dropout, seed)}
    meta = {**_weight_meta(qargs, block_size), **_meta(gate.dtype, act), **_dropout_meta(dropout, inter),
            "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "GROUP_M": cfg.group_m}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(inter, cfg.block_k),)
    return Launch(_qgated_dh_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "qmlp_dh", role="gemm")


def plan_qdown_forward(gate, up, packed, scheme, H, block_size, a_down, b_down, scale, dropout, seed, act):
    """(launches, y (M, H) in gate's dtype, u_d (M, r) float32); M > 0. gate and up share strides."""
    M, r = gate.shape[0], b_down.shape[1]
    assert gate.stride() == up.stride() and r <= MAX_RANK
    y = torch.empty((M, H), dtype=gate.dtype, device=gate.device)
    u = torch.empty((M, r), dtype=torch.float32, device=gate.device)
    return [plan_down_u(gate, up, a_down, u, dropout, seed, act),
            plan_qdown_y(gate, up, quant_args(packed, scheme), H, block_size, u, b_down, y, scale, act)], y, u


def plan_qdown_backward(grad_y, gate, up, packed, scheme, block_size, a_down, du, dropout, seed, act, need_da,
                        num_sms):
    """(launches, (dgate, dup, dA_d in a_down's dtype or None)); M > 0 and I > 0. du (M, r) float32."""
    (M, inter), r = gate.shape, a_down.shape[0]
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    launches = [plan_qdh(grad_y, quant_args(packed, scheme), block_size, du, a_down, gate, up, dgate, dup, dropout,
                         seed, act)]
    da = None
    if need_da:
        _, chunks, rows_per_chunk = da_chunks(M, inter, gate.dtype, num_sms)
        da_part = torch.empty((chunks, r, inter), dtype=torch.float32, device=gate.device)
        da = torch.empty((r, inter), dtype=a_down.dtype, device=gate.device)
        launches += [plan_da(gate, up, du, da_part, rows_per_chunk, dropout, seed, act),
                     plan_reduce(da_part, da, num_sms, "mlp_dA")]
    return launches, (dgate, dup, da)


# ------------------------------------------------------------------------------------------------ launchers
def qdown_forward(gate: Tensor, up: Tensor, down, act: str) -> tuple[Tensor, Tensor]:
    """(y (M, H) in gate's dtype, u_d (M, r) float32) from gate, up (M, I) without storing h.
    ``down``: (packed, scheme, H, block_size, A_d, B_d, scale, dropout, seed)."""
    packed, scheme, H, block_size, a_down, b_down, scale, dropout, seed = down
    if gate.shape[0] == 0:
        return (torch.empty((0, H), dtype=gate.dtype, device=gate.device),
                torch.empty((0, a_down.shape[0]), dtype=torch.float32, device=gate.device))
    launches, y, u = plan_qdown_forward(gate, up, packed, scheme, H, block_size, a_down, b_down, scale, dropout,
                                        seed, act)
    for launch in launches:
        launch.run()
    return y, u


def qdown_backward(grad_y: Tensor, gate: Tensor, up: Tensor, down, du: Tensor, act: str,
                   need_da: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dgate, dup (M, I) in gate's dtype, dA_d (r, I) in A_d's dtype or None); du = s_d·g B_d (M, r) float32."""
    packed, scheme, _, block_size, a_down, _, _, dropout, seed = down
    (M, inter), r = gate.shape, a_down.shape[0]
    if M == 0 or inter == 0:
        da = torch.zeros((r, inter), dtype=a_down.dtype, device=gate.device) if need_da else None
        return torch.empty_like(gate), torch.empty_like(up), da
    launches, grads = plan_qdown_backward(grad_y, gate, up, packed, scheme, block_size, a_down, du, dropout, seed,
                                          act, need_da, sm_count(gate.device))
    for launch in launches:
        launch.run()
    return grads


def qgated_mlp_fwd(x: Tensor, gate_p, up_p, down_p, act: str) -> tuple[Tensor, ...]:
    """gate_p/up_p/down_p: (packed with code books, scheme, N, block_size, A, B, scale, dropout, seed) with N
    the projection's output size. Returns (y, gate, up, u_g, u_u, u_d)."""
    gate, u_g = qlora_linear_fwd(x, *gate_p[:6], None, *gate_p[6:])
    up, u_u = qlora_linear_fwd(x, *up_p[:6], None, *up_p[6:])
    y, u_d = qdown_forward(gate, up, down_p, act)
    return y, gate, up, u_g, u_u, u_d


def qgated_mlp_bwd(grad_y: Tensor, x: Tensor, gate_p, up_p, down_p, gate: Tensor, up: Tensor, u_g: Tensor,
                   u_u: Tensor, u_d: Tensor, act: str, needs, norm=None) -> tuple[Optional[Tensor], ...]:
    """(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d) as ``lowcost.reference.gated_mlp_backward`` defines them;
    dB_d and du_d as the dense kernels' ``gated_mlp_bwd`` computes them, dx = dx_g + dx_u in the op's input
    dtype. ``norm`` = (rstd (M,) fp32, w (K,), form): x is an RMSNorm's input, the op's input rebuilt by the gate
    and up x-passes in their loads (``qlora_linear_bwd``'s ``norm``)."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    b_d, s_d = down_p[5], down_p[6]
    g32 = grad_y.float()
    du = (g32 @ b_d.float()).mul_(s_d)
    db_d = (g32.t() @ u_d).mul_(s_d).to(b_d.dtype) if need_bd else None
    dgate, dup, da_d = qdown_backward(grad_y, gate, up, down_p, du, act, need_ad)
    dx_g, da_g, db_g, _ = qlora_linear_bwd(dgate, x, gate_p[0], gate_p[1], *gate_p[3:6], u_g, *gate_p[6:],
                                           (need_dx, need_ag, need_bg, False), norm)
    dx_u, da_u, db_u, _ = qlora_linear_bwd(dup, x, up_p[0], up_p[1], *up_p[3:6], u_u, *up_p[6:],
                                           (need_dx, need_au, need_bu, False), norm)
    dx = dx_g.add_(dx_u) if need_dx else None
    return dx, da_g, db_g, da_u, db_u, da_d, db_d


# ----------------------------------------------------------------------------------------- kernel report
def _report_precision(launches: list, dtype: torch.dtype, tf32: bool = False) -> list:
    """DOT_PRECISION as a GPU launch sets it (fp32: TF32 only when torch allows it), not the interpreter's."""
    for launch in launches:
        launch.constexprs["DOT_PRECISION"] = dot_meta(dtype, allow_tf32=tf32)["DOT_PRECISION"]
        launch.constexprs["UPCAST"] = False
    return launches


def _down_gemms(scheme: str, M: int, H: int, inter: int, r: int, dtype: torch.dtype, p: float, act: str,
                block_size: int = 64) -> list[Launch]:
    """The two dequantizing launches of one MLP step on a ``scheme`` W_d (H, I): y and dh (placeholders)."""
    packed = _placeholder_weight(scheme, H, inter, block_size)
    gate, up = torch.empty((M, inter), dtype=dtype), torch.empty((M, inter), dtype=dtype)
    u = torch.empty((M, r), dtype=torch.float32)
    b, a = torch.empty((H, r), dtype=dtype), torch.empty((r, inter), dtype=dtype)
    y, g = torch.empty((M, H), dtype=dtype), torch.empty((M, H), dtype=dtype)
    qargs = quant_args(packed, scheme)
    return [plan_qdown_y(gate, up, qargs, H, block_size, u, b, y, 2.0, act),
            plan_qdh(g, qargs, block_size, u, a, gate, up, torch.empty_like(gate), torch.empty_like(up), p, 1, act)]


def report_launches(scheme: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, p: float,
                    num_sms: int) -> list[Launch]:
    """The down projection's dequantizing GEMMs of one fused-MLP step at tokens M, hidden H = K, intermediate
    I = N, rank r on a ``scheme`` W_d: y = h W_dᵀ + s·u B_dᵀ and dh. The gate and up projections are the
    qlora_linear GEMMs at (M, H, I, r); the u- and dA-passes are the dense MLP's (they never read W).
    ``num_sms`` is unused (the tile grids do not depend on it); kept for the report's common signature."""
    launches = _report_precision(_down_gemms(scheme, M, K, N, r, dtype, p, "silu"), dtype)
    for launch in launches:
        launch.label = f"{launch.label} {scheme}"
    return launches


def aot_launches(dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> Iterator[Launch]:
    """The two kernels' configurations the launcher can launch, by the constexprs that change their code:
    every format x every x dtype x dropout off and on (the y kernel has no dropout constexpr: once), SiLU;
    fp32 with TF32 per format; the other activations (an epilogue independent of the decode) once each, bf16
    nf4; the dh kernel's one-word mask path (I % 4 != 0) once. Tile sizes depend on the dtype only (``_blocks``;
    the dh kernel's stages also on the format, ``_dh_config``)."""
    cases = [(s, d, "silu", p, False) for s in FORMAT_IDS for d in dtypes for p in (0.0, 0.1)]
    cases += [(s, torch.float32, "silu", 0.1, True) for s in FORMAT_IDS if torch.float32 in dtypes]
    cases += [("nf4", torch.bfloat16, act, 0.1, False) for act in ACT_CODES if act != "silu"]
    seen = set()
    for scheme, dtype, act, p, tf32 in cases:
        inter = 256 if scheme in ("q4_k", "q6_k") else 128
        for launch in _report_precision(_down_gemms(scheme, 40, 256, inter, 16, dtype, p, act), dtype, tf32):
            if _aot_label(launch, scheme, dtype).label not in seen:
                seen.add(launch.label)
                yield launch
    odd = _report_precision(_down_gemms("int8", 40, 256, 63, 16, torch.bfloat16, 0.1, "silu"), torch.bfloat16)
    yield _aot_label(odd[1], "int8", torch.bfloat16, "(I=63)")   # the dh kernel's one-word dropout mask path


def _aot_label(launch: Launch, scheme: str, dtype: torch.dtype, extra: str = "") -> Launch:
    meta = " ".join(f"{k}={v}" for k, v in launch.constexprs.items()
                    if k in ("ACT", "HAS_DROPOUT", "MASK_VEC4", "DOT_PRECISION"))
    launch.label = (f"{launch.label} {scheme} {str(dtype).replace('torch.', '')} {launch.config_text()} {meta} "
                    f"{extra}").rstrip()
    return launch

