"""The ``cuda`` backend of lowcost.ops.linear_cross_entropy on CPU tensors (issue #12): its row-pass op
``softmax_xent_rows`` (csrc/xent_rows.h) against the float64 reference row pass, and the whole chunked loss
(the torch/Triton composition with this op as its row pass) against float64 autograd, loss and every gradient.

The op has a C++ CPU kernel that walks the CUDA kernel's lanes in the same order (csrc/tests/test_cuda_emulated.cpp
checks the emulated CUDA kernel equals it to the bit; tests/gpu runs it on a GPU). The public backend='cuda' needs
CUDA tensors; the ``cuda_on_cpu`` fixture lets the backend choice pass on CPU tensors so the public call (autograd,
chunking, the saved set, the model-level fusion) is exercised end to end.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import lowcost
from lowcost._extension import has_kernel
from lowcost.ops.linear_cross_entropy import linear_cross_entropy
from lowcost.patch.fuse import apply_fusions
from lowcost.patch.fuse_loss import loss_problem
from lowcost.reference.linear_cross_entropy import CrossEntropySpec, softmax_xent_rows
from helpers import TOLERANCE, assert_close_to_reference
from test_linear_cross_entropy import check, make_inputs, run_op
from tiny_models import _ids, llama

pytestmark = pytest.mark.skipif(not has_kernel("softmax_xent_rows", "CPU"),
                                reason="lowcost._C is not built (pip install --no-build-isolation -e .)")
ops = torch.ops.lowcost
lce_module = importlib.import_module("lowcost.ops.linear_cross_entropy")
fuse_loss_module = importlib.import_module("lowcost.patch.fuse_loss")
SETTINGS = [(0.0, 0.0), (0.1, 0.0), (0.0, 2.5), (0.25, 4.0)]   # (label smoothing, soft-cap; 0: none)
PIECE = 8192   # columns of a piece of a row (csrc/xent_rows.h: kXentPieceGroups groups of 4)


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """backend='cuda' resolves on CPU tensors (the C++ CPU kernel stands in for the CUDA one)."""
    real = lce_module.resolve_backend
    monkeypatch.setattr(lce_module, "resolve_backend",
                        lambda name, device, rank=1: "cuda" if name == "cuda" else real(name, device, rank))


# ------------------------------------------------------------------------------------------------- the row op
def _chunk(C, V, dtype, seed=0, all_ignored=False):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(C, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (C,), generator=gen)
    labels[::3] = -100
    if all_ignored:
        labels[:] = -100
    weight = torch.rand(C, generator=gen) + 0.5
    return z, labels, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,V", [(0, 7), (1, 1), (1, 37), (9, 1001), (6, 1024), (4, 3000), (1, PIECE + 1),
                                 (3, 2 * PIECE + 3623)])
@pytest.mark.parametrize("smoothing,softcap", SETTINGS)
def test_row_op_matches_float64(dtype, C, V, smoothing, softcap):
    """loss: float32 arithmetic on the chunk's exact values, so within fp32's tolerance of float64 for every dtype
    (the sum over V is in fp32, 2e-5 normalised is ~100 ulp of headroom at V=3000, and the lanes' sums stay as
    short at V=20007, whose 3 pieces of 8192 columns are folded in piece order); dz: rounded once to the dtype,
    so within the dtype's tolerance (half an ulp of the largest entry, normalised). The last two shapes have rows
    of 2 and 3 pieces (csrc/xent_rows.h), the ones the CUDA launch plan splits over several blocks per row."""
    z, labels, weight = _chunk(C, V, dtype, seed=C + V)
    spec = CrossEntropySpec(-100, smoothing, softcap)
    z64 = z.double()
    loss64_fwd = softmax_xent_rows(z64.clone(), labels, None, spec)
    loss64 = softmax_xent_rows(z64, labels, weight.double(), spec)      # z64 <- dz
    z_fwd = z.clone()
    loss_fwd = ops.softmax_xent_rows(z_fwd, labels, None, -100, smoothing, softcap)
    assert torch.equal(z_fwd, z), "without row_weight z must be left untouched"
    loss = ops.softmax_xent_rows(z, labels, weight, -100, smoothing, softcap)
    assert loss.dtype == torch.float32 and loss.shape == (C,) and z.dtype == dtype
    assert torch.equal(loss, loss_fwd), "the loss must not depend on whether dz is written"
    assert_close_to_reference("loss", loss, loss64_fwd, torch.float32)
    assert_close_to_reference("loss (grad pass)", loss, loss64, torch.float32)
    assert_close_to_reference("dz", z, z64, dtype)
    ignored = labels == -100
    assert torch.all(loss[ignored] == 0) and torch.all(z[ignored] == 0)


def test_row_op_rows_do_not_depend_on_their_chunk():
    """A row's loss and dz are a function of the row alone (its pieces and lanes are fixed by V): the same rows alone,
    in a longer chunk, or one at a time give the same bits, as the CUDA launches with one or several blocks per row
    do (csrc/tests/test_cuda_emulated.cpp holds those to this op bit for bit)."""
    z, labels, weight = _chunk(6, 2 * PIECE + 5, torch.bfloat16, seed=5)
    z_all = z.clone()
    loss_all = ops.softmax_xent_rows(z_all, labels, weight, -100, 0.1, 3.0)
    for c in range(z.shape[0]):
        z_one = z[c:c + 1].clone()
        loss_one = ops.softmax_xent_rows(z_one, labels[c:c + 1], weight[c:c + 1], -100, 0.1, 3.0)
        assert torch.equal(loss_one, loss_all[c:c + 1]) and torch.equal(z_one, z_all[c:c + 1]), f"row {c}"


def test_row_op_all_ignored_rows_are_zero():
    z, labels, weight = _chunk(5, 33, torch.float32, all_ignored=True)
    loss = ops.softmax_xent_rows(z, labels, weight, -100, 0.1, 3.0)
    assert torch.all(loss == 0) and torch.all(z == 0)


def test_row_op_follows_the_triton_formulas():
    """Soft-cap written with exp (c(1 - 2/(exp(2z/c) + 1))) as the Triton kernel does: the capped logits reach
    exactly ±c for large |z|, so the loss stays finite, and dz vanishes there (1 - (zc/c)² = 0)."""
    z = torch.tensor([[200.0, -200.0, 0.5, 1.0]])
    labels = torch.tensor([2])
    loss = ops.softmax_xent_rows(z, labels, torch.ones(1), -100, 0.0, 2.0)
    assert torch.isfinite(loss).all()
    assert z[0, 0] == 0 and z[0, 1] == 0


def test_row_op_opcheck():
    z, labels, weight = _chunk(6, 45, torch.float32, seed=2)
    for w in (weight, None):
        result = torch.library.opcheck(ops.softmax_xent_rows.default, (z.clone(), labels, w, -100, 0.1, 2.0))
        assert all(v == "SUCCESS" for v in result.values()), result


BAD = [
    ("label out of range", dict(labels=torch.tensor([0, 50, 1])), "labels must be in [0, 45) or ignore_index=-100"),
    ("int32 labels", dict(labels=torch.tensor([0, 1, 2], dtype=torch.int32)), "labels must be int64"),
    ("label count", dict(labels=torch.tensor([0, 1])), "labels must be a 1-D (C,) tensor with C=3"),
    ("weight dtype", dict(weight=torch.ones(3, dtype=torch.float64)), "row_weight must be float32"),
    ("column stride", dict(z=torch.randn(45, 3).t()), "z must have unit column stride"),
    ("no classes", dict(z=torch.randn(3, 0)), "z must have V >= 1 columns"),
    ("float64 z", dict(z=torch.randn(3, 45, dtype=torch.float64)), "z must be float32, float16 or bfloat16"),
    ("smoothing", dict(smoothing=1.5), "label_smoothing must be in [0, 1]"),
    ("softcap", dict(softcap=-1.0), "softcap must be finite and >= 0"),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_row_op_bad_input(case, change, message):
    args = dict(z=torch.randn(3, 45), labels=torch.tensor([0, -100, 44]), weight=torch.ones(3), smoothing=0.0,
                softcap=0.0) | change
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ops.softmax_xent_rows(args["z"], args["labels"], args["weight"], -100, args["smoothing"], args["softcap"])


# ----------------------------------------------------------------------------------------- the whole loss
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,K,V,chunk", [(1, 24, 37, None), (13, 40, 100, 5), (29, 17, 1001, 8)])
def test_cuda_loss_fp32_matches_float64(cuda_on_cpu, reduction, M, K, V, chunk):
    check(make_inputs(M, K, V, seed=M), reduction, "cuda", chunk=chunk)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("smoothing,softcap", [(0.1, None), (0.0, 2.5), (0.25, 4.0)])
def test_cuda_loss_smoothing_and_softcap(cuda_on_cpu, reduction, smoothing, softcap):
    check(make_inputs(11, 20, 53, seed=2), reduction, "cuda", smoothing=smoothing, softcap=softcap, chunk=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_loss_trainable_head_no_bias_and_edge_rows(cuda_on_cpu, reduction):
    check(make_inputs(10, 16, 45, bias=False, seed=3), reduction, "cuda", train_w=True, chunk=3)
    check(make_inputs(6, 16, 45, seed=3, ignored=range(6)), reduction, "cuda", chunk=4)   # every label ignored
    check(make_inputs(0, 16, 45, seed=3), reduction, "cuda")                               # M = 0


@pytest.mark.parametrize("reduction,dropout", [("mean", 0.0), ("mean", 0.2), ("none", 0.2), ("sum", 0.3)])
def test_cuda_loss_lora_head_with_lora_linear_masks(cuda_on_cpu, reduction, dropout):
    """dA, dB (and dh through the dropped input) with the mask lowcost.ops.lora_linear draws for the seed."""
    lora = {"lora_scale": 1.5, "lora_dropout": dropout, "seed": 11}
    check(make_inputs(15, 24, 70, r=5, seed=4), reduction, "cuda", chunk=4, lora=lora)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_loss_low_precision(cuda_on_cpu, dtype):
    check(make_inputs(14, 32, 70, dtype=dtype, seed=6), "mean", "cuda", dtype=dtype, smoothing=0.1, softcap=3.0,
          chunk=6)


def test_cuda_loss_equals_torch_backend_closely(cuda_on_cpu):
    """fp32: the two row passes differ only in summation order (lanes vs torch's logsumexp)."""
    inputs = make_inputs(20, 24, 301, r=3, seed=9)
    grad = torch.tensor(1.0)
    kw = dict(reduction="mean", label_smoothing=0.1, softcap=5.0, chunk=7, lora_dropout=0.1, seed=3)
    loss_c, grads_c = run_op(inputs, grad, False, "cuda", **kw)
    loss_t, grads_t = run_op(inputs, grad, False, "torch", **kw)
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-6, atol=0)
    for name in grads_t:
        torch.testing.assert_close(grads_c[name], grads_t[name], rtol=1e-5, atol=1e-7)


def test_public_cuda_backend_needs_cuda_tensors():
    inputs = make_inputs(3, 8, 11)
    with pytest.raises(ValueError, match="backend='cuda' is not available: the CUDA kernels need CUDA tensors"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"], backend="cuda")


def test_float64_is_refused_on_cuda(cuda_on_cpu):
    inputs = make_inputs(3, 8, 11, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs only on backend='torch' \\(got backend='cuda'\\)"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"], backend="cuda")


# ------------------------------------------------------------------------------------------- model level
def _llama_with_lora_head(backend):
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["lm_head"]), fused=None)
    torch.manual_seed(3)
    torch.nn.init.normal_(model.lm_head.lora_B, std=0.1)
    model.lm_head.backend = backend
    return model


def test_fusion_refuses_a_cuda_head_where_the_kernels_cannot_run():
    why = loss_problem(_llama_with_lora_head("cuda"))
    assert why == ("lm_head asks for backend='cuda', which cannot run here: the CUDA kernels need CUDA tensors "
                   "(tensors are on cpu)")


def test_fused_loss_with_a_cuda_head_equals_the_unfused_model(cuda_on_cpu, monkeypatch):
    """Tiny Llama, LoRA on lm_head (dropout on, training mode): the fused loss on the cuda backend's row pass gives
    the unfused model's loss and every adapter gradient (same seeds, same masks)."""
    monkeypatch.setattr(fuse_loss_module, "unavailable_reason", lambda name, device, rank: None)
    ids = _ids()
    results = []
    for fused in (True, False):
        model = _llama_with_lora_head("cuda" if fused else "torch")
        model.train()
        if fused:
            report = apply_fusions(model, ("loss",))
            assert report.kinds() == {"loss"}, str(report)
        torch.manual_seed(21)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys() and any("lm_head" in n for n in grads)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
