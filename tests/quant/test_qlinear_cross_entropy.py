"""lowcost.ops.linear_cross_entropy with a QuantizedWeight head (NF4, int8, GGUF Q8_0 and K-quants) against the
float64 unfused computation on the DEQUANTIZED weight: loss and every gradient (dh, dbias, LoRA dA/dB), odd
shapes (V odd, M = 0 and 1, chunk < M), each reduction and ignored rows; opcheck; saved tensors; and the model
level: a tiny Llama whose lm_head is quantized takes the fused loss and equals its unfused loss and gradients."""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops.backend import triton_usable
from lowcost.ops.qlinear_cross_entropy import _qlce_backward_op, _qlce_op
from lowcost.quant import quantize
from helpers import assert_loss_and_grads_close, cross_entropy_grad, cross_entropy_truth64
from quant_cases import k_for, make_quantized
from tiny_models import llama

SCHEMES = ("nf4", "int8", "q8_0", "q4_k")
HAS_TRITON = triton_usable(torch.device("cpu"))


def _inputs(M, K, V, dtype=torch.float32, bias=True, r=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (M,), generator=gen)
    if M > 3:
        labels[3] = -100       # an ignored row
    out = {"hidden": rand(M, K, std=3.0), "labels": labels, "bias": rand(V, std=0.5) if bias else None}
    if r:
        out["lora_a"], out["lora_b"] = rand(r, K, std=K ** -0.5), rand(V, r, std=r ** -0.5)
    return out


def _run(t, weight, grad, reduction, backend="torch", **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in t.items() if k != "labels" and v is not None}
    loss = lowcost.ops.linear_cross_entropy(leaves["hidden"], weight, t["labels"], leaves.get("bias"),
                                            reduction=reduction, lora_a=leaves.get("lora_a"),
                                            lora_b=leaves.get("lora_b"), backend=backend, **kwargs)
    loss.backward(grad)
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def _check(t, weight, reduction, dtype=torch.float32, backend="torch", lora=None, smoothing=0.0, softcap=None,
           chunk=None):
    lora = lora or {}
    grad = cross_entropy_grad(reduction, t["labels"], dtype)
    loss, grads = _run(t, weight, grad, reduction, backend, chunk=chunk, label_smoothing=smoothing, softcap=softcap,
                       **lora)
    loss64, grads64 = cross_entropy_truth64(t, grad, reduction, weight64=weight.dequantize(torch.float64),
                                            smoothing=smoothing, softcap=softcap, scale=lora.get("lora_scale", 1.0),
                                            dropout=lora.get("lora_dropout", 0.0), seed=lora.get("seed", 0))
    assert_loss_and_grads_close(weight.scheme, loss, grads, loss64, grads64, t, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M, K, V, chunk", [(1, 64, 37, None), (13, 100, 101, 5), (0, 70, 19, None),
                                            (29, 260, 211, 8)])
def test_quantized_head_matches_float64_on_the_dequantized_weight(scheme, reduction, M, K, V, chunk):
    """V odd, M = 0 and 1, chunk < M; K = 100, 70, 260 pad NF4's 64-blocks (GGUF: K rounded down to blocks)."""
    K = k_for(scheme, K)
    _check(_inputs(M, K, V, seed=M), make_quantized(scheme, V, K, seed=1), reduction, chunk=chunk)


@pytest.mark.parametrize("scheme", ["nf4", "q6_k"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_head_on_a_quantized_base(scheme, reduction, dropout):
    """dA, dB, dh and dbias of a LoRA head over a quantized W, with smoothing and soft-cap, the same Philox mask."""
    K = k_for(scheme, 256)
    t = _inputs(11, K, 53, r=5, seed=4)
    lora = {"lora_scale": 0.75, "lora_dropout": dropout, "seed": 9}
    _check(t, make_quantized(scheme, 53, K, seed=2), reduction, lora=lora, smoothing=0.1, softcap=4.0, chunk=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden(dtype):
    _check(_inputs(9, 64, 41, dtype=dtype, seed=5), make_quantized("q8_0", 41, 64, seed=3, dtype=dtype), "mean",
           dtype=dtype, chunk=4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_backend(reduction):
    """The Triton row pass and dequantizing GEMMs (interpreted on CPU), LoRA head, q4_1."""
    t = _inputs(6, 64, 23, r=3, seed=6)
    _check(t, make_quantized("q4_1", 23, 64, seed=4), reduction, backend="triton",
           lora={"lora_scale": 2.0, "lora_dropout": 0.0, "seed": 1}, chunk=4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    t = _inputs(7, 64, 19, r=3, seed=1)
    w = make_quantized("nf4", 19, 64, seed=1)
    hidden, a, b = (t[k].requires_grad_() for k in ("hidden", "lora_a", "lora_b"))
    needs = [False] * 4 if reduction == "none" else [True, False, True, True]
    args = (hidden, w.packed, w.scheme, 19, w.block_size, t["labels"], t["bias"], a, b, 0.5, 0.2, torch.tensor(3),
            -100, 0.1, 2.0, reduction, 3, needs, "torch", torch.float32)
    result = torch.library.opcheck(_qlce_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    grad = torch.tensor(1.0) if reduction != "none" else torch.ones(7)
    args = (grad, hidden.detach(), w.packed, w.scheme, 19, w.block_size, t["labels"], t["bias"], a.detach(),
            b.detach(), 0.5, 0.2, torch.tensor(3), -100, 0.1, 2.0, reduction, 3, [True] * 4, "torch")
    result = torch.library.opcheck(_qlce_backward_op, args, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def _saved(fn):
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x) or x, lambda x: x):
        out = fn()
    return out, packed


def test_saves_no_logits():
    """"mean": only dh (M, K); "none": the caller's hidden, labels, seed and the stored weight (no new memory)."""
    M, K, V = 40, 64, 500
    w = make_quantized("q8_0", V, K, seed=2)
    t = _inputs(M, K, V, bias=False, seed=3)
    hidden = t["hidden"].requires_grad_()
    loss, packed = _saved(lambda: lowcost.ops.linear_cross_entropy(hidden, w, t["labels"], chunk=8))
    assert [tuple(x.shape) for x in packed if x.numel()] == [(M, K)]
    loss.backward()
    loss, packed = _saved(lambda: lowcost.ops.linear_cross_entropy(hidden, w, t["labels"], reduction="none"))
    stored = {x.data_ptr() for x in w.packed}
    activations = [x for x in packed if x.data_ptr() not in stored]
    assert activations[0].data_ptr() == hidden.data_ptr()
    assert sum(x.numel() for x in activations) == M * K + M + 1     # hidden, labels, seed: no (M, V) tensor


def test_bad_input_names_the_argument():
    w = make_quantized("int8", 30, 8)
    h, y = torch.randn(3, 8), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"bias must be \(30,\) in hidden's dtype"):
        lowcost.ops.linear_cross_entropy(h, w, y, torch.randn(29))
    with pytest.raises(ValueError, match="hidden must have last dimension K=8"):
        lowcost.ops.linear_cross_entropy(torch.randn(3, 5), w, y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\)"):
        lowcost.ops.linear_cross_entropy(h, w, torch.tensor([0, 31, 1]))


# ----------------------------------------------------------------------------------------------- model level
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _quantized_llama(scheme, head_lora):
    model = llama().eval()
    model.requires_grad_(False)
    quantize(model, scheme, targets=r".*(proj|lm_head)")
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if head_lora else [])
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=targets),
                           fused=("loss",))
    return model, report


def _step(model, ids, fused: bool, seed=3):
    """Loss and adapter gradients with seeded random adapters; ``fused`` False runs the unfused forward."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for p in model.parameters():
            p.grad = None
    model.train()
    torch.manual_seed(seed)
    out = model(ids, labels=ids, return_logits=not fused)
    assert (out.logits is None) == fused
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare_fused_and_unfused(model, report, head_lora, ids):
    assert "fused loss" in str(report) and "not fused loss" not in str(report), str(report)
    assert type(model.lm_head).__name__ == ("LoRALinear" if head_lora else "QuantizedLinear")
    loss_f, grads_f = _step(model, ids, fused=True)
    loss_u, grads_u = _step(model, ids, fused=False)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys() and any("lm_head" in n for n in grads_f) == head_lora
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scheme, head_lora", [("nf4", False), ("int8", True)])
def test_tiny_llama_with_a_quantized_lm_head_takes_the_fused_loss(scheme, head_lora):
    """The report says "fused loss"; the fused loss equals the unfused model's and so does every adapter gradient
    (a LoRA head's dropout mask drawn the same way on both paths)."""
    model, report = _quantized_llama(scheme, head_lora)
    _compare_fused_and_unfused(model, report, head_lora, IDS)


@pytest.mark.parametrize("head_lora", [False, True])
def test_gguf_model_with_its_tied_q8_0_head_takes_the_fused_loss(tmp_path, head_lora):
    """The demo's case: a GGUF loaded with quantize="gguf", its lm_head the tied Q8_0 token embedding."""
    pytest.importorskip("gguf", reason="the tiny GGUF file is written with the gguf package")
    from gguf_files import write_tiny_llama
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    model = lowcost.load_pretrained(path, quantize="gguf", cache_dir=tmp_path / "cache", verbose=False)
    assert model.lm_head.weight.scheme == "q8_0" and model.lm_head.weight is model.model.embed_tokens.weight
    targets = ["q_proj", "down_proj"] + (["lm_head"] if head_lora else [])
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=targets),
                           fused=("loss",))
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    _compare_fused_and_unfused(model, report, head_lora, ids)


def test_a_quantized_head_whose_backend_cannot_run_is_refused_with_the_reason():
    from lowcost.patch.fuse_loss import loss_problem
    model = llama().eval()
    model.requires_grad_(False)
    quantize(model, "nf4", targets=r".*(proj|lm_head)")
    assert loss_problem(model) == ""
    model.lm_head.backend = "cuda"
    assert "lm_head asks for backend='cuda', which cannot run here" in loss_problem(model)
