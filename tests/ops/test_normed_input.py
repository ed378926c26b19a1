"""The "norm" fusion's mechanism (lowcost.ops.normed_input): a LoRA op that reads lowcost.ops.rms_norm's output
keeps the norm's input and rstd instead of it, and gives bit-identical results to reading an untagged copy;
anything written in place since the norm ran makes it save the tensor itself."""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops import layer_norm, lora_gated_mlp, lora_linear, rms_norm
from lowcost.ops.backend import triton_usable
from lowcost.ops.normed_input import pack_input, source_of, unpack_input
from normed_cases import H, N, norm_and_lora_params

EPS = 1e-5


TRAINED = ("x", "a", "b", "a_g", "b_g", "a_u", "b_u", "a_d", "b_d")


def _linear(y, t, backend):
    return lora_linear(y, t["w"], t["a"], t["b"], 2.0, dropout=0.2, seed=5, backend=backend)


def _mlp(y, t, backend):
    return lora_gated_mlp(y, (t["w_g"], t["a_g"], t["b_g"]), (t["w_u"], t["a_u"], t["b_u"]),
                          (t["w_d"], t["a_d"], t["b_d"]), (1.0, 0.5, 2.0), dropouts=(0.1, 0.2, 0.3),
                          seeds=(1, 2, 3), backend=backend)


CONSUMERS = {"lora_linear": _linear, "lora_gated_mlp": _mlp}


NORMS = {"rms_norm": lambda t: rms_norm(t["x"], t["norm_w"], EPS),
         "layer_norm": lambda t: layer_norm(t["x"], t["norm_w"], t["norm_b"], EPS)}


def _step(consumer, backend, untag: bool, norm: str = "rms_norm"):
    """(output, gradients, whether a normed (M, H) tensor was saved) of a norm → consumer."""
    t = {k: v.clone().requires_grad_(k in TRAINED) for k, v in norm_and_lora_params().items()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = NORMS[norm](t)
        out = CONSUMERS[consumer](y.clone() if untag else y, t, backend)
    out.backward(torch.ones_like(out))
    big = [s for s in saved if s.numel() == t["x"].numel()]
    keeps_y = any(s.data_ptr() != t["x"].data_ptr() for s in big)
    return out.detach(), {k: t[k].grad for k in TRAINED if t[k].grad is not None}, keeps_y


def _backends():
    out = ["torch"]
    if triton_usable(torch.device("cpu")):
        out.append("triton")
    return out


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_consumer_keeps_norm_input_not_normed_and_results_are_bit_identical(consumer, backend, norm):
    out, grads, keeps_y = _step(consumer, backend, untag=False, norm=norm)
    out_ref, grads_ref, keeps_y_ref = _step(consumer, backend, untag=True, norm=norm)
    assert keeps_y_ref, "the untagged copy must be saved (else this test could not fail)"
    assert not keeps_y, "the normed tensor was saved although its norm's input and rstd were available"
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert torch.equal(grads[name], grads_ref[name]), name


def test_every_form_and_low_precision_rebuild_exactly():
    for form, dtype in (("gemma", torch.float32), ("llama", torch.bfloat16), ("gemma", torch.float16)):
        t = {k: v.to(dtype).requires_grad_(k in TRAINED) for k, v in norm_and_lora_params(1).items()}
        y = rms_norm(t["x"], t["norm_w"], EPS, form)
        stored, how = pack_input(y)
        assert how.kind == f"rms:{form}" and torch.equal(unpack_input(stored, how)[0], y.detach())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = {k: v.to(dtype).requires_grad_(k == "x") for k, v in norm_and_lora_params(2).items()}
        y = layer_norm(t["x"], t["norm_w"], t["norm_b"], EPS)
        stored, how = pack_input(y)
        assert how.kind == "layer" and torch.equal(unpack_input(stored, how)[0], y.detach())


@pytest.mark.parametrize("write", ["normed", "norm input", "norm weight"])
def test_an_in_place_write_after_the_norm_makes_the_consumer_save_the_tensor_itself(write):
    t = {k: v.clone().requires_grad_(k in ("x", "a", "b")) for k, v in norm_and_lora_params().items()}
    x = t["x"].clone()
    y = rms_norm(x, t["norm_w"], EPS)
    assert source_of(y) is not None
    target = {"normed": y, "norm input": x, "norm weight": t["norm_w"]}[write]
    with torch.no_grad():
        target.mul_(1.5)
    assert source_of(y) is None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        out = lora_linear(y, t["w"], t["a"], t["b"], 2.0)
    assert any(s is y or s.data_ptr() == y.data_ptr() for s in saved)
    grads = torch.autograd.grad(out.sum(), (t["a"], t["b"]))   # (the norm's own backward would refuse x's write)
    reference = y.detach().clone()
    a, b = t["a"].detach().clone().requires_grad_(), t["b"].detach().clone().requires_grad_()
    lora_linear(reference, t["w"], a, b, 2.0).sum().backward()
    assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])


def test_quantized_consumers_keep_norm_input_too():
    from lowcost.reference.quant import QuantizedWeight
    from lowcost.reference.quant.nf4 import quantize_nf4
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(N, H, generator=gen, dtype=torch.float64) * H ** -0.5
    weight = QuantizedWeight("nf4", (N, H), quantize_nf4(dense, 64, False), 64, torch.float32)
    results = []
    for untag in (False, True):
        t = {k: v.clone().requires_grad_(k in TRAINED) for k, v in norm_and_lora_params().items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = rms_norm(t["x"], t["norm_w"], EPS)
            out = lora_linear(y.clone() if untag else y, weight, t["a"], t["b"], 2.0, dropout=0.1, seed=9)
        out.sum().backward()
        kept_y = any(s.numel() == y.numel() and s.data_ptr() != t["x"].data_ptr() for s in saved)
        results.append((kept_y, out.detach(), t["x"].grad, t["a"].grad, t["b"].grad))
    assert results[1][0] and not results[0][0]
    assert all(torch.equal(p, q) for p, q in zip(results[0][1:], results[1][1:]))


def test_model_without_the_norm_fusion_is_unchanged_by_the_tag():
    """A plain consumer (torch matmul) of a tagged tensor: the tag is inert."""
    x = torch.randn(4, H, requires_grad=True)
    w = torch.randn(N, H, requires_grad=True)
    y = rms_norm(x, torch.ones(H), EPS)
    (y @ w.t()).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = rms_norm(x2, torch.ones(H), EPS).clone()
    (y2 @ w2.t()).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
    assert lowcost.ops.rms_norm is rms_norm


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_tag_where_nothing_is_saved(mode):
    """Under no_grad and inference_mode (whose tensors have no version counter) the norms run untagged, and
    so does a norm whose output needs no gradient (it saved nothing: keeping its source would cost more)."""
    y = rms_norm(torch.randn(3, H), torch.ones(H), EPS)
    assert not y.requires_grad and source_of(y) is None
    t = norm_and_lora_params()
    with getattr(torch, mode)():
        for norm in NORMS.values():
            y = norm(t)
            assert source_of(y) is None
            assert lora_linear(y, t["w"], t["a"], t["b"], 2.0).shape == (3, 5, N)
