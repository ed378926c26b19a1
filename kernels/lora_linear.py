"""Launchers of the fused LoRA linear Triton kernels (docs/lora_linear_spec.md).

    lora_linear_fwd(x, W, A, B, bias, s, p, seed)            -> y (M, N) x.dtype, u (M, r) float32
    lora_linear_bwd(g, x, W, A, B, u, s, p, seed, needs)     -> dx (M, K), dA (r, K), dB (N, r), dbias (N,)
    dropout_keep_mask(M, K, seed, p, device)                 -> bool (M, K), the Triton Philox mask
    aot_launches()                                           -> every kernel configuration the launchers launch
    report_launches(M, K, N, r, dtype, p, num_sms)           -> the launches of one fwd + bwd at a shape

Forward = 2 launches (u pass, base GEMM with the low-rank term in its epilogue); backward = 2 launches
(g-pass, dgrad with the mask regenerated once per tile); see lora_linear_fwd.py / lora_linear_bwd.py.

Each launcher asserts its own assumptions (the op layer validates user input), allocates, picks ONE block
configuration per shape with a small heuristic (no autotuning: the interpreter, the AOT check and a GPU
all run the same configurations), and launches. A launch is described by a ``Launch`` (kernel, grid,
runtime args, constexprs), which is also what ``aot_launches`` and ``report_launches`` hand to
tools/kernel_report.py.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

from .lora_linear_bwd import _lora_bwd_dx_kernel, _lora_bwd_g_kernel
from .lora_linear_fwd import _lora_fwd_u_kernel, _lora_fwd_y_kernel
from .philox import _dropout_mask_kernel, dropout_threshold, keep_scale, seed_words, uint32_as_int32

Tensor = torch.Tensor
MAX_RANK = 128
RANK_STEP = 16  # ranks per step of the GEMM kernels' low-rank loops (their code is then independent of r)
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8"}


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel launch (every tl.dot dimension is >= 16).

    See ``block_configs`` for what each size means per kernel; 0 marks a size the kernel does not use.
    """
    name: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def block_configs(kind: str, dtype: torch.dtype) -> tuple[BlockConfig, BlockConfig]:
    """(big, small) block configs of one kernel kind for x's dtype. fp32 halves the reduction step (shared
    memory, and the unrolled FMA code of "ieee" dots). Untuned: chosen without a GPU to measure on."""
    step = 32 if dtype == torch.float32 else 64
    table = {
        # row kernels: block_m rows per program; fwd_u steps over K by block_k, bwd_g over N by block_n
        "fwd_u": (BlockConfig("tall", 64, 0, step, 1, 4, 3), BlockConfig("short", 16, 0, step, 1, 4, 3)),
        "bwd_g": (BlockConfig("tall", 64, step, 0, 1, 4, 3), BlockConfig("short", 16, step, 0, 1, 4, 3)),
        # GEMMs: block_m x block_n output tiles, reduction step block_k (for bwd_dx the output is (M, K))
        "fwd_y": (BlockConfig("wide", 128, 128, step, 8, 8, 3), BlockConfig("narrow", 64, 128, step, 8, 4, 3)),
        "bwd_dx": (BlockConfig("wide", 128, 64, step, 8, 8, 3), BlockConfig("narrow", 64, 64, step, 8, 4, 3)),
    }
    return table[kind]


MASK_CONFIG = BlockConfig("mask", 32, 0, 64, 1, 4, 1)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (the interpreter: tiny test shapes then
    reach every configuration)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def pick_config(kind: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                num_sms: Optional[int] = None) -> BlockConfig:
    """The big config when its programs alone fill the machine (one per SM), else the small one.

    rows x cols is the output the kernel tiles: (M, r) for fwd_u and bwd_g (one program per row panel),
    (M, N) for fwd_y, (M, K) for bwd_dx.
    """
    big, small = block_configs(kind, dtype)
    programs = triton.cdiv(rows, big.block_m)
    if kind in ("fwd_y", "bwd_dx"):
        programs *= triton.cdiv(cols, big.block_n)
    return big if programs >= (num_sms or _sm_count(device)) else small


def rank_pad(r: int) -> int:
    """R_PAD: the rank padded to a power of two >= 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(r))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_meta(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> dict:
    """DOT_PRECISION (fp32 inputs: "tf32" only if torch allows TF32 matmuls) and UPCAST (bf16 under the
    interpreter, where bf16 arithmetic is broken: tiles go to fp32 before every dot)."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"
    return {"DOT_PRECISION": precision, "UPCAST": _interpreting() and dtype == torch.bfloat16}


def _dropout_args(dropout: float, seed: int) -> dict:
    seed_lo, seed_hi = seed_words(seed)
    return {"seed_lo": seed_lo, "seed_hi": seed_hi,
            "threshold": uint32_as_int32(dropout_threshold(dropout)), "keep_scale": keep_scale(dropout)}


# ------------------------------------------------------------------------------------------------ launch
@dataclass
class Launch:
    """One kernel launch: runtime args by name, constexprs, grid and options."""
    kernel: triton.JITFunction
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    label: str = ""
    role: str = "pass"              # "gemm": the forward / dgrad GEMMs; "pass": everything else
    persistent: bool = False
    reference: Optional[dict] = None  # GEMMs: the tile a plain reference GEMM is compiled with (kernel report)

    def config_text(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}"

    def run(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)

    def signature(self) -> dict:
        """Triton signature of the launch as the JIT would derive it without value specialisation."""
        return {name: "constexpr" if name in self.constexprs else _triton_type(self.args[name])
                for name in self.kernel.arg_names}


def _triton_type(value) -> str:
    assert not isinstance(value, bool), "pass flags as int32 0/1 (the interpreter rejects bool arguments)"
    if isinstance(value, Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    assert isinstance(value, float), f"unexpected kernel argument {value!r}"
    return "fp32"


_AXES = {"x": "mk", "a": "rk", "b": "nr", "u": "mr", "w": "nk", "y": "mn", "g": "mn", "du": "mr", "db": "nr",
         "dx": "mk", "da": "rk"}


def _strides(prefix: str, t: Tensor) -> dict:
    """{"stride_<prefix><axis>": stride} for a 2-D tensor, axes named as in the kernel signatures."""
    return {f"stride_{prefix}{axis}": s for axis, s in zip(_AXES[prefix], t.stride())}


def _plan_fwd_u(x, lora_a, u, dropout, seed, cfg: BlockConfig) -> Launch:
    """u (M, r) fp32 = x̃ Aᵀ."""
    (M, K), r = x.shape, lora_a.shape[0]
    args = {"x_ptr": x, "a_ptr": lora_a, "u_ptr": u, "M": M, "K": K, "R": r,
            **_strides("x", x), **_strides("a", lora_a), **_strides("u", u), **_dropout_args(dropout, seed)}
    meta = {"HAS_DROPOUT": dropout > 0, "R_PAD": rank_pad(r), "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k,
            **_dot_meta(x.dtype)}
    return Launch(_lora_fwd_u_kernel, (triton.cdiv(M, cfg.block_m),), args, meta, cfg.num_warps,
                  cfg.num_stages, f"fwd_u/{cfg.name}")


def _plan_fwd_y(x, weight, u, lora_b, bias, y, scale, cfg: BlockConfig) -> Launch:
    """y (M, N) = x Wᵀ + s·u Bᵀ + bias, one store per tile."""
    (M, K), (N, r) = x.shape, lora_b.shape
    args = {"x_ptr": x, "w_ptr": weight, "u_ptr": u, "b_ptr": lora_b, "bias_ptr": y if bias is None else bias,
            "y_ptr": y, "M": M, "N": N, "K": K, "R": r, **_strides("x", x), **_strides("w", weight),
            **_strides("u", u), **_strides("b", lora_b), **_strides("y", y), "scale": float(scale)}
    meta = {"HAS_BIAS": bias is not None, "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, **_dot_meta(x.dtype)}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    return Launch(_lora_fwd_y_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, f"fwd_y/{cfg.name}")


def _plan_bwd_g(grad_y, lora_b, u, du, db32, dbias32, scale, cfg: BlockConfig) -> Launch:
    """du = s·g B (stored), dB32 += s·gᵀu, dbias32 += colsum(g); absent outputs (None) are skipped."""
    (M, N), r = grad_y.shape, lora_b.shape[1]
    args = {"g_ptr": grad_y, "b_ptr": lora_b, "u_ptr": u, "du_ptr": u if du is None else du,
            "db_ptr": u if db32 is None else db32, "dbias_ptr": u if dbias32 is None else dbias32,
            "M": M, "N": N, "R": r, **_strides("g", grad_y), **_strides("b", lora_b), **_strides("u", u),
            **_strides("du", u if du is None else du), **_strides("db", u if db32 is None else db32),
            "scale": float(scale), "need_du": int(du is not None), "need_db": int(db32 is not None),
            "need_dbias": int(dbias32 is not None)}
    meta = {"R_PAD": rank_pad(r), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **_dot_meta(grad_y.dtype)}
    return Launch(_lora_bwd_g_kernel, (triton.cdiv(M, cfg.block_m),), args, meta, cfg.num_warps,
                  cfg.num_stages, f"bwd_g/{cfg.name}")


def _plan_bwd_dx(grad_y, weight, du, lora_a, x, dx, da32, dropout, seed, cfg: BlockConfig) -> Launch:
    """dx = g W + D ⊙ (du A) (if dx is not None) and dA32 += duᵀ x̃ (if da32 is not None)."""
    (M, K), (N, r) = x.shape, (weight.shape[0], lora_a.shape[0])
    args = {"g_ptr": grad_y, "w_ptr": weight, "du_ptr": du, "a_ptr": lora_a, "x_ptr": x,
            "dx_ptr": x if dx is None else dx, "da_ptr": du if da32 is None else da32,
            "M": M, "N": N, "K": K, "R": r, **_strides("g", grad_y), **_strides("w", weight),
            **_strides("du", du), **_strides("a", lora_a), **_strides("x", x),
            **_strides("dx", x if dx is None else dx), **_strides("da", lora_a if da32 is None else da32),
            **_dropout_args(dropout, seed)}
    # dx (M, K) is this GEMM's output and N its reduction: the config's output width (block_n) tiles K and
    # its reduction step (block_k) walks N.
    meta = {"NEED_DX": dx is not None, "NEED_DA": da32 is not None, "HAS_DROPOUT": dropout > 0,
            "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_k, "BLOCK_K": cfg.block_n, "GROUP_M": cfg.group_m, **_dot_meta(x.dtype)}
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(K, cfg.block_n),)
    return Launch(_lora_bwd_dx_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, f"bwd_dx/{cfg.name}")


def _plan_mask(out, row_offset, seed, dropout) -> Launch:
    M, K = out.shape
    cfg = MASK_CONFIG
    args = {"out_ptr": out, "M": M, "K": K, "row_offset": row_offset, "stride_om": out.stride(0),
            **{k: v for k, v in _dropout_args(dropout, seed).items() if k != "keep_scale"}}
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k}
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(K, cfg.block_k))
    return Launch(_dropout_mask_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "dropout_mask")


# --------------------------------------------------------------------------------------------- launchers
def _check_operands(x, weight, lora_a, lora_b, bias) -> tuple[int, int, int, int]:
    """(M, K, N, r) after asserting the kernels' assumptions on shapes, dtypes and devices."""
    assert x.dim() == 2 and weight.dim() == 2 and lora_a.dim() == 2 and lora_b.dim() == 2, "2-D operands"
    (M, K), (N, r) = x.shape, lora_b.shape
    assert weight.shape == (N, K) and lora_a.shape == (r, K), (
        f"shape mismatch: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
        f"B {tuple(lora_b.shape)}")
    assert 1 <= r <= MAX_RANK, f"rank {r} outside [1, {MAX_RANK}] supported by the Triton kernels"
    assert x.dtype in ACTIVATION_DTYPES and weight.dtype == x.dtype, f"x {x.dtype}, W {weight.dtype}"
    assert lora_a.dtype == lora_b.dtype and lora_a.dtype in (x.dtype, torch.float32), (
        f"adapters {lora_a.dtype}/{lora_b.dtype} must be x's dtype {x.dtype} or float32")
    tensors = (x, weight, lora_a, lora_b) + (() if bias is None else (bias,))
    _check_devices(x.device, tensors)
    assert bias is None or (bias.shape == (N,) and bias.dtype == x.dtype), "bias (N,) in x's dtype"
    return M, K, N, r


def _check_devices(device: torch.device, tensors) -> None:
    assert all(t.device == device for t in tensors), "all operands must be on one device"
    assert device.type == "cuda" or _interpreting(), (
        f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before import (tensors are on {device})")


def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                    scale: float, dropout: float, seed: int) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + s·u Bᵀ + bias and u = x̃ Aᵀ, x̃ = D ⊙ x with D from Philox(seed).

    x (M, K) any strides (never copied), weight (N, K), lora_a (r, K), lora_b (N, r), bias (N,) or None.
    Returns y (M, N) contiguous in x.dtype and u (M, r) float32 contiguous (saved for backward).
    """
    M, K, N, r = _check_operands(x, weight, lora_a, lora_b, bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, r), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, u
    _plan_fwd_u(x, lora_a, u, dropout, seed, pick_config("fwd_u", M, r, x.dtype, x.device)).run()
    _plan_fwd_y(x, weight, u, lora_b, bias, y, scale, pick_config("fwd_y", M, N, x.dtype, x.device)).run()
    return y, u


def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
                    scale: float, dropout: float, seed: int, needs: tuple[bool, bool, bool, bool]
                    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of the fused LoRA linear; ``needs`` = (dx, dA, dB, dbias), None where not needed.

    grad_y g (M, N) any strides, u (M, r) float32 from the forward. With du = s·g B (M, r, fp32, the only
    intermediate): dx = g W + D ⊙ (du A) in x.dtype (M, K); dA = duᵀ x̃ in lora_a.dtype (r, K);
    dB = s·gᵀ u in lora_b.dtype (N, r); dbias = Σ_m g in x.dtype (N,). No dW.
    """
    need_dx, need_da, need_db, need_dbias = (bool(n) for n in needs)
    M, K, N, r = _check_operands(x, weight, lora_a, lora_b, None)
    assert grad_y.shape == (M, N) and grad_y.dtype == x.dtype, f"grad_y {tuple(grad_y.shape)} {grad_y.dtype}"
    assert u.shape == (M, r) and u.dtype == torch.float32, f"u must be float32 (M, r): {u.dtype} {tuple(u.shape)}"
    _check_devices(x.device, (grad_y, u))
    f32 = {"dtype": torch.float32, "device": x.device}
    need_du = need_dx or need_da
    du = torch.empty((M, r), **f32) if need_du else None
    db32 = torch.zeros((N, r), **f32) if need_db else None
    dbias32 = torch.zeros((N,), **f32) if need_dbias else None
    da32 = torch.zeros((r, K), **f32) if need_da else None
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    if M > 0 and N > 0 and (need_du or need_db or need_dbias):
        cfg = pick_config("bwd_g", M, r, x.dtype, x.device)
        _plan_bwd_g(grad_y, lora_b, u, du, db32, dbias32, scale, cfg).run()
    elif need_du:
        du.zero_()  # N == 0: g is empty
    if M > 0 and K > 0 and need_du:
        cfg = pick_config("bwd_dx", M, K, x.dtype, x.device)
        _plan_bwd_dx(grad_y, weight, du, lora_a, x, dx, da32, dropout, seed, cfg).run()
    return (dx, None if da32 is None else da32.to(lora_a.dtype), None if db32 is None else db32.to(lora_b.dtype),
            None if dbias32 is None else dbias32.to(x.dtype))


def dropout_keep_mask(M: int, K: int, seed: int, dropout: float, device, *, row_offset: int = 0) -> Tensor:
    """Bool (M, K): True where element (row_offset + m, k) of an (·, K) matrix is kept (Triton Philox).

    ``row_offset`` (default 0) reaches logical indices past 2**31 without allocating them.
    """
    device = torch.device(device)
    _check_devices(device, ())
    if dropout == 0.0:
        return torch.ones((M, K), dtype=torch.bool, device=device)
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if out.numel():
        _plan_mask(out, row_offset, seed, dropout).run()
    return out.bool()


# ----------------------------------------------------------------------------------------- AOT coverage
DTYPE_VARIANTS = (  # (x dtype, adapter dtype, allow_tf32)
    (torch.float32, torch.float32, False), (torch.float32, torch.float32, True),
    (torch.float16, torch.float16, False), (torch.float16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.float32, False))
AOT_RANKS = (16, 32, 64, 128)


def aot_launches(ranks=AOT_RANKS, variants=DTYPE_VARIANTS) -> Iterator[Launch]:
    """Every (kernel, signature, constexprs, options) the launchers can launch on a GPU, as Launch objects
    built by the launchers' own plan functions from placeholder tensors (never read). Per dtype variant:
    the row kernels for every R_PAD, block config and dropout flag; the GEMM kernels (whose code does not
    depend on r) for every block config, bias, dropout and (dx, dA) need."""
    yield _plan_mask(torch.empty((1, 1), dtype=torch.int8), 0, 1, 0.5)
    for xdt, adt, tf32 in variants:
        launches = itertools.chain(_aot_gemms(xdt, adt), *(_aot_row_kernels(xdt, adt, r) for r in ranks))
        for launch in launches:
            launch.constexprs.update(_dot_meta(xdt, allow_tf32=tf32))
            yield _label(launch, xdt, adt)


def _placeholders(xdt: torch.dtype, adt: torch.dtype, r: int) -> dict:
    M, K, N = 1, 32, 32
    shapes = {"x": (M, K, xdt), "w": (N, K, xdt), "g": (M, N, xdt), "y": (M, N, xdt), "a": (r, K, adt),
              "b": (N, r, adt), "u": (M, r, torch.float32), "db": (N, r, torch.float32), "da": (r, K, torch.float32)}
    out = {name: torch.empty((rows, cols), dtype=dt) for name, (rows, cols, dt) in shapes.items()}
    out["bias"], out["dbias"] = torch.empty(N, dtype=xdt), torch.empty(N)
    return out


def _aot_row_kernels(xdt: torch.dtype, adt: torch.dtype, r: int) -> Iterator[Launch]:
    t = _placeholders(xdt, adt, r)
    for cfg, p in itertools.product(block_configs("fwd_u", xdt), (0.0, 0.1)):
        yield _plan_fwd_u(t["x"], t["a"], t["u"], p, 1, cfg)
    for cfg in block_configs("bwd_g", xdt):
        yield _plan_bwd_g(t["g"], t["b"], t["u"], t["u"], t["db"], t["dbias"], 1.0, cfg)


def _aot_gemms(xdt: torch.dtype, adt: torch.dtype) -> Iterator[Launch]:
    t = _placeholders(xdt, adt, 16)
    for cfg, has_bias in itertools.product(block_configs("fwd_y", xdt), (False, True)):
        yield _plan_fwd_y(t["x"], t["w"], t["u"], t["b"], t["bias"] if has_bias else None, t["y"], 1.0, cfg)
    needs = ((True, True), (True, False), (False, True))  # (dx, dA); neither means no launch
    for cfg, p, (need_dx, need_da) in itertools.product(block_configs("bwd_dx", xdt), (0.0, 0.1), needs):
        dx, da32 = torch.empty_like(t["x"]) if need_dx else None, t["da"] if need_da else None
        yield _plan_bwd_dx(t["g"], t["w"], t["u"], t["a"], t["x"], dx, da32, p, 1, cfg)


def _label(launch: Launch, xdt, adt) -> Launch:
    """Appends the dtypes and every constexpr to the launch's label (one line of the AOT report)."""
    meta = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if not k.startswith("BLOCK"))
    launch.label = f"{launch.label} x={_TRITON_TYPES[xdt]} adapters={_TRITON_TYPES[adt]} {meta}"
    return launch


# ------------------------------------------------------------------------------------------ kernel report
def report_launches(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout: float, num_sms: int) -> list:
    """The launches of one forward and one backward (every gradient needed, no bias) at this shape, planned
    for a GPU with ``num_sms`` SMs, on placeholder tensors (torch.empty never touches the memory); the
    GEMMs carry the tile of their reference GEMM. For tools/kernel_report.py."""
    x, w, g = torch.empty((M, K), dtype=dtype), torch.empty((N, K), dtype=dtype), torch.empty((M, N), dtype=dtype)
    a, b = torch.empty((r, K), dtype=dtype), torch.empty((N, r), dtype=dtype)
    u, du = torch.empty((M, r)), torch.empty((M, r))
    dev = torch.device("cpu")
    fwd_y = _plan_fwd_y(x, w, u, b, None, torch.empty((M, N), dtype=dtype), 2.0,
                        pick_config("fwd_y", M, N, dtype, dev, num_sms))
    bwd_dx = _plan_bwd_dx(g, w, du, a, x, torch.empty_like(x), torch.empty((r, K)), dropout, 1,
                          pick_config("bwd_dx", M, K, dtype, dev, num_sms))
    launches = [
        _plan_fwd_u(x, a, u, dropout, 1, pick_config("fwd_u", M, r, dtype, dev, num_sms)), fwd_y,
        _plan_bwd_g(g, b, u, du, torch.empty((N, r)), torch.empty(N), 1.0, pick_config("bwd_g", M, r, dtype, dev,
                                                                                      num_sms)), bwd_dx]
    for launch, (m, n, k, b_kmajor) in ((fwd_y, (M, N, K, True)), (bwd_dx, (M, K, N, False))):
        meta = launch.constexprs
        block_n, block_k = (meta["BLOCK_N"], meta["BLOCK_K"]) if b_kmajor else (meta["BLOCK_K"], meta["BLOCK_N"])
        launch.role = "gemm"
        launch.reference = {"M": m, "N": n, "K": k, "block_m": meta["BLOCK_M"], "block_n": block_n,
                            "block_k": block_k, "group_m": meta["GROUP_M"], "num_warps": launch.num_warps,
                            "num_stages": launch.num_stages, "b_kmajor": b_kmajor, "tma": False,
                            "persistent": False}
    for launch in launches:
        launch.constexprs.update(_dot_meta(dtype, allow_tf32=False))
        launch.label = launch.label.split("/")[0]
    return launches
