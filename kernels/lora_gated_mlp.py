"""Triton kernels of the fused LoRA gated MLP (``lowcost.reference.lora_gated_mlp`` has the math).

The product h = act(gate) ⊙ up (M, I) is never stored: the down projection's kernels rebuild each h tile
from the gate and up tiles they load, in forward and in backward.

    forward:  gate, u_g = lora_linear_fwd(x, W_g, A_g, B_g)        the LoRA-linear Triton kernels
              up,   u_u = lora_linear_fwd(x, W_u, A_u, B_u)
              u_d = (D_d⊙h) A_dᵀ                                     _gated_down_u_kernel   (h in registers)
              y   = h W_dᵀ + s_d·u_d B_dᵀ                           _gated_down_y_kernel   (h in the A-operand tile)
    backward: du_d = s_d·g B_d,  dB_d = s_d·gᵀu_d                    two (M, H) × r GEMMs (torch)
              dh = g W_d + D_d⊙(du_d A_d);  dgate = dh⊙up⊙act'(gate);  dup = dh⊙act(gate);  dA_d += du_dᵀ(D_d⊙h)
                                                                     _gated_dh_kernel: one pass, h and the
                                                                     mask rebuilt per tile, dh never stored
              gate and up: lora_linear_bwd(dgate, x, …), lora_linear_bwd(dup, x, …);  dx = dx_g + dx_u

_gated_down_y_kernel, one program per (BLOCK_M, BLOCK_N) tile of y (N = H), reduction over I:
    for k0 in range(0, I, BLOCK_K):
        ht = act(gate[rows, k-block]) ⊙ up[rows, k-block]          fp32, rounded once to the dot dtype
        acc += ht @ W_d[cols, k-block]ᵀ
    acc += Σ_r (s·u_d[rows, r-block]) @ B_d[cols, r-block]ᵀ;  y[rows, cols] = acc

_gated_dh_kernel, one program per (BLOCK_M, BLOCK_K) tile of (M, I), reduction over H:
    acc = Σ_n g[rows, n-block] @ W_d[n-block, cols];  lr = Σ_r du_d[rows, r] A_d[r, cols];  Dt = D_d[rows, cols]
    dh = acc + Dt ⊙ lr;  ht = act(gate) ⊙ up;  if NEED_DA: atomic dA_d[r, cols] += du_dᵀ (Dt ⊙ ht)
    dgate[rows, cols] = dh ⊙ up ⊙ act'(gate);  dup[rows, cols] = dh ⊙ act(gate)

ACT: 0 = SiLU, 1 = GELU (tanh approximation), 2 = GELU (erf); tanh is written with exp.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .aot import Variant, pointer_and_scalar_types
from .lora_linear import lora_linear_bwd, lora_linear_fwd
from .philox import dropout_multiplier, dropout_threshold, keep_scale, seed_words, uint32_as_int32
from .tiles import dot_operand, grouped_tile, load_tile, tile_mask, tile_ptrs

Tensor = torch.Tensor
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
RANK_STEP = 16
MAX_RANK = 128
SQRT_2_OVER_PI = 0.7978845608028654
GELU_C = 0.044715


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in float32 for a float32 tile g."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        t = _tanh(SQRT_2_OVER_PI * (g + GELU_C * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT: tl.constexpr):
    """h = act(gate) ⊙ up for rows ``offs_m`` x columns ``offs_k`` (float32; zeros outside (M, K))."""
    g = load_tile(gate_ptr, offs_m, offs_k, stride_gm, stride_gk, M, K).to(tl.float32)
    p = load_tile(up_ptr, offs_m, offs_k, stride_pm, stride_pk, M, K).to(tl.float32)
    a, _ = act_and_grad(g, ACT)
    return a * p


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _gated_down_u_kernel(
    gate_ptr, up_ptr, a_ptr, u_ptr,
    M, K, R,
    stride_gm, stride_gk, stride_pm, stride_pk, stride_ar, stride_ak, stride_um, stride_ur,
    seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """u_d = (D⊙h) A_dᵀ for BLOCK_M rows: h = act(gate) ⊙ up (M, K=I), A_d (R, K) -> u_d (M, R) float32."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT)
        if HAS_DROPOUT:
            ht = ht * dropout_multiplier(offs_m, k0, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K, MASK_VEC4)
        at = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R)        # (BLOCK_K, R_PAD) tile of Aᵀ
        acc = tl.dot(dot_operand(ht, DT, UPCAST), dot_operand(at, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    tl.store(tile_ptrs(u_ptr, offs_m, offs_r, stride_um, stride_ur), acc, mask=tile_mask(offs_m, offs_r, M, R))


@triton.jit
def _gated_down_y_kernel(
    gate_ptr, up_ptr, w_ptr, u_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_gm, stride_gk, stride_pm, stride_pk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_yn,
    scale,
    ACT: tl.constexpr, RANK_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = h W_dᵀ + s·u_d B_dᵀ for one (BLOCK_M, BLOCK_N) tile; h rebuilt from gate and up per K step."""
    DT: tl.constexpr = gate_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ht = _h_tile(gate_ptr, up_ptr, offs_m, offs_k, stride_gm, stride_gk, stride_pm, stride_pk, M, K, ACT)
        wt = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)       # (BLOCK_K, BLOCK_N) tile of Wᵀ
        acc = tl.dot(dot_operand(ht, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        uj = load_tile(u_ptr, offs_m, offs_j, stride_um, stride_ur, M, R) * scale
        bj = load_tile(b_ptr, offs_j, offs_n, stride_br, stride_bn, R, N)
        acc = tl.dot(dot_operand(uj, DT, UPCAST), dot_operand(bj, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    tl.store(tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn), acc.to(y_ptr.dtype.element_ty),
             mask=tile_mask(offs_m, offs_n, M, N))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _gated_dh_kernel(
    g_ptr, w_ptr, du_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, da_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dum, stride_dur, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dar, stride_dak,
    seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_VEC4: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of (M, K=I): dgate, dup (gate/up's strides) and dA_d's share (atomic)."""
    DT: tl.constexpr = g_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gt = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        wt = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K)
        acc = tl.dot(dot_operand(gt, DT, UPCAST), dot_operand(wt, DT, UPCAST), acc, input_precision=DOT_PRECISION)
    gate = load_tile(gate_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K).to(tl.float32)
    up = load_tile(up_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K).to(tl.float32)
    a, da = act_and_grad(gate, ACT)
    if HAS_DROPOUT:
        dt = dropout_multiplier(offs_m, pid_k * BLOCK_K, K, seed_lo, seed_hi, threshold, keep_scale, BLOCK_K,
                                MASK_VEC4)
    lr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_j = r0 + tl.arange(0, RANK_STEP)
        dut = load_tile(du_ptr, offs_m, offs_j, stride_dum, stride_dur, M, R)
        at = load_tile(a_ptr, offs_j, offs_k, stride_ar, stride_ak, R, K)
        lr = tl.dot(dot_operand(dut, DT, UPCAST), dot_operand(at, DT, UPCAST), lr, input_precision=DOT_PRECISION)
        if NEED_DA:
            ht = a * up
            if HAS_DROPOUT:
                ht = ht * dt
            part = tl.dot(tl.trans(dot_operand(dut, DT, UPCAST)), dot_operand(ht, DT, UPCAST),
                          input_precision=DOT_PRECISION)
            tl.atomic_add(tile_ptrs(da_ptr, offs_j, offs_k, stride_dar, stride_dak), part,
                          mask=tile_mask(offs_j, offs_k, R, K))
    if HAS_DROPOUT:
        lr = lr * dt
    dh = acc + lr
    mask = tile_mask(offs_m, offs_k, M, K)
    tl.store(tile_ptrs(dgate_ptr, offs_m, offs_k, stride_xm, stride_xk), (dh * up * da).to(DT), mask=mask)
    tl.store(tile_ptrs(dup_ptr, offs_m, offs_k, stride_xm, stride_xk), (dh * a).to(DT), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_meta(dtype: torch.dtype) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "UPCAST": _interpreting() and dtype == torch.bfloat16}


def _dropout_args(p: float, seed: int) -> dict:
    lo, hi = seed_words(seed)
    return {"seed_lo": lo, "seed_hi": hi, "threshold": uint32_as_int32(dropout_threshold(p)),
            "keep_scale": keep_scale(p)}


def _blocks(dtype: torch.dtype) -> dict:
    """Fixed tile sizes (untuned without a GPU): fp32 halves the reduction step."""
    step = 32 if dtype == torch.float32 else 64
    return {"u": dict(BLOCK_M=32, BLOCK_K=step, num_warps=4), "y": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=step,
                                                                         GROUP_M=8, num_warps=4),
            "dh": dict(BLOCK_M=64, BLOCK_N=step, BLOCK_K=64, GROUP_M=8, num_warps=4)}


def down_forward(gate: Tensor, up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor, scale: float,
                 dropout: float, seed: int, act: str) -> tuple[Tensor, Tensor]:
    """(y (M, H) in gate's dtype, u_d (M, r) float32) from gate, up (M, I) (same strides) without storing h."""
    (M, inter), (H, r) = gate.shape, b_down.shape
    assert gate.stride() == up.stride() and r <= MAX_RANK
    y = torch.empty((M, H), dtype=gate.dtype, device=gate.device)
    u = torch.empty((M, r), dtype=torch.float32, device=gate.device)
    if M == 0:
        return y, u
    cfg, meta = _blocks(gate.dtype), {"ACT": ACT_CODES[act], **_dot_meta(gate.dtype)}
    sg, sa = gate.stride(), a_down.stride()
    c = cfg["u"]
    _gated_down_u_kernel[(triton.cdiv(M, c["BLOCK_M"]),)](
        gate, up, a_down, u, M, inter, r, *sg, *sg, *sa, *u.stride(), **_dropout_args(dropout, seed),
        HAS_DROPOUT=dropout > 0, MASK_VEC4=dropout > 0 and inter % 4 == 0,
        R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_M=c["BLOCK_M"],
        BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"], **meta)
    c = cfg["y"]
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(H, c["BLOCK_N"]),)
    _gated_down_y_kernel[grid](gate, up, w_down, u, b_down, y, M, H, inter, r, *sg, *sg, *w_down.stride(),
                               *u.stride(), *b_down.stride(), *y.stride(), float(scale), RANK_STEP=RANK_STEP,
                               **{k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"], **meta)
    return y, u


def down_backward(grad_y: Tensor, gate: Tensor, up: Tensor, w_down: Tensor, a_down: Tensor, du: Tensor,
                  dropout: float, seed: int, act: str, need_da: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dgate, dup (M, I) in gate's dtype, dA_d (r, I) float32 or None); du = s_d·g B_d (M, r) float32."""
    (M, inter), (H, r) = gate.shape, (w_down.shape[0], a_down.shape[0])
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    da = torch.zeros((r, inter), dtype=torch.float32, device=gate.device) if need_da else None
    if M == 0 or inter == 0:
        return dgate, dup, da
    c, meta = _blocks(gate.dtype)["dh"], {"ACT": ACT_CODES[act], **_dot_meta(gate.dtype)}
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(inter, c["BLOCK_K"]),)
    _gated_dh_kernel[grid](grad_y, w_down, du, a_down, gate, up, dgate, dup, du if da is None else da,
                           M, H, inter, r, *grad_y.stride(), *w_down.stride(), *du.stride(), *a_down.stride(),
                           *gate.stride(), *(a_down.stride() if da is None else da.stride()),
                           **_dropout_args(dropout, seed), NEED_DA=need_da, HAS_DROPOUT=dropout > 0,
                           MASK_VEC4=dropout > 0 and inter % 4 == 0,
                           RANK_STEP=RANK_STEP, **{k: v for k, v in c.items() if k != "num_warps"},
                           num_warps=c["num_warps"], **meta)
    return dgate, dup, da


def gated_mlp_fwd(x: Tensor, gate_p, up_p, down_p, act: str) -> tuple[Tensor, ...]:
    """gate_p/up_p/down_p: (W, A, B, scale, dropout, seed). Returns (y, gate, up, u_g, u_u, u_d)."""
    gate, u_g = lora_linear_fwd(x, gate_p[0], gate_p[1], gate_p[2], None, *gate_p[3:])
    up, u_u = lora_linear_fwd(x, up_p[0], up_p[1], up_p[2], None, *up_p[3:])
    y, u_d = down_forward(gate, up, down_p[0], down_p[1], down_p[2], *down_p[3:], act)
    return y, gate, up, u_g, u_u, u_d


def gated_mlp_bwd(grad_y: Tensor, x: Tensor, gate_p, up_p, down_p, gate: Tensor, up: Tensor, u_g: Tensor,
                  u_u: Tensor, u_d: Tensor, act: str, needs) -> tuple[Optional[Tensor], ...]:
    """(dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d) as ``lowcost.reference.gated_mlp_backward`` defines them."""
    need_dx, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = needs
    w_d, a_d, b_d, s_d, p_d, seed_d = down_p
    g32 = grad_y.float()
    du = (g32 @ b_d.float()).mul_(s_d)
    db_d = (g32.t() @ u_d).mul_(s_d).to(b_d.dtype) if need_bd else None
    dgate, dup, da_d = down_backward(grad_y, gate, up, w_d, a_d, du, p_d, seed_d, act, need_ad)
    dx_g, da_g, db_g, _ = lora_linear_bwd(dgate, x, gate_p[0], gate_p[1], gate_p[2], u_g, *gate_p[3:],
                                          (need_dx, need_ag, need_bg, False))
    dx_u, da_u, db_u, _ = lora_linear_bwd(dup, x, up_p[0], up_p[1], up_p[2], u_u, *up_p[3:],
                                          (need_dx, need_au, need_bu, False))
    dx = dx_g.add_(dx_u) if need_dx else None
    return dx, da_g, db_g, da_u, db_u, None if da_d is None else da_d.to(a_d.dtype), db_d


_FLOATS = ("scale", "keep_scale")


def _types(kernel, dt: str) -> dict:
    pointers = {name: dt for name in kernel.arg_names if name.endswith("_ptr")}
    pointers.update({name: "fp32" for name in ("u_ptr", "du_ptr", "da_ptr") if name in pointers})
    return pointer_and_scalar_types(kernel, pointers, _FLOATS)


def aot_launches() -> Iterator[Variant]:
    """The variants the launchers compile, for the sm_90 compile check: every (dropout, dA need) per dtype;
    every activation for bf16 (the activation changes only elementwise code), SiLU for fp32 and fp16."""
    for dt in ("fp32", "fp16", "bf16"):
        blocks = _blocks({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt])
        for act in ACT_CODES.values() if dt == "bf16" else (0,):
            base = {"ACT": act, "DOT_PRECISION": "ieee", "UPCAST": False}
            u, y, dh = ({k: v for k, v in blocks[n].items() if k != "num_warps"} for n in ("u", "y", "dh"))
            yield Variant(_gated_down_y_kernel, _types(_gated_down_y_kernel, dt), {**base, "RANK_STEP": RANK_STEP, **y},
                          label=f"gated_down_y {dt} ACT={act}")
            for drop in (False, True):
                yield Variant(_gated_down_u_kernel, _types(_gated_down_u_kernel, dt),
                              {**base, "HAS_DROPOUT": drop, "MASK_VEC4": drop, "R_PAD": 16, **u}, label=f"gated_down_u {dt} ACT={act} "
                              f"HAS_DROPOUT={drop}")
                for need_da in (False, True):
                    yield Variant(_gated_dh_kernel, _types(_gated_dh_kernel, dt),
                                  {**base, "NEED_DA": need_da, "HAS_DROPOUT": drop, "MASK_VEC4": drop,
                                   "RANK_STEP": RANK_STEP, **dh},
                                  label=f"gated_dh {dt} ACT={act} HAS_DROPOUT={drop} NEED_DA={need_da}")
