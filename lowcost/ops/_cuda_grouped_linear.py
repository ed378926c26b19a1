"""The ``cuda`` backend of ``lowcost.ops.lora_grouped_linear``: per projection the LoRA linear's CUDA composition
(``_cuda_backend``: the ``lowcost._C`` ops ``lora_down``, ``lora_up``, ``lora_grad_pass``, ``lora_dx_da`` around
cuBLAS GEMMs), with one dx accumulator shared by the P projections.

forward:  y_i, u_i = _cuda_backend.forward(x, W_i, A_i, B_i, b_i, s_i, p_i, seed_i)     for i = 0 … P-1
          (u_i = lora_down(x, A_i) (M, r_i) fp32; c_i = lora_up(u_i, B_i, b_i); y_i = c_i + x W_iᵀ, beta = 1)
backward: du_i, dB_i, db_i = lora_grad_pass(g_i, u_i, B_i)          one read of g_i
          t_i, dA_i = lora_dx_da(x, du_i, A_i, seed_i, p_i)       t_i = D_i ⊙ (du_i A_i), dA_i = du_iᵀ (D_i ⊙ x)
          dx = t_0 + g_0 W_0                                       cuBLAS beta = 1 in place on t_0: t_0 IS dx
          dx += g_i W_i ; dx += t_i                                i ≥ 1: addmm_ (beta = 1), then one add

Transient (M, K) buffers on this per-projection path: besides dx, one t_i at a time (i ≥ 1), freed once added. ``lora_dx_da`` allocates the
low-rank term itself (it generates D_i inside, once for t_i and dA_i) and has no operand to add into, so a
term per projection after the first is what it forces; the dense terms g_i W_i never get a buffer of their own
(``addmm_`` into dx). No dx per projection is summed afterwards and no (M, K) buffer is zeroed.

Without dropout on any projection (and one adapter dtype) every projection reads the same unmasked x, so the
passes over x are shared through the stacked adapters [A_0; A_1; …] (Σr_i, K), an adapter-sized copy:
forward:  [u_0 u_1 …] = lora_down(x, [A_0; A_1; …])                one read of x for all projections
backward: dx, [dA_0; dA_1; …] = lora_dx_da(x, [du_0 du_1 …], [A_0; A_1; …])   Σ_i du_i A_i starts dx (no t_i
          transient), every dA_i from one read of x; then dx += g_i W_i by addmm_ for each i.
With dropout on any projection (one adapter dtype, at most ``MAX_GROUPED_DOWN`` = 8 projections) the forward still
reads x once: ``lora_down_grouped`` stages each x tile once and masks it per projection (D_i from seed_i and p_i,
into a second tile; a projection without dropout multiplies the staged tile), as the Triton kernels do:
forward:  [u_0 u_1 …] = lora_down_grouped(x, [A_0; A_1; …], [r_i], [seed_i], [p_i])    u_i = (D_i ⊙ x) A_iᵀ
          bitwise the P separate lora_down calls (every r_i ≤ 64 on CUDA; the C++ CPU kernel always).
The backward with dropout reads x once too (dx asked, same conditions, and the r_i rounded up to 16 summing to at
most ``MAX_GROUPED_DX_DA_ROWS`` = 256): ``lora_dx_da_grouped`` stages each x tile once and, per projection, draws D_i
for both of its terms:
backward: dx, [dA_0; dA_1; …] = lora_dx_da_grouped(x, [du_0 du_1 …], [A_0; A_1; …], [r_i], [seed_i], [p_i])
          dx = Σ_i D_i ⊙ (du_i A_i) summed in fp32 in projection order, rounded once (no t_i transient), every
          dA_i = du_iᵀ (D_i ⊙ x) bitwise lora_dx_da's (every r_i ≤ 64 on CUDA; the C++ CPU kernel always);
          then dx += g_i W_i by addmm_ for each i.
Otherwise (mixed adapter dtypes, more projections or larger ranks, or dA without dx) the backward keeps one
lora_dx_da per projection as described first. Mixed adapter dtypes keep the per-projection forward as well.

dx is in x's dtype throughout (the GEMM's C operand): in 16 bits each of its adds rounds once: 2P - 1 of them on
the per-projection path (each t_i itself rounded once), as the sum of P unfused ``lora_linear(backend='cuda')`` dx's
does; P (the addmm_) on the stacked and the grouped dropout paths, whose low-rank sum is rounded once before them.
The torch backend keeps an fp32 accumulator instead.

Each projection draws its mask from its own seed with the Philox ops of ``lora_linear(backend='cuda')``, so the
dropped elements are those of P separate ``lora_linear`` calls. The autograd op (``lowcost.ops.
lora_grouped_linear``) saves x once, the u_i and the seeds, as for the other backends; this module only
computes. The ops have C++ CPU kernels, so the composition also runs, and is tested, on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lowcost.ops import _cuda_backend
from lowcost.reference.lora_grouped_linear import GroupedProjection

Tensor = torch.Tensor
ops = torch.ops.lowcost


MAX_GROUPED_DOWN = 8   # lowcost._C's kMaxGroupedProjections: the most projections one lora_down_grouped takes
MAX_GROUPED_DX_DA_ROWS = 256   # lowcost._C's kMaxGroupedDxDaRows: the most Σ_i ceil(r_i / 16)·16 of lora_dx_da_grouped


def _stackable(projections: Sequence[GroupedProjection]) -> bool:
    """True when the projections can share every pass over x: more than one, no dropout on any (so every one reads
    the same unmasked x) and one adapter dtype (so their A_i concatenate into one (Σr_i, K) operand)."""
    return (len(projections) > 1 and all(p.dropout == 0.0 for p in projections)
            and len({p.lora_a.dtype for p in projections}) == 1)


def _grouped_down(projections: Sequence[GroupedProjection]) -> bool:
    """True when the forward's lora_down of every projection is one ``lora_down_grouped`` over x: more than one
    projection (at most MAX_GROUPED_DOWN), dropout on some (else ``_stackable``) and one adapter dtype."""
    return (1 < len(projections) <= MAX_GROUPED_DOWN and any(p.dropout != 0.0 for p in projections)
            and len({p.lora_a.dtype for p in projections}) == 1)


def grouped_dx_da(lora_as: Sequence[Tensor], dropouts: Sequence[float]) -> bool:
    """True when the backward's low-rank terms with dropout are one ``lora_dx_da_grouped`` over x (when dx is
    asked): ``_grouped_down``'s conditions (given the A_i and the p_i) and the r_i rounded up to 16 summing to at most
    MAX_GROUPED_DX_DA_ROWS."""
    return (1 < len(lora_as) <= MAX_GROUPED_DOWN and any(p != 0.0 for p in dropouts)
            and len({a.dtype for a in lora_as}) == 1
            and sum(-(-a.shape[0] // 16) * 16 for a in lora_as) <= MAX_GROUPED_DX_DA_ROWS)


def transient_low_rank_terms(lora_as: Sequence[Tensor], dropouts: Sequence[float], need_dx: bool) -> int:
    """How many (M, K) buffers the backward holds besides dx at once: one t_i (the per-projection path with dropout
    and P > 1, dx asked), else none (the stacked and the grouped dropout paths start dx with the low-rank sum)."""
    per_projection = any(p != 0.0 for p in dropouts) and not grouped_dx_da(lora_as, dropouts)
    return int(need_dx and len(lora_as) > 1 and per_projection)


def _ranks(projections: Sequence[GroupedProjection]) -> list[int]:
    return [p.lora_a.shape[0] for p in projections]


def _stacked_a(projections: Sequence[GroupedProjection]) -> Tensor:
    """[A_0; A_1; …] (Σr_i, K): adapter-sized, copied per call."""
    return torch.cat([p.lora_a for p in projections])


def _bases(projections: Sequence[GroupedProjection], bases: Optional[Sequence]) -> list:
    """Per projection (add_base, add_base_dgrad): ``bases`` as given (a quantized W: ``_cuda_backend.quant_base``),
    else each dense W's cuBLAS steps (``_cuda_backend.dense_base``)."""
    return list(bases) if bases is not None else [_cuda_backend.dense_base(p.weight) for p in projections]


def grouped_fwd(x: Tensor, projections: Sequence[GroupedProjection], bases: Optional[Sequence] = None
                ) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i (M, N_i) in x.dtype], [u_i (M, r_i) float32]) for x (M, K). ``bases``: per projection
    (add_base, add_base_dgrad) (``_cuda_backend.dense_base`` / ``quant_base``); None: the dense W_i's."""
    bases = _bases(projections, bases)
    stackable, grouped = _stackable(projections), _grouped_down(projections)
    if stackable or grouped:   # one read of x for all: [u_0 u_1 …], u_i = (D_i ⊙ x) A_iᵀ (D_i = 1 when stackable)
        if stackable:
            u_all = ops.lora_down(x, _stacked_a(projections), 0, 0.0)
        else:
            u_all = ops.lora_down_grouped(x, _stacked_a(projections), _ranks(projections),
                                          [p.seed if p.dropout != 0.0 else 0 for p in projections],
                                          [float(p.dropout) for p in projections])
        us = [u.clone() for u in u_all.split(_ranks(projections), dim=1)]   # own storage: outputs must not alias
        ys = [_cuda_backend.lora_up_base(u, p.lora_b, p.bias, p.scale, x, lambda c, add=add: add(c, x))
              for u, p, (add, _) in zip(us, projections, bases)]
        return ys, us
    ys, us = [], []
    for p, (add, _) in zip(projections, bases):
        y, u = _cuda_backend._lora_forward(x, p.lora_a, p.lora_b, p.bias, p.scale, p.dropout, p.seed,
                                           lambda c, add=add: add(c, x))
        ys.append(y)
        us.append(u)
    return ys, us


def _grad_pass(g: Tensor, x: Tensor, p: GroupedProjection, u: Tensor, needs: Sequence[bool]):
    """(du (M, r) float32, dB or None, dbias or None) of one projection: one read of g."""
    return _cuda_backend.grad_pass(g, u, p.lora_b, p.scale, needs[2], needs[3] and p.bias is not None, x.dtype)


def _stacked_bwd(grads, x, projections, us, needs, bases):
    """``grouped_bwd`` for ``_stackable`` projections: one lora_dx_da over [du_0 du_1 …] (M, Σr_i) and [A_0; A_1; …]
    gives Σ_i du_i A_i, which starts dx (no transient (M, K) term), and every dA_i as a row block of its
    (Σr_i, K) result (one read of x for all of them)."""
    need_dx, need_da = needs[0], needs[1]
    passes = [_grad_pass(g, x, p, u, needs) for g, p, u in zip(grads, projections, us)]
    dbs, dbiases = [db for _, db, _ in passes], [dbias for _, _, dbias in passes]
    dx, das = None, [None] * len(projections)
    if need_dx or need_da:
        du_all = torch.cat([du for du, _, _ in passes], dim=1)
        del passes
        low_rank, da_all = ops.lora_dx_da(x, du_all, _stacked_a(projections), 0, 0.0, need_dx)
        if need_da:
            das = [da.to(p.lora_a.dtype, copy=True)    # own storage: outputs must not alias one another
                   for da, p in zip(da_all.split(_ranks(projections), dim=0), projections)]
        if need_dx:
            dx = low_rank
            for g, (_, add_dgrad) in zip(grads, bases):
                dx = add_dgrad(dx, g)
    return dx, das, dbs, dbiases


def _grouped_dropout_bwd(grads, x, projections, us, needs, bases):
    """``grouped_bwd`` with dropout when ``grouped_dx_da`` holds and dx is asked: one lora_dx_da_grouped gives
    dx = Σ_i D_i ⊙ (du_i A_i) (fp32 sum, one rounding; no transient (M, K) term) and every dA_i (one read of x),
    then dx += g_i W_i for each i."""
    passes = [_grad_pass(g, x, p, u, needs) for g, p, u in zip(grads, projections, us)]
    dbs, dbiases = [db for _, db, _ in passes], [dbias for _, _, dbias in passes]
    du_all = torch.cat([du for du, _, _ in passes], dim=1)
    del passes
    dx, da_all = ops.lora_dx_da_grouped(x, du_all, _stacked_a(projections), _ranks(projections),
                                        [p.seed if p.dropout != 0.0 else 0 for p in projections],
                                        [float(p.dropout) for p in projections])
    das = [None] * len(projections)
    if needs[1]:
        das = [da.to(p.lora_a.dtype, copy=True)    # own storage: outputs must not alias one another
               for da, p in zip(da_all.split(_ranks(projections), dim=0), projections)]
    for g, (_, add_dgrad) in zip(grads, bases):
        dx = add_dgrad(dx, g)
    return dx, das, dbs, dbiases


def grouped_bwd(grads: Sequence[Tensor], x: Tensor, projections: Sequence[GroupedProjection], us: Sequence[Tensor],
                needs: Sequence[bool], bases: Optional[Sequence] = None) -> tuple[Optional[Tensor], list, list, list]:
    """(dx (M, K), [dA_i], [dB_i], [dbias_i]) as ``lowcost.reference.lora_grouped_linear.grouped_backward``
    defines them; ``needs`` = (dx, dA, dB, dbias) for every projection (None where not needed); ``bases`` as
    for ``grouped_fwd``."""
    bases = _bases(projections, bases)
    if _stackable(projections):
        return _stacked_bwd(grads, x, projections, us, needs, bases)
    if needs[0] and grouped_dx_da([p.lora_a for p in projections], [p.dropout for p in projections]):
        return _grouped_dropout_bwd(grads, x, projections, us, needs, bases)
    need_dx = needs[0]
    dx = None
    das, dbs, dbiases = [], [], []
    for g, p, u, (_, add_dgrad) in zip(grads, projections, us, bases):
        needs_i = (need_dx, needs[1], needs[2], needs[3] and p.bias is not None)
        # the first projection's low-rank term becomes the accumulator (g_0 W_0 added onto it); every later one
        # is a transient added after its g_i W_i joined dx
        first = (lambda t, g=g, add_dgrad=add_dgrad: add_dgrad(t, g)) if dx is None else (lambda t: t)
        low_rank, da, db, dbias = _cuda_backend._lora_backward(g, x, p.lora_a, p.lora_b, u, p.scale, p.dropout,
                                                               p.seed, needs_i, first)
        das.append(da)
        dbs.append(db)
        dbiases.append(dbias)
        if not need_dx:
            continue
        if dx is None:
            dx = low_rank
        else:
            dx = add_dgrad(dx, g).add_(low_rank)
        del low_rank
    return dx, das, dbs, dbiases
