"""Grouped LoRA projections on quantized frozen weights, Triton: the dense grouped passes around the dequantizing GEMMs.

    qgrouped_fwd(x, projections, weights)                       -> [y_i (M, N_i)], [u_i (M, r_i) float32]
    qgrouped_bwd(grads, x, projections, weights, us, needs, norm=None) -> dx, [dA_i], [dB_i], [dbias_i]

``projections``: ``GroupedProjection`` (A_i, B_i, bias_i, s_i, p_i, seed_i; weight unused), ``weights``: one
``StoredWeight`` per projection (its stored tensors with the code books, its format, its block size); P ≤
``MAX_PROJECTIONS`` (the grouped u pass has three slots). The math is ``lowcost.reference.lora_grouped_linear``'s.

forward:  u_i, su_i = s_i·u_i for every i        the dense grouped u pass (kernels/lora_grouped_linear.py
                                                  ``plan_u_pass``): ONE read of x, each tile masked per projection
          y_i = x deq(W_i)ᵀ + su_i B_iᵀ + b_i    the dequantizing forward GEMM (kernels/qlora_linear.py), per i
backward: du_i = s_i·g_i B_i, dB_i, db_i         the LoRA-linear g-pass, per projection
          dx  = g_0 deq(W_0) (+ du_0 A_0)         the dequantizing dgrad: the first launch stores its tile,
          dx += g_i deq(W_i) (+ du_i A_i)         every later one accumulates into it (ACCUMULATE); du_i A_i
                                                  inline where p_i = 0
          dx += D_i ⊙ (du_i A_i), dA_i            p_i > 0: the LoRA-linear x-pass of that projection (its mask
                                                  is generated where its dA_i is made), as qlora_linear does
          dA_i for every p_i = 0 projection       the dense grouped dA pass over those projections: ONE read of x

So x is read once in the forward and, in the backward, once for the unmasked projections plus once per
projection with dropout (whose x-pass also adds its masked term into dx). With ``norm``, x is an RMSNorm's input
and both passes that read it (the x-passes and the dA pass) rebuild the op's input in their loads
(kernels/norm_tile.py), so no (M, K) normed tensor exists in backward. Each projection's mask is Philox from
its own seed, the stream of ``qlora_linear``: the dropped elements are those of P separate calls.

dx stays in x's dtype between the accumulating launches: in 16 bits each launch after the first, and each
x-pass, rounds the running sum once (P - 1 + #dropout roundings), as the sum of P unfused
``qlora_linear(backend='triton')`` dx's does; the torch backend keeps an fp32 accumulator instead. Saved for
backward: the op layer keeps x once, the u_i, the seeds and the stored tensors; nothing here is cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .fused_launches import _Projection, _report_precision
from .lora_grouped_linear import MAX_PROJECTIONS, plan_da_pass, plan_g_passes, plan_u_pass
from .lora_linear import _check_norm, _plan_x_pass
from .lora_linear_plan import Launch, lowrank_operand, sm_count
from .qlora_dequant import FORMAT_IDS
from .qlora_linear import _aot_label, _check, _placeholder_weight, plan_qbwd_dx, plan_qfwd_y, quant_args

Tensor = torch.Tensor


@dataclass
class StoredWeight:
    """One quantized W_i (N_i, K): its stored tensors followed by the code books (``quant_args``), format, block."""
    packed: list
    scheme: str
    block_size: int


def _check_group(x: Tensor, projections, weights) -> None:
    """The launchers' assumptions (the op validates user input and runs M = 0 or K = 0 on torch: no tiles)."""
    assert 1 <= len(projections) == len(weights) <= MAX_PROJECTIONS, f"P={len(projections)}"
    assert x.shape[0] > 0 and x.shape[1] > 0, "M > 0 and K > 0"
    for w in weights:
        _check(x, w.packed, w.scheme)


def plan_forward(x, projections, weights, num_sms) -> tuple[list, list, list]:
    """(launches, [y_i (M, N_i) x.dtype], [u_i (M, r_i) fp32]): the grouped u pass, then one dequantizing y
    GEMM per projection (none where N_i = 0)."""
    u_launch, us, sus = plan_u_pass(x, projections)
    ys = [torch.empty((x.shape[0], p.lora_b.shape[0]), dtype=x.dtype, device=x.device) for p in projections]
    launches = [u_launch]
    for p, w, su, y in zip(projections, weights, sus, ys):
        if y.shape[1] > 0:
            launches.append(plan_qfwd_y(x, quant_args(w.packed, w.scheme), y.shape[1], w.block_size, su,
                                        lowrank_operand(p.lora_b, x.dtype), p.bias, y, num_sms))
    return launches, ys, us


def _plan_dx_gemms(launches, grads, weights, dus, lora_as, projections, dx, num_sms) -> None:
    """dx = Σ_i g_i deq(W_i) (+ du_i A_i where p_i = 0): the first launch stores, the later ones accumulate;
    dx zeroed when no projection has a row (every N_i = 0)."""
    K, started = dx.shape[1], False
    for g, w, du, a, p in zip(grads, weights, dus, lora_as, projections):
        if g.shape[1] == 0:
            continue
        inline = p.dropout == 0
        launches.append(plan_qbwd_dx(g, quant_args(w.packed, w.scheme), K, w.block_size, du if inline else None,
                                     a if inline else None, dx, num_sms, accumulate=started))
        started = True
    if not started:
        dx.zero_()


def _plan_da(launches, x, dus, lora_as, projections, dx, need_da, num_sms, norm=None) -> list:
    """[dA_i] (None where not computed): an x-pass per projection with dropout (adding its masked term into dx
    when dx is given), the grouped dA pass over the others (one read of x) when dA is needed; ``norm``: both
    rebuild the op's input from the RMSNorm's x in their loads (see qgrouped_bwd)."""
    das = [None] * len(projections)
    for i, (du, a, p) in enumerate(zip(dus, lora_as, projections)):
        if p.dropout > 0:
            das[i] = _plan_x_pass(launches, x, du, a, dx, need_da or dx is not None, p.dropout, p.seed,
                                  p.lora_a.dtype, num_sms, norm)
    plain = [i for i, p in enumerate(projections) if p.dropout == 0]
    if need_da and plain:
        plain_das = plan_da_pass(launches, x, [dus[i] for i in plain], [projections[i] for i in plain], num_sms,
                                 norm)
        for i, da in zip(plain, plain_das):
            das[i] = da
    return das


def plan_backward(grads, x, projections, weights, us, needs, num_sms, norm=None) -> tuple[list, tuple]:
    """(launches, (dx, [dA_i], [dB_i], [dbias_i])) with None where not needed. Order: the g-passes (they write
    the du_i), the dgrad GEMMs (dx's dense part), then the x-passes (they add into dx) and the dA pass. The op's
    input dtype is the grads' (x's, unless ``norm`` makes x an RMSNorm's input: see qgrouped_bwd)."""
    need_dx, need_da = needs[0], needs[1]
    (M, K), dtype = x.shape, grads[0].dtype
    lora_as = [lowrank_operand(p.lora_a, dtype) for p in projections]
    launches = []
    dus, dbs, dbiases = plan_g_passes(launches, grads, x, projections, us, needs, num_sms)
    dx = torch.empty((M, K), dtype=dtype, device=x.device) if need_dx else None
    if need_dx:
        _plan_dx_gemms(launches, grads, weights, dus, lora_as, projections, dx, num_sms)
    das = _plan_da(launches, x, dus, lora_as, projections, dx, need_da, num_sms, norm)
    return launches, (dx, das if need_da else [None] * len(projections), dbs, dbiases)


def qgrouped_fwd(x: Tensor, projections, weights: Sequence[StoredWeight]) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i (M, N_i) in x's dtype], [u_i (M, r_i) float32]) for x (M, K), M > 0 and K > 0."""
    _check_group(x, projections, weights)
    launches, ys, us = plan_forward(x, projections, weights, sm_count(x.device))
    for launch in launches:
        launch.run()
    return ys, us


def qgrouped_bwd(grads: Sequence[Tensor], x: Tensor, projections, weights: Sequence[StoredWeight],
                 us: Sequence[Tensor], needs: tuple, norm=None) -> tuple[Optional[Tensor], list, list, list]:
    """(dx, [dA_i], [dB_i], [dbias_i]) as ``lowcost.reference.lora_grouped_linear.grouped_backward`` defines
    them; fixed-order sums and no atomics (bitwise reproducible). ``norm`` = (rstd (M,) fp32, w (K,), form): the
    op's input was that RMSNorm's output of x (or autocast's copy of it in the grads' dtype), rebuilt in the
    loads of the passes that read it, as in ``lora_linear_bwd``; the outputs are then in the grads' dtype."""
    _check_group(x, projections, weights)
    dtype = grads[0].dtype if norm is not None else x.dtype
    if norm is not None:
        _check_norm(x, norm, dtype)
    assert all(g.dtype == dtype and g.shape[0] == x.shape[0] for g in grads), "grads (M, N_i) in the input's dtype"
    launches, outputs = plan_backward(grads, x, projections, weights, us, tuple(bool(n) for n in needs),
                                      sm_count(x.device), norm)
    for launch in launches:
        launch.run()
    return outputs


# ----------------------------------------------------------------------------------------- kernel report
PROJECTION_NAMES = ("q", "k", "v")


def report_launches(scheme: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, p: float,
                    num_sms: int) -> list[Launch]:
    """Every launch of one forward + backward (dx and every dA needed) of the grouped q/k/v projections on
    ``scheme`` weights at tokens M, hidden K, rank r and dropout p each: q (N, K), k and v (N/4, K) (Llama-3-8B's
    grouped-query attention). Planned by ``plan_forward`` / ``plan_backward`` on placeholders (nothing runs).

    Labels: a launch made once per projection names it ("bwd_g (k)"); the dequantizing GEMMs also name the
    format ("qfwd_y nf4 (q)"), and the dgrads after the first say ACCUMULATE ("qbwd_dx nf4 (k, ACCUMULATE)":
    dx += g_k deq(W_k) after the GEMM loop)."""
    x = torch.empty((M, K), dtype=dtype)
    outs = (N, max(1, N // 4), max(1, N // 4))
    projections = [_Projection(None, torch.empty((r, K), dtype=dtype), torch.empty((n, r), dtype=dtype), 2.0, p, 1 + i)
                   for i, n in enumerate(outs)]
    weights = [StoredWeight(_placeholder_weight(scheme, n, K), scheme, 64) for n in outs]
    fwd, ys, us = plan_forward(x, projections, weights, num_sms)
    bwd, _ = plan_backward([torch.empty_like(y) for y in ys], x, projections, weights, us, (True, True, True, False),
                           num_sms)
    return _report_precision(_name_projections(fwd + bwd, scheme), dtype)


def _name_projections(launches: list, scheme: str) -> list:
    """Appends the projection to each label made once per projection (the planners loop over q, k, v in order,
    so the i-th such launch is projection i's), the format to the dequantizing GEMMs, ACCUMULATE to the dgrads
    that add into dx. A label made neither once nor once per projection is a planner this does not know."""
    seen: dict = {}
    for launch in launches:
        seen.setdefault(launch.label, []).append(launch)
    for label, same in seen.items():
        assert len(same) in (1, len(PROJECTION_NAMES)), f"{label}: {len(same)} launches, not 1 or one per projection"
        for name, launch in zip(PROJECTION_NAMES if len(same) > 1 else ("",), same):
            tags = [name] * bool(name) + ["ACCUMULATE"] * bool(launch.constexprs.get("ACCUMULATE"))
            fmt = f" {scheme}" if "FMT" in launch.constexprs else ""
            launch.label = f"{label}{fmt}" + (f" ({', '.join(tags)})" if tags else "")
    return launches


def aot_launches(dtypes=(torch.bfloat16, torch.float16, torch.float32), num_sms: int = 132):
    """The configurations only this op launches: the dequantizing dgrad with ACCUMULATE (every other launch of
    the op is the dequantizing GEMMs', the dense grouped passes' or the LoRA-linear passes', compiled by their
    modules' ``aot_launches``). ACCUMULATE adds the dx tile after the GEMM loop, independent of the decode: both
    tiles (wide and narrow) with and without the du A steps for every x dtype on nf4, and every other format
    once (bf16, wide tile, du A steps)."""
    cases = [("nf4", d, m, lowrank) for d in dtypes for m in (4096, 64) for lowrank in (False, True)]
    cases += [(s, torch.bfloat16, 4096, True) for s in FORMAT_IDS if s != "nf4" and torch.bfloat16 in dtypes]
    K = 4096
    for scheme, dtype, m, lowrank in cases:
        qargs = quant_args(_placeholder_weight(scheme, m, K), scheme)
        g, dx = torch.empty((m, m), dtype=dtype), torch.empty((m, K), dtype=dtype)
        du, a = torch.empty((m, 16), dtype=dtype), torch.empty((16, K), dtype=dtype)
        launch = plan_qbwd_dx(g, qargs, K, 64, du if lowrank else None, a if lowrank else None, dx, num_sms,
                              accumulate=True)
        launch = _aot_label(launch, scheme, dtype)
        launch.label += " ACCUMULATE"
        yield launch
