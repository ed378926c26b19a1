"""The ``cuda`` backend of lowcost.ops.lora_grouped_linear on CPU tensors (issue #12): the composition
(lowcost/ops/_cuda_grouped_linear.py) against float64 autograd of P separate LoRA projections, output and every
gradient (dx, each dA_i, dB_i, dbias_i); the same dropped elements as P ``lora_linear(backend='cuda')`` calls;
one dx accumulator; the saved set; opcheck; what is refused.

The composition's ops (lora_down, lora_up, lora_grad_pass, lora_dx_da) have C++ CPU kernels, so it runs here
exactly as on a GPU, minus the CUDA kernels themselves (csrc/tests/test_cuda_emulated.cpp runs those on the host;
tests/gpu/test_lora_grouped_linear_gpu.py on a GPU). The ``cuda_on_cpu`` fixture lets the cuda backend be chosen
for CPU tensors, for the grouped op and for the unfused ``lora_linear`` it is compared with.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost._extension import has_kernel
from lowcost.ops import backend as backend_module
from lowcost.ops.lora_grouped_linear import _grouped_backward_op, _grouped_op, lora_grouped_linear
from lowcost.reference import dropout_keep_mask, keep_scale
from helpers import TOLERANCE, max_normalized_error
from test_lora_grouped_linear import (GQA, SHAPES, _grads, _leaves, assert_bitwise_reproducible, check,
                                     grouped_and_unfused_runs, make_inputs, run_op)

pytestmark = pytest.mark.skipif(not has_kernel("lora_dx_da", "CPU"),
                                reason="lowcost._C is not built (pip install --no-build-isolation -e .)")


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """backend='cuda' resolves on CPU tensors (the C++ CPU kernels stand in for the CUDA ones)."""
    monkeypatch.setattr(backend_module, "cuda_kernels_usable", lambda device: True)


# ------------------------------------------------------------------------------------------- against float64
@pytest.mark.parametrize("M,K,outs,ranks", SHAPES, ids=["M1", "gqa", "M0", "K19-3chunks"])
@pytest.mark.parametrize("dropouts", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.3)], ids=["p0", "p-mixed"])
def test_fp32_matches_float64(cuda_on_cpu, M, K, outs, ranks, dropouts):
    """fp32: the tolerance of every backend (2e-5): fp32 accumulation, u and du in fp32, no rounding to 16 bits."""
    check(make_inputs(M, K, outs, ranks, seed=M + K), dropouts, backend="cuda")


@pytest.mark.parametrize("count,biases", [(1, (False,)), (1, (True,)), (2, (False, True)), (2, (False, False))])
def test_fewer_projections(cuda_on_cpu, count, biases):
    """gate/up (P = 2) and a single projection (P = 1: its low-rank term is the whole accumulator)."""
    d = make_inputs(9, 16, (21, 13)[:count], (5, 17)[:count], biases=biases, seed=count)
    check(d, (0.2, 0.1)[:count], backend="cuda")


@pytest.mark.parametrize("dropouts", [(0.1, 0.2, 0.0), (0.0, 0.0, 0.0)], ids=["dropout", "stacked"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
def test_low_precision(cuda_on_cpu, dtype, adapter_dtype, dropouts):
    """16-bit: the dtype's tolerance (2e-3 fp16, 1e-2 bf16), as every backend. y_i: the LoRA term rounded once to
    the dtype (lora_up), then once more when the GEMM adds x W_iᵀ. dx is accumulated in x's dtype (cuBLAS beta = 1
    writes it): the low-rank sum is rounded once (lora_dx_da_grouped with dropout, the stacked lora_dx_da
    without), then each of the P addmm_ rounds once: P roundings (the per-projection path, mixed adapter dtypes
    with dropout, rounds each t_i and each add: 2P - 1, as P unfused lora_linear(backend='cuda') calls summed by
    autograd do; the torch backend's fp32 accumulator rounds once). Measured here and at (M, K) = (129, 200) over
    six seeds, both paths: dx within 8.8e-3 (bf16) and 1.2e-3 (fp16) of float64, normalised; y and every other
    gradient within 6.0e-3 / 7.9e-4 (the per-projection dropout path); remeasured on the grouped dropout path
    ((17, 32) and (129, 200), seeds 0-5, dropouts (0.1, 0.2, 0.0)): dx 8.5e-3 / 9.0e-4, the rest
    5.6e-3 / 8.1e-4. The bf16 margin on dx is thin: an fp32 accumulator would need a GEMM with an fp32 output
    from 16-bit operands (torch's out_dtype addmm is CUDA-only, so it could not be tested here)."""
    d = make_inputs(17, 32, GQA[0], GQA[1], dtype=dtype, adapter_dtype=adapter_dtype, seed=2)
    check(d, dropouts, dtype=dtype, backend="cuda")


@pytest.mark.parametrize("frozen", ["adapters", "x", "biases"])
def test_partial_gradients(cuda_on_cpu, frozen):
    """Only some gradients asked for (the ``needs`` of the backward op): those computed equal float64 ones."""
    d = make_inputs(11, 20, (7, 5, 9), (5, 17, 3), seed=4)
    c = _leaves(d)
    if frozen == "x":
        c["x"].requires_grad_(False)
    for key in {"adapters": ("a", "b"), "x": (), "biases": ("bias",)}[frozen]:
        c[key] = [t.detach() if t is not None else None for t in c[key]]
    ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (1.5, 0.5, 2.0), c["bias"], (0.1, 0.0, 0.3),
                             (11, 22, 33), backend="cuda")
    torch.autograd.backward(ys, c["g"])
    c64 = _leaves(d, torch.float64)
    ys64 = lora_grouped_linear(c64["x"], c64["w"], c64["a"], c64["b"], (1.5, 0.5, 2.0), c64["bias"],
                               (0.1, 0.0, 0.3), (11, 22, 33), backend="torch")
    torch.autograd.backward(ys64, [g.double() for g in c64["g"]])
    got, want = _grads(c), _grads(c64)
    for name, g64 in want.items():
        if got[name] is None:
            assert name.startswith({"adapters": ("a", "b"), "x": ("x",), "biases": ("bias",)}[frozen]), name
            continue
        assert max_normalized_error(got[name], g64)[0] <= TOLERANCE[torch.float32], name
    assert sum(g is not None for g in got.values()) > 0


# ------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("seeds", [(5, 6, 7), None])
def test_same_dropped_elements_as_unfused_cuda_lora_linears(cuda_on_cpu, seeds):
    """Explicit seeds, and seeds=None drawn from torch's generator in the unfused order: the outputs of three
    ``lora_linear(backend='cuda')`` calls bit for bit (same ops, same masks), every gradient within fp32
    rounding (dx sums the same terms in another order; a mask that differs in one element is O(1) off)."""
    (ys, grads), (ys_ref, grads_ref) = grouped_and_unfused_runs("cuda", seeds)
    for y, y_ref in zip(ys, ys_ref):
        assert torch.equal(y, y_ref)
    for name in grads_ref:
        if name != "x":
            assert torch.equal(grads[name], grads_ref[name]), name      # per-projection ops, the same operands
        assert max_normalized_error(grads[name], grads_ref[name])[0] <= TOLERANCE[torch.float32], name


def test_stacked_path_matches_unfused_cuda_lora_linears(cuda_on_cpu):
    """No dropout (one lora_down and one lora_dx_da over the stacked adapters): outputs and gradients within fp32
    rounding of three ``lora_linear(backend='cuda')`` calls (on a GPU the stacked rank changes the K split, so
    the sums need not be bitwise equal)."""
    d = make_inputs(21, 24, GQA[0], GQA[1], seed=8)
    results = []
    for fused in (True, False):
        c = _leaves(d)
        if fused:
            ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (2.0, 0.5, 1.0), c["bias"], backend="cuda")
        else:
            ys = [lowcost.lora_linear(c["x"], w, a, b, s, bias, backend="cuda")
                  for w, a, b, bias, s in zip(c["w"], c["a"], c["b"], c["bias"], (2.0, 0.5, 1.0))]
        torch.autograd.backward(ys, c["g"])
        results.append(([y.detach() for y in ys], _grads(c)))
    (ys, grads), (ys_ref, grads_ref) = results
    for y, y_ref in zip(ys, ys_ref):
        assert max_normalized_error(y, y_ref)[0] <= TOLERANCE[torch.float32]
    for name in grads_ref:
        assert max_normalized_error(grads[name], grads_ref[name])[0] <= TOLERANCE[torch.float32], name


def test_u_is_exactly_the_masked_input():
    """With A_i = the identity, u_i = D_i ⊙ x: every kept and dropped element is the reference Philox mask's."""
    M, K, seeds, dropouts = 13, 20, torch.tensor([3, 4, 5]), [0.3, 0.5, 0.1]
    x = torch.randn(M, K)
    eye = torch.eye(K)
    ws, bs = [torch.zeros(4, K)] * 3, [torch.zeros(4, K)] * 3
    _, us = _grouped_op(x, ws, [eye] * 3, bs, [], [False] * 3, [1.0] * 3, dropouts, seeds, "cuda")
    for u, seed, p in zip(us, seeds.tolist(), dropouts):
        keep = dropout_keep_mask(M, K, seed, p)
        torch.testing.assert_close(u, torch.where(keep, x * keep_scale(p), torch.zeros(())), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("dropouts,downs,passes,adds",
                         [((0.1, 0.0, 0.2), (0, 1), (0, 1), 0), ((0.0, 0.0, 0.0), (1, 0), (1, 0), 0)],
                         ids=["dropout", "stacked"])
def test_one_dx_accumulator(cuda_on_cpu, dropouts, downs, passes, adds):
    """Backward: one lora_grad_pass per projection; one pass over x for every low-rank term either way: one
    lora_dx_da_grouped with dropout (a mask per projection, the fp32 sum of the D_i ⊙ (du_i A_i) is dx), one
    lora_dx_da over the stacked [du_i] and [A_i] without (its result is dx); no t_i joins dx by add_; the dense
    terms added by addmm_ in place (one per projection); no (M, K) tensor zeroed or summed out of place.
    Forward: one read of x either way: one lora_down_grouped with dropout (a mask per projection), one lora_down
    over the stacked adapters without."""
    from torch.profiler import profile
    M, K = 9, 20
    d = make_inputs(M, K, GQA[0], GQA[1])
    c = _leaves(d)
    with profile() as prof:
        ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (1.0,) * 3, c["bias"], dropouts, (1, 2, 3),
                                 backend="cuda")
    names = [e.name for e in prof.events()]
    assert (names.count("lowcost::lora_down"), names.count("lowcost::lora_down_grouped")) == downs
    with profile(record_shapes=True) as prof:
        torch.autograd.backward(ys, c["g"])
    names = [e.name for e in prof.events()]
    assert names.count("lowcost::lora_grad_pass") == 3
    assert (names.count("lowcost::lora_dx_da"), names.count("lowcost::lora_dx_da_grouped")) == passes
    with_mk = [e.name for e in prof.events() if e.input_shapes and e.input_shapes[0] == [M, K]]
    assert with_mk.count("aten::addmm_") == 3, with_mk
    assert with_mk.count("aten::add_") == adds, with_mk
    assert not {"aten::add", "aten::zeros", "aten::zero_", "aten::zeros_like", "aten::sum"} & set(with_mk), with_mk


def test_stacked_path_needs_one_adapter_dtype(cuda_on_cpu):
    """No dropout but A_0 in float32 beside bf16 A_1, A_2: they cannot concatenate, so each projection runs its
    own passes, and the result is still within bf16's tolerance of float64."""
    d = make_inputs(13, 24, GQA[0], GQA[1], dtype=torch.bfloat16, seed=3)
    d["a"][0], d["b"][0] = d["a"][0].float(), d["b"][0].float()
    check(d, (0.0, 0.0, 0.0), dtype=torch.bfloat16, backend="cuda")


@pytest.mark.parametrize("mixed", [False, True], ids=["one-dtype", "mixed-dtypes"])
def test_forward_with_dropout_reads_x_once_for_one_adapter_dtype(cuda_on_cpu, mixed):
    """Dropout on some projections: one lora_down_grouped when the A_i share a dtype (they stack), else one
    lora_down per projection; the u_i either way bitwise those of P lora_down calls with the projections' seeds,
    and outputs and gradients within bf16's tolerance of float64."""
    from torch.profiler import profile
    d = make_inputs(13, 24, GQA[0], GQA[1], dtype=torch.bfloat16, seed=5)
    if mixed:
        d["a"][0], d["b"][0] = d["a"][0].float(), d["b"][0].float()
    dropouts, seeds = [0.1, 0.0, 0.3], torch.tensor([7, 8, 9])
    c = _leaves(d)
    with profile() as prof:
        _, us = _grouped_op(c["x"], c["w"], c["a"], c["b"], [], [False] * 3, [1.0] * 3, dropouts, seeds, "cuda")
    names = [e.name for e in prof.events()]
    downs = (names.count("lowcost::lora_down"), names.count("lowcost::lora_down_grouped"))
    assert downs == ((3, 0) if mixed else (0, 1))
    for u, a, seed, p in zip(us, c["a"], seeds.tolist(), dropouts):
        assert torch.equal(u, torch.ops.lowcost.lora_down(c["x"].detach(), a.detach(), seed, p))
    check(d, tuple(dropouts), dtype=torch.bfloat16, backend="cuda")


@pytest.mark.parametrize("case", ["one-dtype", "mixed-dtypes", "dA-only", "ranks-over-256"])
def test_backward_with_dropout_reads_x_once_when_it_can(cuda_on_cpu, case):
    """Dropout on some projections, dx asked, one adapter dtype and the r_i rounded up to 16 summing to at most 256:
    one lora_dx_da_grouped (no lora_dx_da, no t_i added), its dA_i bitwise those of P lora_dx_da calls with the
    projections' seeds and the saved u_i; mixed adapter dtypes, dA without dx (x frozen) or larger ranks: one
    lora_dx_da per projection. Every gradient within bf16's tolerance of float64 either way."""
    from torch.profiler import profile
    outs, ranks = (GQA[0], GQA[1]) if case != "ranks-over-256" else ((6, 5, 4), (100, 100, 60))
    d = make_inputs(13, 24, outs, ranks, dtype=torch.bfloat16, seed=7)
    if case == "mixed-dtypes":
        d["a"][0], d["b"][0] = d["a"][0].float(), d["b"][0].float()
    dropouts, seeds = [0.1, 0.0, 0.3], torch.tensor([7, 8, 9])
    c = _leaves(d)
    x = c["x"].detach()
    a = [t.detach() for t in c["a"]]
    _, us = _grouped_op(x, [w.detach() for w in c["w"]], a, [b.detach() for b in c["b"]], [], [False] * 3,
                        [1.0] * 3, dropouts, seeds, "cuda")
    needs = [case != "dA-only", True, True, False]
    with profile() as prof:
        dx, das, _, _ = _grouped_backward_op(c["g"], x, [w.detach() for w in c["w"]], a,
                                             [b.detach() for b in c["b"]], us, [False] * 3, [1.0] * 3, dropouts,
                                             seeds, needs, "cuda")
    names = [e.name for e in prof.events()]
    grouped = case == "one-dtype"
    assert (names.count("lowcost::lora_dx_da"), names.count("lowcost::lora_dx_da_grouped")) == \
        ((0, 1) if grouped else (3, 0))
    assert (dx.numel() == 0) == (case == "dA-only")   # the op returns an empty dx when it is not asked
    for da, a_i, u, g, b, seed, p in zip(das, a, us, c["g"], c["b"], seeds.tolist(), dropouts):
        du = torch.ops.lowcost.lora_grad_pass(g, u, b.detach(), 1.0, False)[0]
        assert torch.equal(da, torch.ops.lowcost.lora_dx_da(x, du, a_i, seed, p, False)[1].to(a_i.dtype))
    check(d, tuple(dropouts), dtype=torch.bfloat16, backend="cuda")


def test_saves_x_once_the_u_and_the_seeds(cuda_on_cpu):
    """The saved set does not depend on the backend: the caller's x once, the three u_i and the seeds."""
    M, K = 32, 16
    c = _leaves(make_inputs(M, K, GQA[0], GQA[1], seed=1))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (1.0,) * 3, c["bias"], (0.1,) * 3, (1, 2, 3),
                                 backend="cuda")
    params = {t.data_ptr() for key in ("w", "a", "b") for t in c[key]}
    activations = [t for t in packed if t.data_ptr() not in params]
    assert activations[0].data_ptr() == c["x"].data_ptr()
    assert sorted(tuple(t.shape) for t in activations[1:]) == sorted([(M, 3), (M, 5), (M, 17), (3,)])
    assert all(t.dtype == torch.float32 for t in activations[1:4] if t.dim() == 2)
    torch.autograd.backward(ys, c["g"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bitwise_reproducible(cuda_on_cpu, dropout):
    assert_bitwise_reproducible("cuda", dropout)


def test_opcheck():
    d = make_inputs(5, 12, (6, 4, 4), (2, 3, 4), seed=3)
    c = _leaves(d)
    seeds = torch.tensor([1, 2, 3])
    args = (c["x"], c["w"], c["a"], c["b"], [c["bias"][0], c["bias"][2]], [True, False, True], [1.0, 2.0, 0.5],
            [0.2] * 3, seeds, "cuda")
    result = torch.library.opcheck(_grouped_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    _, us = _grouped_op(*args)
    detached = [[t.detach() for t in c[key]] for key in ("w", "a", "b")]
    bargs = (c["g"], c["x"].detach(), *detached, us, [True, False, True], [1.0, 2.0, 0.5], [0.2] * 3, seeds,
             [True] * 4, "cuda")
    result = torch.library.opcheck(_grouped_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------- refusals
def test_public_cuda_backend_needs_cuda_tensors():
    d = make_inputs(3, 12, (6, 4, 4), (2, 2, 2), seed=0)
    with pytest.raises(ValueError, match="backend='cuda' is not available: the CUDA kernels need CUDA tensors"):
        lora_grouped_linear(d["x"], d["w"], d["a"], d["b"], (1.0,) * 3, backend="cuda")


def test_float64_is_refused_on_cuda(cuda_on_cpu):
    d = make_inputs(3, 12, (6, 4, 4), (2, 2, 2), dtype=torch.float64, seed=0)
    with pytest.raises(TypeError, match="float64 runs only on backend='torch' \\(got backend='cuda'\\)"):
        lora_grouped_linear(d["x"], d["w"], d["a"], d["b"], (1.0,) * 3, backend="cuda")


def test_more_than_three_projections_run_on_cuda(cuda_on_cpu):
    """The Triton kernels have three projection slots; the cuda composition loops, so P = 4 runs there."""
    d = make_inputs(6, 16, (5, 7, 3, 9), (2, 5, 3, 17), biases=(True, False, True, False), seed=6)
    check(d, (0.1, 0.0, 0.2, 0.3), scales=(1.5, 0.5, 2.0, 1.0), seeds=(1, 2, 3, 4), backend="cuda")


# ------------------------------------------------------------------------------------------- the plan's model
@pytest.mark.parametrize("dropouts,count,want_mk", [((0.0,) * 3, 3, 0), ((0.1,) * 3, 3, 2), ((0.0,), 1, 0)])
def test_plan_workspace_covers_the_transient_low_rank_term(dropouts, count, want_mk):
    """lowcost.plan's workspace model of the backward op: on cuda with fp32 x, the larger of the torch estimate
    (0 without dropout, 2·M·K·4 with it, dx and dA asked) and the transient t_i the cuda path holds (none on the
    stacked path without dropout and on the grouped path with it)."""
    from lowcost.plan.workspace import kernel_workspace
    M, K = 10, 12
    d = make_inputs(M, K, (6, 4, 4)[:count], (2, 3, 4)[:count], seed=0)
    us = [torch.zeros(M, a.shape[0]) for a in d["a"]]
    args = (d["g"], d["x"], d["w"], d["a"], d["b"], us, [False] * count, [1.0] * count, list(dropouts),
            torch.arange(count), [True, True, True, False], "cuda")
    assert kernel_workspace(torch.ops.lowcost.lora_grouped_linear_backward.default, args, {}, None) == \
        want_mk * M * K * 4


@pytest.mark.parametrize("mixed,want", [(False, 0), (True, 1)], ids=["one-dtype", "mixed-dtypes"])
def test_transient_low_rank_terms_follow_the_backward_path(mixed, want):
    """With dropout and dx asked: no t_i when lora_dx_da_grouped runs (one adapter dtype), one when each projection
    runs its own lora_dx_da (mixed dtypes); none without dx or with one projection."""
    from lowcost.ops._cuda_grouped_linear import transient_low_rank_terms
    a = [torch.zeros(4, 8, dtype=torch.float32 if mixed and i == 0 else torch.bfloat16) for i in range(3)]
    assert transient_low_rank_terms(a, [0.1, 0.0, 0.2], True) == want
    assert transient_low_rank_terms(a, [0.1, 0.0, 0.2], False) == 0
    assert transient_low_rank_terms(a[:1], [0.1], True) == 0
    assert transient_low_rank_terms([torch.zeros(130, 8)] * 2, [0.1, 0.1], True) == 1   # 144 + 144 > 256 rows
