"""The "norm" fusion on the Triton backend for the other consumers of an RMSNorm's output: ``qlora_linear`` and
``qlora_grouped_linear`` (the x-passes and the grouped dA pass rebuild the normed tile in their loads, as for the
dense ops) and the fused gated MLP, dense and quantized (the gate and up x-passes rebuild it). For each: every
gradient bit for bit the run that reads a materialised (untagged) copy, and within the dtype's tolerance of float64
autograd of the unfused chain; a spy fails if backward rebuilds the (M, K) normed tensor in torch.

Odd shapes: M = 0 and 1, K = 100 (NF4's 64-element blocks do not divide it: padded rows; int8 per row), ranks
5, 3 and 7; both RMSNorm forms, dropout 0 and 0.1, fp32, bf16 and fp16 norms and autocast's 16-bit copy of an
fp32 norm's output."""
from __future__ import annotations

import pytest
import torch

from lowcost.ops import lora_gated_mlp, qlora_gated_mlp, qlora_grouped_linear, qlora_linear, rms_norm
from lowcost.ops.backend import triton_usable
from lowcost.quant.quantize_model import quantize_weight
from lowcost.reference import dropout_keep_mask, keep_scale
from lowcost.reference.quant import dequantize_packed
from lowcost.reference.rms_norm import rms_norm as rms_norm64
from helpers import TOLERANCE, assert_close_to_reference, max_normalized_error
from test_normed_input_triton import _NoTorchRebuild

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton cannot run here (not installed, or no GPU and no TRITON_INTERPRET=1)")

EPS, K, INTER = 1e-5, 100, 24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUTS, RANKS, SCALES, SEEDS = (24, 8, 8), (5, 3, 7), (2.0, 1.0, 0.5), (1, 2, 3)
SCHEMES = ("nf4", "int8", "nf4")   # per projection: NF4 with padded 64-blocks (K = 100, I = 24), int8


def _rand(gen, *shape, std=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def _leaves(op: str, M: int, dtype: torch.dtype) -> dict:
    """The trained leaves (x, norm_w, a_i, b_i), the frozen weights w_i (dense, or quantized for the q ops) and the
    output gradients g_i of one chain x → RMSNorm → op."""
    gen = torch.Generator().manual_seed(M + K)
    t = {"x": _rand(gen, M, K, std=3.0, dtype=dtype), "norm_w": 1.0 + _rand(gen, K, std=0.2, dtype=dtype)}
    if op.endswith("gated_mlp"):   # gate (I, K), up (I, K), down (K, I); one output gradient (M, K)
        shapes = [(INTER, K), (INTER, K), (K, INTER)]
        grads = [(M, K)]
    else:
        shapes = [(n, K) for n in (OUTS if op == "qlora_grouped_linear" else OUTS[:1])]
        grads = [(M, n) for n, _ in shapes]
    for i, ((n, k), r) in enumerate(zip(shapes, RANKS)):
        w = _rand(gen, n, k, std=k ** -0.5)
        t[f"w{i}"] = quantize_weight(w, SCHEMES[i], dtype=dtype) if op.startswith("q") else w.to(dtype)
        t[f"a{i}"], t[f"b{i}"] = _rand(gen, r, k, std=k ** -0.5, dtype=dtype), _rand(gen, n, r, std=r ** -0.5, dtype=dtype)
    for i, shape in enumerate(grads):
        t[f"g{i}"] = _rand(gen, *shape, dtype=dtype)
    return {k: (v.to(DEVICE).requires_grad_(k == "x" or k == "norm_w" or k[0] in "ab") if torch.is_tensor(v) else v)
            for k, v in t.items()}


def _trained(t: dict) -> list[str]:
    return [k for k, v in t.items() if torch.is_tensor(v) and v.requires_grad]


def _consume(op: str, y, t: dict, dropout: float) -> list:
    """The op's outputs for input y on the Triton backend."""
    count = sum(k.startswith("w") for k in t)
    adapters = [(t[f"w{i}"], t[f"a{i}"], t[f"b{i}"]) for i in range(count)]
    if op == "qlora_linear":
        return [qlora_linear(y, *adapters[0], SCALES[0], dropout=dropout, seed=SEEDS[0], backend="triton")]
    if op == "qlora_grouped_linear":
        return qlora_grouped_linear(y, *(list(col) for col in zip(*adapters)), list(SCALES),
                                    dropouts=[dropout, 0.0, dropout], seeds=list(SEEDS), backend="triton")
    fused = lora_gated_mlp if op == "lora_gated_mlp" else qlora_gated_mlp
    return [fused(y, *adapters, list(SCALES), "silu", (dropout,) * 3, list(SEEDS), backend="triton")]


def _run(op: str, t: dict, form: str, dropout: float, untag: bool, cast=None) -> dict:
    """Gradients of the trained leaves for x → RMSNorm → op with the g_i as the outputs' gradients; ``untag``: the
    op reads a plain copy of the norm's output (the materialised path); ``cast``: under autocast to that dtype."""
    t = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in t.items()}
    with torch.autocast(DEVICE, dtype=cast, enabled=cast is not None):
        y = rms_norm(t["x"], t["norm_w"], EPS, form)
        outs = _consume(op, y.clone() if untag else y, t, dropout)
    torch.autograd.backward(outs, [t[f"g{i}"].to(out.dtype) for i, out in enumerate(outs)])
    return {k: t[k].grad for k in _trained(t)}


def _dense64(w, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight in float64 as the op multiplies by it: a quantized one decoded to the op's input dtype."""
    if torch.is_tensor(w):
        return w.detach().cpu().double()
    return dequantize_packed(w.scheme, w.packed, w.shape[1], w.block_size, dtype=dtype).cpu().double()


def _lora64(x, w, a, b, scale, dropout, seed):
    mask = dropout_keep_mask(x.shape[0], x.shape[1], seed, dropout).double() * (keep_scale(dropout) if dropout else 1.0)
    return x @ w.t() + scale * ((x * mask) @ a.t()) @ b.t()


def _truth64(op: str, t: dict, form: str, dropout: float, dtype: torch.dtype) -> dict:
    """Plain float64 autograd of the unfused chain (lowcost's reference norm, the spec's Philox masks)."""
    leaves = {k: t[k].detach().cpu().double().requires_grad_() for k in _trained(t)}
    y, _ = rms_norm64(leaves["x"], leaves["norm_w"], EPS, form)
    count = sum(k.startswith("w") for k in t)
    w = [_dense64(t[f"w{i}"], dtype) for i in range(count)]
    p = [(leaves[f"a{i}"], leaves[f"b{i}"], SCALES[i]) for i in range(count)]
    if op.endswith("gated_mlp"):
        gate = _lora64(y, w[0], *p[0], dropout, SEEDS[0])
        h = torch.nn.functional.silu(gate) * _lora64(y, w[1], *p[1], dropout, SEEDS[1])
        outs = [_lora64(h, w[2], *p[2], dropout, SEEDS[2])]
    else:
        dropouts = (dropout, 0.0, dropout)
        outs = [_lora64(y, w[i], *p[i], dropouts[i], SEEDS[i]) for i in range(count)]
    torch.autograd.backward(outs, [t[f"g{i}"].detach().cpu().double() for i in range(len(outs))])
    return {k: v.grad for k, v in leaves.items()}


OPS = ["qlora_linear", "qlora_grouped_linear", "lora_gated_mlp", "qlora_gated_mlp"]
# (M, the norm's dtype, autocast's dtype or None)
RUNS = [(1, torch.float32, None), (0, torch.float32, None), (37, torch.bfloat16, None), (37, torch.float16, None),
        (37, torch.float32, torch.bfloat16), (37, torch.float32, torch.float16)]


@pytest.mark.parametrize("M,dtype,cast", RUNS, ids=[f"M{m}-{str(d)[6:]}-{str(c)[6:]}" for m, d, c in RUNS])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("form", ["llama", "gemma"])
@pytest.mark.parametrize("op", OPS)
def test_rebuild_in_the_kernels_matches_float64_and_the_materialised_run_bit_for_bit(op, form, dropout, M, dtype,
                                                                                     cast, monkeypatch):
    t = _leaves(op, M, dtype)
    materialised = _run(op, t, form, dropout, untag=True, cast=cast)
    # the grouped op runs M = 0 on its torch path (no tile to launch), which rebuilds the empty input in torch
    _NoTorchRebuild(monkeypatch, forbid=not (op == "qlora_grouped_linear" and M == 0))
    fused = _run(op, t, form, dropout, untag=False, cast=cast)
    truth = _truth64(op, t, form, dropout, cast or dtype)
    for name, grad in fused.items():
        assert grad.dtype == t[name].dtype, name
        assert torch.equal(grad, materialised[name]), f"{op} d{name} differs from the materialised run"
        _assert_near_truth(f"{op} {form} d{name}", grad.cpu(), truth[name], cast or dtype, op.endswith("gated_mlp"))


def _assert_near_truth(name: str, grad, truth, dtype: torch.dtype, mlp: bool) -> None:
    """The dtype's tolerance (tests/helpers.py), twice it for the gated MLP in bf16: that chain rounds to bf16 about
    four more times than one projection's (gate and up, h, dgate and dup, dx_g + dx_u), and the torch backend's run
    of the same chain on a materialised copy is 1.3e-2 from float64 here (dx), above the single-op 1e-2."""
    if not (mlp and dtype == torch.bfloat16):
        assert_close_to_reference(name, grad, truth, dtype)
    elif grad.numel():
        err, index = max_normalized_error(grad, truth)
        assert err <= 2 * TOLERANCE[dtype], f"{name} ({dtype}): max normalised error {err:.3e} at {index}"


def test_the_quantized_backward_op_rebuilds_in_torch_on_the_torch_backend():
    """A direct call of ``lowcost::qlora_linear_backward`` with the norm arguments on the torch backend rebuilds
    the input in torch inside the op: the same gradients as passing the normed tensor itself."""
    t = _leaves("qlora_linear", 7, torch.float32)
    w = t["w0"]
    with torch.no_grad():
        y, stat = rms_norm64(t["x"], t["norm_w"], EPS, "gemma")
        u = torch.randn(7, RANKS[0], generator=torch.Generator().manual_seed(1))   # any saved u: both calls read it
        rest = (w.packed, w.scheme, w.block_size, t["a0"], t["b0"], u, SCALES[0], 0.1, torch.tensor(SEEDS[0]),
                "torch", [True, True, True, False])
        op = torch.ops.lowcost.qlora_linear_backward
        plain = op(t["g0"], y, *rest)
        rebuilt = op(t["g0"], t["x"].detach(), *rest, norm_rstd=stat, norm_weight=t["norm_w"].detach(),
                     norm_form="gemma")
    for p, q in zip(plain, rebuilt):
        assert torch.equal(p, q)


@pytest.mark.parametrize("op", ["qlora_linear", "qlora_grouped_linear"])
def test_backward_ops_with_the_norm_arguments_pass_opcheck(op):
    """The quantized backward ops with the norm arguments (fp32 norm input, bf16 gradients: autocast's copy) on
    Triton: schema, FakeTensor (outputs in the gradients' dtype) and AOT dispatch agree with the real kernels."""
    t = _leaves(op, 5, torch.float32)
    x, norm_w = t["x"].detach(), t["norm_w"].detach()
    _, stat = rms_norm64(x, norm_w, EPS, "llama")
    count = 3 if op == "qlora_grouped_linear" else 1
    w = [t[f"w{i}"] for i in range(count)]
    a = [t[f"a{i}"].detach().to(torch.bfloat16) for i in range(count)]
    b = [t[f"b{i}"].detach().to(torch.bfloat16) for i in range(count)]
    g = [t[f"g{i}"].to(torch.bfloat16) for i in range(count)]
    gen = torch.Generator().manual_seed(2)
    us = [torch.randn(5, r, generator=gen) for r in RANKS[:count]]
    norm = {"norm_rstd": stat, "norm_weight": norm_w, "norm_form": "llama"}
    if op == "qlora_linear":
        args = (g[0], x, w[0].packed, w[0].scheme, w[0].block_size, a[0], b[0], us[0], SCALES[0], 0.1,
                torch.tensor(SEEDS[0]), "triton", [True, True, True, False])
        torch.library.opcheck(torch.ops.lowcost.qlora_linear_backward.default, args, norm)
    else:
        args = (g, x, [s for q in w for s in q.packed], [len(q.packed) for q in w], ",".join(q.scheme for q in w),
                [q.block_size for q in w], a, b, us, [False] * 3, list(SCALES), [0.1, 0.0, 0.1],
                torch.tensor(SEEDS), [True, True, True, False], "triton")
        torch.library.opcheck(torch.ops.lowcost.qlora_grouped_linear_backward.default, args, norm)
