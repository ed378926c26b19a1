"""Launchers of the fused LoRA linear Triton kernels (docs/lora_linear_spec.md).

    lora_linear_fwd(x, W, A, B, bias, s, p, seed)            -> y (M, N) x.dtype, u (M, r) float32
    lora_linear_bwd(g, x, W, A, B, u, s, p, seed, needs, norm=None)
                                                             -> dx (M, K), dA (r, K), dB (N, r), dbias (N,)
    dropout_keep_mask(M, K, seed, p, device)                 -> bool (M, K), the Triton Philox mask
    report_launches(M, K, N, r, dtype, p, num_sms)           -> the launches of one fwd + bwd at a shape
    aot_launches()                                           -> every kernel configuration the launchers launch

Forward: the u-pass (memory-bound over x; K split into slices summed in a fixed order when the row blocks
alone would not cover every SM), then the persistent GEMM whose accumulator takes s·u Bᵀ as r extra
K-steps. Backward: the g-pass (du, dB, dbias partials from one read of g), fixed-order reductions, the
persistent dgrad GEMM (du A as extra K-steps when p = 0), and the x-pass (dA partials; with dropout also
dx += D ⊙ (du A)). No atomics: every gradient is bitwise reproducible. See lora_linear_fwd.py,
lora_linear_bwd.py and lora_linear_plan.py (configurations and grids).

Each launcher asserts its own assumptions (the op layer validates user input), plans its launches with the
functions of lora_linear_plan.py (which the kernel report also uses, so it compiles exactly these) and runs
them in order on the current stream.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch

from .lora_linear_plan import (
    Launch, block_configs, bwd_g_chunks, bwd_x_chunks, dot_meta, fwd_u_splits, interpreting, lowrank_buffer,
    lowrank_operand, plan_bwd_dx, plan_bwd_g, plan_bwd_x, plan_fwd_u, plan_fwd_y, plan_mask, plan_reduce,
    sm_count)

Tensor = torch.Tensor
MAX_RANK = 128
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ------------------------------------------------------------------------------------------------ checks
def _check_operands(x, weight, lora_a, lora_b, bias, dtype=None) -> tuple[int, int, int, int]:
    """(M, K, N, r) after asserting the kernels' assumptions on shapes, dtypes and devices. ``dtype``: the op's
    input dtype when x is not that input itself (an RMSNorm's input, the op's input rebuilt in the kernel)."""
    dtype = x.dtype if dtype is None else dtype
    assert x.dim() == 2 and weight.dim() == 2 and lora_a.dim() == 2 and lora_b.dim() == 2, "2-D operands"
    (M, K), (N, r) = x.shape, lora_b.shape
    assert weight.shape == (N, K) and lora_a.shape == (r, K), (
        f"shape mismatch: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
        f"B {tuple(lora_b.shape)}")
    assert 1 <= r <= MAX_RANK, f"rank {r} outside [1, {MAX_RANK}] supported by the Triton kernels"
    assert dtype in ACTIVATION_DTYPES and weight.dtype == dtype, f"x {dtype}, W {weight.dtype}"
    assert lora_a.dtype == lora_b.dtype and lora_a.dtype in (dtype, torch.float32), (
        f"adapters {lora_a.dtype}/{lora_b.dtype} must be x's dtype {dtype} or float32")
    tensors = (x, weight, lora_a, lora_b) + (() if bias is None else (bias,))
    _check_devices(x.device, tensors)
    assert bias is None or (bias.shape == (N,) and bias.dtype == dtype), "bias (N,) in x's dtype"
    return M, K, N, r


def _check_norm(x, norm, dtype) -> None:
    """The in-kernel RMSNorm rebuild's operands (kernels/norm_tile.py): x the norm's input (M, K), rstd (M,)
    fp32, w (K,) in x's dtype, and the op's input ``dtype``: x's, or autocast's 16-bit copy of an fp32 x."""
    rstd, weight, form = norm
    M, K = x.shape
    assert form in ("llama", "gemma"), f"norm form {form!r}"
    assert rstd.shape == (M,) and rstd.dtype == torch.float32, f"rstd (M,) fp32: {rstd.dtype} {tuple(rstd.shape)}"
    assert weight.shape == (K,) and weight.dtype == x.dtype, f"norm weight {weight.dtype} {tuple(weight.shape)}"
    assert x.dtype == dtype or (x.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)), (
        f"norm input {x.dtype} rebuilt to {dtype}")
    _check_devices(x.device, (rstd, weight))


def _check_devices(device: torch.device, tensors) -> None:
    assert all(t.device == device for t in tensors), "all operands must be on one device"
    assert device.type == "cuda" or interpreting(), (
        f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before import (tensors are on {device})")


# ------------------------------------------------------------------------------------------------ plans
def plan_forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed, num_sms) -> tuple[list, Tensor, Tensor]:
    """(launches in order, y, u) of the forward; nothing runs. M > 0."""
    (M, K), (N, r) = x.shape, lora_b.shape
    lora_a, lora_b = lowrank_operand(lora_a, x.dtype), lowrank_operand(lora_b, x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, r), dtype=torch.float32, device=x.device)
    su = lowrank_buffer(M, r, x.dtype, x.device)  # s·u in x's dtype: the forward GEMM's extra K-steps
    u_part = torch.empty((fwd_u_splits(M, K, x.dtype, num_sms), M, r), dtype=torch.float32, device=x.device)
    launches = [plan_fwd_u(x, lora_a, u_part, dropout, seed, num_sms),
                plan_reduce(u_part, u, num_sms, "u", out2=su, scale2=scale)]
    if N > 0:
        launches.append(plan_fwd_y(x, weight, su, lora_b, bias, y, num_sms))
    return launches, y, u


def plan_backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs, num_sms,
                  norm=None) -> tuple[list, tuple]:
    """(launches in order, (dx, dA, dB, dbias) with None where not needed) of the backward; M > 0.

    dA and dB are computed when either is needed (and du when dx or dA is), because the kernels produce
    them together; what was not asked for is dropped. The op's input dtype is grad_y's (x's, unless ``norm``
    makes x an RMSNorm's input: see lora_linear_bwd)."""
    need_dx, need_da, need_db, need_dbias = needs
    (M, K), (N, r), dtype = x.shape, lora_b.shape, grad_y.dtype
    a_dtype, b_dtype = lora_a.dtype, lora_b.dtype
    lora_a, lora_b = lowrank_operand(lora_a, dtype), lowrank_operand(lora_b, dtype)
    lowrank = need_dx or need_da or need_db
    launches = []
    du, db, dbias = _plan_g_pass(launches, grad_y, lora_b, u, scale, lowrank, need_dbias, b_dtype, num_sms)
    dx = torch.empty((M, K), dtype=dtype, device=x.device) if need_dx else None
    if need_dx and N > 0 and K > 0:
        launches.append(plan_bwd_dx(grad_y, weight, du, lora_a, dx, dropout == 0, num_sms))
    elif need_dx:
        dx.zero_()  # N == 0 or K == 0: g W and du A are empty sums
    x_pass_dx = dx if need_dx and dropout > 0 and N > 0 else None
    da = _plan_x_pass(launches, x, du, lora_a, x_pass_dx, need_da or x_pass_dx is not None, dropout, seed,
                      a_dtype, num_sms, norm)
    return launches, (dx, da if need_da else None, db if need_db else None, dbias)


def _plan_g_pass(launches, grad_y, lora_b, u, scale, lowrank, need_dbias, b_dtype, num_sms):
    """Appends the g-pass and its reductions; returns (du in x's dtype, dB, dbias), None for what is not
    computed."""
    (M, N), r, dev = grad_y.shape, lora_b.shape[1], grad_y.device
    db = torch.empty((N, r), dtype=b_dtype, device=dev) if lowrank else None
    dbias = torch.empty((N,), dtype=grad_y.dtype, device=dev) if need_dbias else None
    du = lowrank_buffer(M, r, grad_y.dtype, dev) if lowrank else None
    if N == 0 or not (lowrank or need_dbias):
        return (du.zero_() if lowrank else None), (db.zero_() if lowrank else None), dbias
    cols, chunks, rows_per_chunk = bwd_g_chunks(M, N, r if lowrank else 1, grad_y.dtype, num_sms)
    f32 = {"dtype": torch.float32, "device": dev}
    du_part = torch.empty((cols, M, r), **f32) if lowrank else None
    db_part = torch.empty((chunks, N, r), **f32) if lowrank else None
    dbias_part = torch.empty((chunks, N), **f32) if need_dbias else None
    launches.append(plan_bwd_g(grad_y, lora_b, u, du_part, db_part, dbias_part, scale, rows_per_chunk))
    if lowrank:
        launches.append(plan_reduce(du_part, du, num_sms, "du"))
        launches.append(plan_reduce(db_part, db, num_sms, "dB"))
    if need_dbias:
        launches.append(plan_reduce(dbias_part, dbias, num_sms, "dbias"))
    return du, db, dbias


def _plan_x_pass(launches, x, du, lora_a, dx, run, dropout, seed, a_dtype, num_sms,
                 norm=None) -> Optional[Tensor]:
    """Appends the x-pass (dA partials; dx += D ⊙ (du A) when dx is given) and dA's reduction; returns dA
    (zeros when K == 0), or None when ``run`` is False."""
    (M, K), r = x.shape, lora_a.shape[0]
    if not run:
        return None
    da = torch.empty((r, K), dtype=a_dtype, device=x.device)
    if K == 0 or M == 0:
        return da.zero_()
    _, chunks, rows_per_chunk = bwd_x_chunks(M, K, du.dtype, num_sms)
    da_part = torch.empty((chunks, r, K), dtype=torch.float32, device=x.device)
    launches.append(plan_bwd_x(x, du, lora_a, dx, da_part, dropout, seed, rows_per_chunk, norm))
    launches.append(plan_reduce(da_part, da, num_sms, "dA"))
    return da


# --------------------------------------------------------------------------------------------- launchers
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                    scale: float, dropout: float, seed: int) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + s·u Bᵀ + bias and u = x̃ Aᵀ, x̃ = D ⊙ x with D from Philox(seed).

    x (M, K) any strides (never copied; TMA loads when its rows are 16-byte aligned and contiguous, masked
    pointer loads otherwise), weight (N, K), lora_a (r, K), lora_b (N, r), bias (N,) or None.
    Returns y (M, N) contiguous in x.dtype and u (M, r) float32 contiguous (saved for backward).
    """
    M, K, N, r = _check_operands(x, weight, lora_a, lora_b, bias)
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device), torch.empty((0, r), device=x.device)
    launches, y, u = plan_forward(x, weight, lora_a, lora_b, bias, scale, dropout, seed, sm_count(x.device))
    for launch in launches:
        launch.run()
    return y, u


def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
                    scale: float, dropout: float, seed: int, needs: tuple[bool, bool, bool, bool],
                    norm: Optional[tuple[Tensor, Tensor, str]] = None
                    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of the fused LoRA linear; ``needs`` = (dx, dA, dB, dbias), None where not needed.

    grad_y g (M, N) any strides, u (M, r) float32 from the forward. With du = s·g B (M, r, fp32, the only
    intermediate): dx = g W + D ⊙ (du A) in x.dtype (M, K); dA = duᵀ x̃ in lora_a.dtype (r, K);
    dB = s·gᵀ u in lora_b.dtype (N, r); dbias = Σ_m g in x.dtype (N,). No dW. Bitwise reproducible.

    ``norm`` = (rstd (M,) fp32, w (K,), "llama" | "gemma"): the op's input was that RMSNorm's output of x
    (then cast to grad_y's dtype, autocast's copy, when x is fp32 and g fp16/bf16). The x-pass rebuilds it
    tile by tile in its loads (norm_tile.py), bit for bit, so no (M, K) normed tensor is made; the outputs
    are in grad_y's dtype, the op's input dtype.
    """
    needs = tuple(bool(n) for n in needs)
    M, K, N, r = _check_operands(x, weight, lora_a, lora_b, None, dtype=grad_y.dtype)
    assert norm is not None or grad_y.dtype == x.dtype, f"grad_y {grad_y.dtype}, x {x.dtype}"
    if norm is not None:
        _check_norm(x, norm, grad_y.dtype)
    assert grad_y.shape == (M, N), f"grad_y {tuple(grad_y.shape)}"
    assert u.shape == (M, r) and u.dtype == torch.float32, f"u must be float32 (M, r): {u.dtype} {tuple(u.shape)}"
    _check_devices(x.device, (grad_y, u))
    if M == 0:
        return _empty_batch_grads(x, lora_a, lora_b, needs, grad_y.dtype)
    launches, grads = plan_backward(grad_y, x, weight, lora_a, lora_b, u, scale, dropout, seed, needs,
                                    sm_count(x.device), norm)
    for launch in launches:
        launch.run()
    return grads


def _empty_batch_grads(x, lora_a, lora_b, needs, dtype=None):
    """M = 0: dx is empty and the parameter gradients are sums over no rows (zeros); ``dtype``: the op's
    input dtype when x is not that input (an RMSNorm's input), else x's."""
    K, (N, r), dtype = x.shape[1], lora_b.shape, x.dtype if dtype is None else dtype
    shapes = ((0, K), (r, K), (N, r), (N,))
    dtypes = (dtype, lora_a.dtype, lora_b.dtype, dtype)
    return tuple(torch.zeros(s, dtype=d, device=x.device) if n else None for s, d, n in zip(shapes, dtypes, needs))


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
        plan_mask(out, row_offset, seed, dropout).run()
    return out.bool()


# ------------------------------------------------------------------------------------------ kernel report
def report_launches(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout: float, num_sms: int) -> list:
    """The launches of one forward and one backward (dx, dA and dB needed; no bias, as in most LLM layers)
    at this shape, planned for a GPU with ``num_sms`` SMs on placeholder tensors (torch.empty never touches
    the memory). Nothing runs. For tools/kernel_report.py."""
    x, w = torch.empty((M, K), dtype=dtype), torch.empty((N, K), dtype=dtype)
    a, b, g = torch.empty((r, K), dtype=dtype), torch.empty((N, r), dtype=dtype), torch.empty((M, N), dtype=dtype)
    fwd, _, u = plan_forward(x, w, a, b, None, 2.0, dropout, 1, num_sms)
    bwd, _ = plan_backward(g, x, w, a, b, u, 2.0, dropout, 1, (True, True, True, False), num_sms)
    launches = fwd + bwd + list(_norm_x_passes(g, x, w, a, b, u, dropout, num_sms))
    for launch in launches:
        if "DOT_PRECISION" in launch.constexprs:
            launch.constexprs.update(dot_meta(dtype, allow_tf32=False))
    return launches


def norm_sources(dtype: torch.dtype) -> tuple:
    """(norm input dtype, form) of every in-kernel RMSNorm rebuild of an op input in ``dtype``: the norm in
    that dtype, and for 16-bit inputs also autocast's copy of an fp32 norm's output."""
    sources = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
    return tuple(itertools.product(sources, ("llama", "gemma")))


def _norm_x_passes(g, x, w, a, b, u, dropout, num_sms) -> Iterator[Launch]:
    """The x-pass of the backward above with its input an RMSNorm's output rebuilt in its loads, per
    (norm input dtype, form); x's layout is kept."""
    (M, K), dtype = x.shape, x.dtype
    for source, form in norm_sources(dtype):
        x_in = torch.empty_strided(x.shape, x.stride(), dtype=source)
        norm = (torch.empty(M), torch.empty(K, dtype=source), form)
        bwd, _ = plan_backward(g, x_in, w, a, b, u, 2.0, dropout, 1, (True, True, True, False), num_sms, norm)
        for launch in bwd:
            if launch.label == "bwd_x":
                launch.label = f"bwd_x (rms {form}, {_TRITON_TYPES[source]} norm input)"
                yield launch


# ----------------------------------------------------------------------------------------- AOT coverage
DTYPE_VARIANTS = ((torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False))
AOT_RANKS = (16, 32, 64, 128)  # one per R_PAD


def aot_launches(ranks=AOT_RANKS, variants=DTYPE_VARIANTS, num_sms: int = 132) -> Iterator[Launch]:
    """Every (kernel, signature, constexprs, options) the launchers can launch on a GPU, planned by the
    launchers' own functions on placeholder tensors: per x dtype (fp32 with and without TF32) and for TMA
    and pointer operands, the GEMMs for both tiles, bias and low-rank flags; the passes for every R_PAD,
    dropout on/off and K % 4 (the mask's two paths), every flag; the reductions and the mask kernel; and
    a whole forward and backward at M = 1, r = 1 (bf16, fp32), which the JIT compiles as constants. The x-pass
    also for each in-kernel RMSNorm rebuild (NORM: both forms, the norm input in x's dtype or fp32).
    (Adapters in fp32 are cast to x's dtype by the launchers, so they add no variant.)"""
    yield plan_mask(torch.empty((1, 4), dtype=torch.int8), 0, 1, 0.5)
    yield plan_mask(torch.empty((1, 3), dtype=torch.int8), 0, 1, 0.5)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        yield _label(plan_reduce(torch.empty((2, 4, 8)), torch.empty((4, 8), dtype=out_dtype), num_sms, ""), out_dtype)
        yield _label(plan_reduce(torch.empty((2, 4, 8)), torch.empty((4, 8)), num_sms, "",
                                 out2=torch.empty((4, 8), dtype=out_dtype)), out_dtype)
    for dtype in (torch.bfloat16, torch.float32):  # the JIT turns M = 1 and r = 1 into constants
        yield from (_label(launch, dtype) for launch in _aot_ones(dtype, num_sms))
    for (dtype, tf32), tma in itertools.product(variants, (True, False)):
        launches = itertools.chain(_aot_gemms(dtype, tma, num_sms),
                                   *(_aot_passes(dtype, tma, r, num_sms) for r in ranks))
        for launch in launches:
            if "DOT_PRECISION" in launch.constexprs:
                launch.constexprs.update(dot_meta(dtype, allow_tf32=tf32))
            assert launch.constexprs.get("TMA", tma) == tma, launch.label
            yield _label(launch, dtype)


def _aot_ones(dtype, num_sms) -> Iterator[Launch]:
    """The launches of a forward and backward with M = 1 and r = 1 (values the JIT specialises as
    constants, so they compile code no other placeholder reaches), with and without dropout and bias."""
    x, w = torch.empty((1, 64), dtype=dtype), torch.empty((48, 64), dtype=dtype)
    a, b, g = torch.empty((1, 64), dtype=dtype), torch.empty((48, 1), dtype=dtype), torch.empty((1, 48), dtype=dtype)
    for p, bias in ((0.0, None), (0.1, torch.empty(48, dtype=dtype))):
        fwd, _, u = plan_forward(x, w, a, b, bias, 2.0, p, 1, num_sms)
        bwd, _ = plan_backward(g, x, w, a, b, u, 2.0, p, 1, (True, True, True, bias is not None), num_sms)
        for launch in fwd + bwd + list(_norm_x_passes(g, x, w, a, b, u, p, num_sms)):
            if "DOT_PRECISION" in launch.constexprs:
                launch.constexprs.update(dot_meta(dtype, allow_tf32=False))
            launch.label += " (M=1 r=1)"
            yield launch


def _placeholders(dtype: torch.dtype, r: int, K: int, tma: bool) -> dict:
    """Small tensors of every operand; with tma=False, x and g are column-major views (pointer path)."""
    M, N = 40, 48
    t = {"w": torch.empty((N, K), dtype=dtype), "a": torch.empty((r, K), dtype=dtype),
         "b": torch.empty((N, r), dtype=dtype), "u": torch.empty((M, r)), "du": torch.empty((M, r), dtype=dtype),
         "bias": torch.empty(N, dtype=dtype)}
    t["x"] = torch.empty((M, K), dtype=dtype) if tma else torch.empty((K, M), dtype=dtype).t()
    t["g"] = torch.empty((M, N), dtype=dtype) if tma else torch.empty((N, M), dtype=dtype).t()
    t["y"], t["dx"] = torch.empty((M, N), dtype=dtype), torch.empty((M, K), dtype=dtype)
    if not tma:
        t["y"], t["dx"] = t["y"].t().contiguous().t(), t["dx"].t().contiguous().t()
    return t


def _aot_gemms(dtype, tma, num_sms) -> Iterator[Launch]:
    t = _placeholders(dtype, 16, 64, tma)
    for sms, has_bias in itertools.product((1, 10**6), (False, True)):  # sms=1: wide tile; huge: narrow
        yield plan_fwd_y(t["x"], t["w"], t["du"], t["b"], t["bias"] if has_bias else None, t["y"], sms)
    for sms, lowrank in itertools.product((1, 10**6), (False, True)):
        yield plan_bwd_dx(t["g"], t["w"], t["du"], t["a"], t["dx"], lowrank, sms)


def _aot_passes(dtype, tma, r, num_sms) -> Iterator[Launch]:
    # K % 4 != 0 (the mask's one-word path) makes rows unaligned for TMA, so it exists only with pointers
    for K, p in ((64, 0.0), (64, 0.1)) + (() if tma else ((63, 0.1),)):
        t = _placeholders(dtype, r, K, tma)
        yield plan_fwd_u(t["x"], t["a"], torch.empty((2, t["x"].shape[0], r)), p, 1, num_sms)
        for dx in ((None, t["dx"]) if p > 0 else (None,)):
            yield plan_bwd_x(t["x"], t["du"], t["a"], dx, torch.empty((2, r, K)), p, 1, 32)
            for source, form in norm_sources(dtype):  # the op's input rebuilt from an RMSNorm's in the loads
                x_in = torch.empty_strided(t["x"].shape, t["x"].stride(), dtype=source)
                norm = (torch.empty(x_in.shape[0]), torch.empty(K, dtype=source), form)
                launch = plan_bwd_x(x_in, t["du"], t["a"], dx, torch.empty((2, r, K)), p, 1, 32, norm)
                launch.label += f" norm_x={_TRITON_TYPES[source]}"
                yield launch
    t = _placeholders(dtype, r, 64, tma)
    parts = {"du": torch.empty((2, 40, r)), "db": torch.empty((2, 48, r)), "dbias": torch.empty((2, 48))}
    for lowrank, dbias in ((True, False), (True, True), (False, True)):
        if lowrank or r == AOT_RANKS[0]:  # without the low-rank terms R_PAD is fixed: one variant
            yield plan_bwd_g(t["g"], t["b"], t["u"], parts["du"] if lowrank else None,
                             parts["db"] if lowrank else None, parts["dbias"] if dbias else None, 1.0, 64)


def _label(launch: Launch, dtype: torch.dtype) -> Launch:
    """Appends the dtype and every constexpr to the launch's label (one line of the report)."""
    meta = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if not k.startswith(("BLOCK", "DOT_DTYPE")))
    launch.label = f"{launch.label} x={_TRITON_TYPES[dtype]} {launch.config_text()} {meta}"
    return launch
