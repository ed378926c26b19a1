"""The "norm" fusion on the Triton backend: an RMSNorm output feeding ``lora_linear(backend="triton")`` is rebuilt
inside the x-pass's tile loads (kernels/norm_tile.py), and one feeding ``lora_grouped_linear(backend="triton")``
inside the dA pass's loads, so backward makes no (M, K) normed tensor; every gradient matches the float64 truth,
and each is bit for bit the run that reads a materialised (untagged) copy."""
from __future__ import annotations

import pytest
import torch

import lowcost.ops.normed_input as normed_input
from lowcost.ops import layer_norm, lora_grouped_linear, lora_linear, rms_norm
from lowcost.ops.backend import triton_usable
from lowcost.reference import dropout_keep_mask, keep_scale
from lowcost.reference.rms_norm import rms_norm as rms_norm64
from helpers import assert_close_to_reference

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton cannot run here (not installed, or no GPU and no TRITON_INTERPRET=1)")

EPS, SCALE, SEED = 1e-5, 1.7, 13
NAMES = ("x", "norm_w", "a", "b")   # the leaves that train (the base weight W is frozen)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(M: int, K: int, N: int, r: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(M + K + r)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    t = {"x": rand(M, K, std=3.0), "norm_w": 1.0 + rand(K, std=0.2), "w": rand(N, K, std=K ** -0.5),
         "a": rand(r, K, std=K ** -0.5), "b": rand(N, r, std=r ** -0.5), "g": rand(M, N)}
    return {k: v.to(DEVICE).requires_grad_(k in NAMES) for k, v in t.items()}


def _run(t: dict, form: str, dropout: float, untag: bool, cast=None):
    """Gradients of x → RMSNorm → lora_linear(triton), with g as the output's gradient; ``untag``: the LoRA op
    reads a plain copy of the norm's output (the materialised path); ``cast``: under autocast to that dtype."""
    t = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    with torch.autocast(DEVICE, dtype=cast, enabled=cast is not None):
        y = rms_norm(t["x"], t["norm_w"], EPS, form)
        out = lora_linear(y.clone() if untag else y, t["w"], t["a"], t["b"], SCALE, dropout=dropout, seed=SEED,
                          backend="triton")
    out.backward(t["g"].to(out.dtype))
    return {k: t[k].grad for k in NAMES}


def _truth64(t: dict, form: str, dropout: float) -> dict:
    """Plain float64 autograd of the unfused chain (lowcost's reference norm, the spec's Philox mask)."""
    leaves = {k: t[k].detach().cpu().double().requires_grad_() for k in NAMES}
    M, K = leaves["x"].shape
    y, _ = rms_norm64(leaves["x"], leaves["norm_w"], EPS, form)
    mask = dropout_keep_mask(M, K, SEED, dropout).double() * (keep_scale(dropout) if dropout else 1.0)
    out = y @ t["w"].detach().cpu().double().t() + SCALE * ((y * mask) @ leaves["a"].t()) @ leaves["b"].t()
    out.backward(t["g"].detach().cpu().double())
    return {k: v.grad for k, v in leaves.items()}


class _NoTorchRebuild:
    """Counts the torch rebuilds of a normed input in backward (``normed_input._rebuild``: the consumers' and their
    backward ops' torch rebuilds all run there); with ``forbid`` each one raises instead."""

    def __init__(self, monkeypatch, forbid: bool):
        self.calls = 0

        def spy(real):
            def wrapped(*args, **kwargs):
                self.calls += 1
                if forbid:
                    raise AssertionError("the normed (M, K) tensor was rebuilt in torch on the Triton path")
                return real(*args, **kwargs)
            return wrapped
        monkeypatch.setattr(normed_input, "_rebuild", spy(normed_input._rebuild))


SHAPES = [(1, 100, 24, 5), (0, 100, 24, 5), (37, 100, 24, 5), (70, 72, 40, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_rebuild_in_the_x_pass_matches_float64_and_the_materialised_run_bit_for_bit(form, dropout, M, K, N, r,
                                                                                    dtype, monkeypatch):
    t = _leaves(M, K, N, r, dtype)
    materialised = _run(t, form, dropout, untag=True)
    _NoTorchRebuild(monkeypatch, forbid=True)
    fused = _run(t, form, dropout, untag=False)
    for name in NAMES:   # dA bit for bit above all: it is what the x-pass computes from the rebuilt tiles
        assert fused[name].dtype == t[name].dtype, name
        assert torch.equal(fused[name], materialised[name]), f"d{name} differs from the materialised run"
    truth = _truth64(t, form, dropout)
    for name in NAMES:
        # The chain rounds y to x's dtype once more than the float64 truth (the norm's output), and the norm's
        # backward multiplies by rstd: the per-dtype rule of tests/helpers.py holds with that one rounding.
        assert_close_to_reference(f"{form} d{name}", fused[name].cpu(), truth[name], dtype)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_autocast_copy_is_rebuilt_and_rounded_in_the_kernel(form, cast, monkeypatch):
    """fp32 norm, autocast to 16 bits: the kernel rebuilds y in fp32 and rounds it to the autocast dtype (round to
    nearest even, as ``Tensor.to``), bit for bit the copy autocast made."""
    t = _leaves(37, 100, 24, 5, torch.float32)
    materialised = _run(t, form, 0.1, untag=True, cast=cast)
    _NoTorchRebuild(monkeypatch, forbid=True)
    fused = _run(t, form, 0.1, untag=False, cast=cast)
    for name in NAMES:
        assert torch.equal(fused[name], materialised[name]), f"d{name} differs from the materialised run"
    truth = _truth64(t, form, 0.1)
    for name in NAMES:
        assert_close_to_reference(f"{form} d{name}", fused[name].cpu(), truth[name], cast)


def _run_with(monkeypatch, make_y, train_w: bool = False) -> tuple[int, dict, dict]:
    """(torch rebuilds counted in the tagged run, its gradients, the untagged run's) for y = make_y(t)."""
    t = _leaves(9, 100, 24, 5, torch.float32)
    t["w"].requires_grad_(train_w)
    grads = []
    for untag in (True, False):
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
        counter = _NoTorchRebuild(monkeypatch, forbid=False)
        y = make_y(leaves)
        out = lora_linear(y.clone() if untag else y, leaves["w"], leaves["a"], leaves["b"], SCALE, dropout=0.1,
                          seed=SEED, backend="triton")
        out.backward(leaves["g"])
        grads.append({k: v.grad for k, v in leaves.items() if v.grad is not None})
        monkeypatch.undo()
    return counter.calls, grads[1], grads[0]


@pytest.mark.parametrize("case", ["dW needed", "LayerNorm", "weight of another dtype"])
def test_torch_rebuild_where_the_kernel_does_not_rebuild(case, monkeypatch):
    """dW = gᵀy needs y itself, LayerNorm is rebuilt by torch, and an RMSNorm whose weight's dtype differs from
    its input's is not a compiled variant: those keep the torch rebuild (counted: the spy works), same results."""
    make_y = {"dW needed": lambda t: rms_norm(t["x"], t["norm_w"], EPS),
              "LayerNorm": lambda t: layer_norm(t["x"], t["norm_w"], None, EPS),
              "weight of another dtype": lambda t: rms_norm(t["x"], t["norm_w"].to(torch.bfloat16), EPS)}
    calls, fused, materialised = _run_with(monkeypatch, make_y[case], train_w=case == "dW needed")
    assert calls == 1
    assert fused.keys() == materialised.keys()
    for name in fused:
        assert torch.equal(fused[name], materialised[name]), name


def test_other_backends_rebuild_in_the_backward_op():
    """A direct call of ``lowcost::lora_linear_backward`` with the norm arguments on the torch backend rebuilds
    the input in torch: the same gradients as passing the normed tensor itself."""
    t = _leaves(7, 100, 24, 5, torch.float32)
    with torch.no_grad():
        y, stat = rms_norm64(t["x"], t["norm_w"], EPS, "gemma")
        u = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))   # any saved u: both calls read it
        args = (t["g"], t["w"], t["a"], t["b"], u, SCALE, 0.1, torch.tensor(SEED), "torch", [True, True, True, False])
        op = torch.ops.lowcost.lora_linear_backward
        plain = op(args[0], y, *args[1:])
        rebuilt = op(args[0], t["x"].detach(), *args[1:], norm_rstd=stat, norm_weight=t["norm_w"].detach(),
                     norm_form="gemma")
    for p, q in zip(plain, rebuilt):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------ grouped projections
OUTS, RANKS, SCALES, SEEDS = (24, 8, 8), (5, 3, 16), (2.0, 1.0, 0.5), (1, 2, 3)
GROUPED_NAMES = ("x", "norm_w", "a0", "a1", "a2", "b0", "b1", "b2")


def _grouped_leaves(M: int, K: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(M + K)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    t = {"x": rand(M, K, std=3.0), "norm_w": 1.0 + rand(K, std=0.2)}
    for i, (n, r) in enumerate(zip(OUTS, RANKS)):
        t.update({f"w{i}": rand(n, K, std=K ** -0.5), f"a{i}": rand(r, K, std=K ** -0.5),
                  f"b{i}": rand(n, r, std=r ** -0.5), f"g{i}": rand(M, n)})
    return {k: v.to(DEVICE).requires_grad_(k in GROUPED_NAMES) for k, v in t.items()}


def _run_grouped(t: dict, form: str, dropouts, untag: bool, cast=None) -> dict:
    t = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    with torch.autocast(DEVICE, dtype=cast, enabled=cast is not None):
        y = rms_norm(t["x"], t["norm_w"], EPS, form)
        outs = lora_grouped_linear(y.clone() if untag else y, [t[f"w{i}"] for i in range(3)],
                                   [t[f"a{i}"] for i in range(3)], [t[f"b{i}"] for i in range(3)], list(SCALES),
                                   dropouts=list(dropouts), seeds=list(SEEDS), backend="triton")
    torch.autograd.backward(outs, [t[f"g{i}"].to(out.dtype) for i, out in enumerate(outs)])
    return {k: t[k].grad for k in GROUPED_NAMES}


def _grouped_truth64(t: dict, form: str, dropouts) -> dict:
    leaves = {k: t[k].detach().cpu().double().requires_grad_() for k in GROUPED_NAMES}
    M, K = leaves["x"].shape
    y, _ = rms_norm64(leaves["x"], leaves["norm_w"], EPS, form)
    for i, (p, seed, s) in enumerate(zip(dropouts, SEEDS, SCALES)):
        mask = dropout_keep_mask(M, K, seed, p).double() * (keep_scale(p) if p else 1.0)
        out = y @ t[f"w{i}"].detach().cpu().double().t() + s * ((y * mask) @ leaves[f"a{i}"].t()) @ leaves[f"b{i}"].t()
        out.backward(t[f"g{i}"].detach().cpu().double(), retain_graph=True)
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype,cast", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                        (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("dropouts", [(0.0, 0.0, 0.0), (0.1, 0.1, 0.0)])
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_grouped_rebuild_in_the_da_pass_matches_float64_and_the_materialised_run_bit_for_bit(form, dropouts, M,
                                                                                            dtype, cast, monkeypatch):
    t = _grouped_leaves(M, 100, dtype)
    materialised = _run_grouped(t, form, dropouts, untag=True, cast=cast)
    _NoTorchRebuild(monkeypatch, forbid=True)
    fused = _run_grouped(t, form, dropouts, untag=False, cast=cast)
    truth = _grouped_truth64(t, form, dropouts)
    for name in GROUPED_NAMES:
        assert torch.equal(fused[name], materialised[name]), f"d{name} differs from the materialised run"
        assert_close_to_reference(f"grouped {form} d{name}", fused[name].cpu(), truth[name], cast or dtype)
