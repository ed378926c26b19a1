"""lowcost.ops.lora_grouped_linear against float64 autograd of P separate LoRA projections, output and every
gradient (dx, each dA_i, dB_i, dbias_i); the same dropped elements as P lowcost.ops.lora_linear calls; opcheck,
what is saved, bad input."""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops.backend import triton_usable
from lowcost.ops.lora_grouped_linear import _grouped_backward_op, _grouped_op, lora_grouped_linear
from lowcost.reference import dropout_keep_mask, keep_scale
from helpers import TOLERANCE, assert_close_to_reference, max_normalized_error

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                                         reason="triton not installed"))
BACKENDS = ["torch", TRITON]
GQA = ((24, 12, 12), (3, 5, 17))          # N_q > N_k = N_v (grouped-query attention), ranks not multiples of 16


def make_inputs(M, K, outs, ranks, dtype=torch.float32, adapter_dtype=None, biases=(True, False, True), seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    adt = adapter_dtype or dtype
    d = {"x": rand(M, K), "w": [], "a": [], "b": [], "bias": [], "g": []}
    for n, r, has_bias in zip(outs, ranks, biases):
        d["w"].append(rand(n, K, std=K ** -0.5))
        d["a"].append(rand(r, K, std=K ** -0.5, dt=adt))
        d["b"].append(rand(n, r, std=r ** -0.5, dt=adt))
        d["bias"].append(rand(n) if has_bias else None)
        d["g"].append(rand(M, n))
    return d


def _leaves(d, dtype=None):
    """A copy of the inputs with x, every A, B and bias requiring grad (cast to ``dtype`` when given)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.clone())
    out = {"x": cast(d["x"]).requires_grad_(), "w": [cast(w) for w in d["w"]], "g": d["g"]}
    for key in ("a", "b", "bias"):
        out[key] = [cast(t).requires_grad_() if t is not None else None for t in d[key]]
    return out


def _grads(c) -> dict:
    out = {"x": c["x"].grad}
    for key in ("a", "b", "bias"):
        out.update({f"{key}{i}": t.grad for i, t in enumerate(c[key]) if t is not None})
    return out


def truth64(d, scales, dropouts, seeds):
    """Outputs and gradients by float64 autograd of each projection with its explicit Philox mask."""
    c = _leaves(d, torch.float64)
    ys = []
    for i, (w, a, b, bias) in enumerate(zip(c["w"], c["a"], c["b"], c["bias"])):
        mask = dropout_keep_mask(*c["x"].shape, seeds[i], dropouts[i]).double()
        mask = mask * (keep_scale(dropouts[i]) if dropouts[i] else 1.0)
        y = c["x"] @ w.t() + scales[i] * ((c["x"] * mask) @ a.t()) @ b.t()
        ys.append(y + bias if bias is not None else y)
    sum((y * g.double()).sum() for y, g in zip(ys, c["g"])).backward()
    return [y.detach() for y in ys], _grads(c)


def run_op(d, scales, dropouts, seeds, **kwargs):
    c = _leaves(d)
    ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], scales, c["bias"], dropouts, seeds, **kwargs)
    torch.autograd.backward(ys, [g.to(y.dtype) for y, g in zip(ys, c["g"])])
    return [y.detach() for y in ys], _grads(c)


def check(d, dropouts, dtype=torch.float32, scales=(1.5, 0.5, 2.0), seeds=(11, 22, 33), backend="torch"):
    count = len(d["w"])
    scales, seeds = scales[:count], seeds[:count]
    ys, grads = run_op(d, scales, dropouts, seeds, backend=backend)
    ys64, grads64 = truth64(d, scales, dropouts, seeds)
    for i, (y, y64) in enumerate(zip(ys, ys64)):
        assert y.dtype == d["x"].dtype
        assert_close_to_reference(f"y{i}", y, y64, dtype)
    assert set(grads) == set(grads64)
    for name, g64 in grads64.items():
        assert grads[name] is not None and grads[name].dtype == dtype if name == "x" else True, name
        assert_close_to_reference(f"d{name}", grads[name], g64, dtype)


SHAPES = [(1, 20, GQA[0], GQA[1]), (37, 44, GQA[0], GQA[1]), (0, 12, (8, 4, 4), (2, 3, 4)),
          (70, 19, (7, 5, 9), (16, 1, 33))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,outs,ranks", SHAPES, ids=["M1", "gqa", "M0", "K19-3chunks"])
@pytest.mark.parametrize("dropouts", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.3)], ids=["p0", "p-mixed"])
def test_fp32_matches_float64(backend, M, K, outs, ranks, dropouts):
    check(make_inputs(M, K, outs, ranks, seed=M + K), dropouts, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", [1, 2])
def test_fewer_projections(backend, count):
    """gate/up (P = 2) and a single projection (P = 1: the unused kernel slots are compiled out)."""
    d = make_inputs(9, 16, (20, 20, 20)[:count], (4, 6, 8)[:count], biases=(False, True)[:count], seed=count)
    check(d, (0.2, 0.1)[:count], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
def test_low_precision(backend, dtype, adapter_dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is broken under the Triton interpreter (TOOLCHAIN.md); covered on a GPU")
    d = make_inputs(17, 32, GQA[0], GQA[1], dtype=dtype, adapter_dtype=adapter_dtype, seed=2)
    check(d, (0.1, 0.2, 0.0), dtype=dtype, backend=backend)


def grouped_and_unfused_runs(backend, seeds):
    """[(outputs, grads) of lora_grouped_linear, the same of three lowcost.lora_linear calls] on ``backend``, with
    dropout on and the dropout generator seeded alike (``seeds`` None draws them in the unfused order)."""
    d = make_inputs(21, 24, GQA[0], GQA[1], seed=8)
    dropouts = (0.2, 0.3, 0.25)
    results = []
    for fused in (True, False):
        c = _leaves(d)
        torch.manual_seed(1234)
        if fused:
            ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (2.0,) * 3, c["bias"], dropouts, seeds,
                                     backend=backend)
        else:
            ys = [lowcost.lora_linear(c["x"], w, a, b, 2.0, bias, p, s, backend=backend)
                  for w, a, b, bias, p, s in zip(c["w"], c["a"], c["b"], c["bias"], dropouts, seeds or (None,) * 3)]
        torch.autograd.backward(ys, c["g"])
        results.append(([y.detach() for y in ys], _grads(c)))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seeds", [(5, 6, 7), None])
def test_same_dropped_elements_as_unfused_lora_linears(backend, seeds):
    """Explicit seeds, and seeds=None drawn from torch's generator in the unfused order: the same outputs and
    gradients as three lowcost.lora_linear calls (bit-identical forward on torch: same masks, same GEMMs)."""
    (ys, grads), (ys_ref, grads_ref) = grouped_and_unfused_runs(backend, seeds)
    for y, y_ref in zip(ys, ys_ref):
        if backend == "torch":
            assert torch.equal(y, y_ref)
        assert max_normalized_error(y, y_ref)[0] <= TOLERANCE[torch.float32]   # a different mask is O(1) off
    for name in grads_ref:
        assert max_normalized_error(grads[name], grads_ref[name])[0] <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_u_is_exactly_the_masked_input(backend):
    """With A_i = the identity, u_i = D_i ⊙ x: every kept and dropped element equals the unfused path's mask
    (the reference Philox mask, and on Triton the LoRA linear's own Triton mask kernel)."""
    M, K, seeds, dropouts = 13, 20, torch.tensor([3, 4, 5]), [0.3, 0.5, 0.1]
    x = torch.randn(M, K)
    eye = torch.eye(K)
    ws, bs = [torch.zeros(4, K)] * 3, [torch.zeros(4, K)] * 3
    _, us = _grouped_op(x, ws, [eye] * 3, bs, [], [False] * 3, [1.0] * 3, dropouts, seeds, backend)
    for u, seed, p in zip(us, seeds.tolist(), dropouts):
        keep = dropout_keep_mask(M, K, seed, p)
        torch.testing.assert_close(u, torch.where(keep, x * keep_scale(p), torch.zeros(())), rtol=0, atol=0)
        if backend == "triton":
            from lowcost.kernels.lora_linear import dropout_keep_mask as triton_mask
            assert torch.equal(triton_mask(M, K, seed, p, "cpu"), keep)


def assert_bitwise_reproducible(backend, dropout):
    """Two runs of the same call give the same bits: every output and every gradient (no atomics, fixed orders)."""
    d = make_inputs(70, 24, GQA[0], GQA[1], seed=5)
    runs = [run_op(d, (1.5, 0.5, 2.0), (dropout,) * 3, (1, 2, 3), backend=backend) for _ in range(2)]
    for y0, y1 in zip(runs[0][0], runs[1][0]):
        assert torch.equal(y0, y1)
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_bitwise_reproducible(dropout):
    if not triton_usable(torch.device("cpu")):
        pytest.skip("triton not installed")
    assert_bitwise_reproducible("triton", dropout)


def test_saves_x_once_the_u_and_the_seeds():
    M, K = 32, 16
    d = make_inputs(M, K, GQA[0], GQA[1], seed=1)
    c = _leaves(d)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (1.0,) * 3, c["bias"], (0.1,) * 3, (1, 2, 3))
    params = {t.data_ptr() for key in ("w", "a", "b") for t in c[key]}
    activations = [t for t in packed if t.data_ptr() not in params]
    assert activations[0].data_ptr() == c["x"].data_ptr()                     # the caller's x, not a copy
    shapes = sorted(tuple(t.shape) for t in activations[1:])
    assert shapes == sorted([(M, 3), (M, 5), (M, 17), (3,)])                  # the three u's and the seeds
    assert len([t for t in packed if t.data_ptr() == c["x"].data_ptr()]) == 1  # x saved once, not per projection
    torch.autograd.backward(ys, c["g"])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck(dropout):
    d = make_inputs(5, 12, (6, 4, 4), (2, 3, 4), seed=3)
    c = _leaves(d)
    seeds = torch.tensor([1, 2, 3])
    args = (c["x"], c["w"], c["a"], c["b"], [c["bias"][0], c["bias"][2]], [True, False, True], [1.0, 2.0, 0.5],
            [dropout] * 3, seeds, "torch")
    result = torch.library.opcheck(_grouped_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    _, us = _grouped_op(*args)
    detached = [[t.detach() for t in c[key]] for key in ("w", "a", "b")]
    bargs = (c["g"], c["x"].detach(), *detached, us, [True, False, True], [1.0, 2.0, 0.5], [dropout] * 3, seeds,
             [True] * 4, "torch")
    result = torch.library.opcheck(_grouped_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph():
    d = make_inputs(6, 16, (8, 4, 4), (2, 3, 4), seed=5)
    c = _leaves(d)

    def qkv(x):
        return lora_grouped_linear(x, c["w"], c["a"], c["b"], (1.0,) * 3, c["bias"], (0.1,) * 3, (1, 2, 3))

    ys = torch.compile(qkv, fullgraph=True)(c["x"])
    torch.autograd.backward(ys, c["g"])
    compiled_grad = c["x"].grad.clone()
    c["x"].grad = None
    ys_eager = qkv(c["x"])
    torch.autograd.backward(ys_eager, c["g"])
    for y, y_eager in zip(ys, ys_eager):
        torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(compiled_grad, c["x"].grad)


BAD = [
    ("K mismatch", dict(k_mismatch=True), ValueError, "projection 1: weight must have K=12 columns"),
    ("lists", dict(drop_b=True), ValueError, "lora_bs must hold 3 entries"),
    ("seeds", dict(seeds=(1, 2)), ValueError, "seeds must hold 3 seeds"),
    ("seed tensor", dict(seeds=torch.tensor([1, 2])), ValueError, r"seeds must be a \(3,\) int64 CPU tensor"),
    ("dropout", dict(dropouts=(0.1, 1.0, 0.0)), ValueError, "projection 1: dropout must be a probability"),
    ("cuda on cpu", dict(backend="cuda"), ValueError, "backend='cuda' is not available: the CUDA kernels need CUDA"),
    ("float64 triton", dict(backend="triton", x64=True), TypeError, "float64 runs only on backend='torch'"),
    ("frozen", dict(train_w=True), ValueError, "projection 0: weight must be frozen"),
    ("empty", dict(empty=True), ValueError, "weights must hold at least one"),
]


@pytest.mark.parametrize("case,change,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, change, error, message):
    if change.get("backend") == "triton" and not triton_usable(torch.device("cpu")):
        pytest.skip("triton not installed")
    d = make_inputs(3, 12, (6, 4, 4), (2, 2, 2), seed=0)
    x, ws, as_, bs = d["x"], d["w"], d["a"], d["b"]
    if change.pop("k_mismatch", None):
        ws = [ws[0], torch.zeros(4, 13), ws[2]]
    if change.pop("drop_b", None):
        bs = bs[:2]
    if change.pop("x64", None):
        x, ws, as_, bs = x.double(), [w.double() for w in ws], [a.double() for a in as_], [b.double() for b in bs]
    if change.pop("train_w", None):
        ws = [ws[0].clone().requires_grad_()] + ws[1:]
    if change.pop("empty", None):
        ws, as_, bs = [], [], []
    kwargs = dict(scales=(1.0,) * len(ws))
    kwargs.update(change)
    with pytest.raises(error, match=message):
        lora_grouped_linear(x, ws, as_, bs, **kwargs)


@pytest.mark.skipif(not lowcost._extension.has_kernel("philox_dropout_pair_", "CPU"),
                    reason="lowcost._C is not built")
def test_torch_backend_backward_generates_each_mask_once():
    """Each projection's backward masks D_i ⊙ x (for dA_i) and its low-rank dx term with one
    philox_dropout_pair_ call (in the one reused scratch buffer)."""
    from torch.profiler import profile
    d = make_inputs(9, 20, GQA[0], GQA[1])
    c = _leaves(d)
    ys = lora_grouped_linear(c["x"], c["w"], c["a"], c["b"], (1.0,) * 3, c["bias"], (0.1,) * 3, (1, 2, 3),
                             backend="torch")
    with profile() as prof:
        torch.autograd.backward(ys, c["g"])
    calls = sorted(e.name.split("::")[1] for e in prof.events() if e.name.startswith("lowcost::philox_dropout"))
    assert calls == ["philox_dropout_pair_"] * 3


@pytest.mark.parametrize("cuda_runs", [True, False])
def test_default_backend_with_more_projections_than_triton_groups(monkeypatch, cuda_runs):
    """On a GPU the default is Triton, which groups at most TRITON_MAX_PROJECTIONS projections: with more, the
    default passes on to cuda (where its kernels run), else torch; an explicit backend='triton' is refused."""
    import importlib
    module = importlib.import_module("lowcost.ops.lora_grouped_linear")
    monkeypatch.delenv("LOWCOST_BACKEND", raising=False)
    monkeypatch.setattr(module, "resolve_backend", lambda requested, device, rank: requested or "triton")
    monkeypatch.setattr(module, "unavailable_reason", lambda name, device, rank: None if cuda_runs else "no GPU")
    x = torch.randn(4, 8)
    many = [2] * (module.TRITON_MAX_PROJECTIONS + 1)
    assert module._resolve(None, x, many) == ("cuda" if cuda_runs else "torch")
    assert module._resolve(None, x, [2] * module.TRITON_MAX_PROJECTIONS) == "triton"
    with pytest.raises(ValueError, match="groups at most"):
        module._resolve("triton", x, many)
