"""The "norm" fusion under ``torch.autocast`` (lowcost.ops.normed_input.cast_input): the norm runs in fp32, the
consumer's autocast rule casts its output to bf16, and that copy must carry a tag too, so the consumer keeps the
norm's x / rstd / w and not the bf16 copy. Results must be bit-identical to reading an untagged tensor (the
consumer rebuilds the fp32 output and casts it again; the cast is deterministic).

Every case counts what autograd saves with saved_tensors_hooks, and checks that the untagged run DOES keep a
bf16 (M, H) copy, so a counting mistake cannot make the test pass."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lowcost.ops import layer_norm, lora_gated_mlp, lora_linear, rms_norm
from lowcost.ops.backend import triton_usable
from lowcost.ops.normed_input import cast_input, pack_input, source_of, unpack_input
from lowcost.reference.quant import QuantizedWeight, quantize_nf4
from normed_cases import norm_and_lora_params

BF16 = torch.bfloat16
EPS = 1e-5
TRAINED = ("x", "norm_w", "a", "b", "a_g", "b_g", "a_u", "b_u", "a_d", "b_d")


def _nf4(weight):
    return QuantizedWeight("nf4", tuple(weight.shape), quantize_nf4(weight.double(), 64, False), 64, torch.float32)


def _linear(y, t, backend, quantized=False):
    weight = _nf4(t["w"]) if quantized else t["w"]
    return lora_linear(y, weight, t["a"], t["b"], 2.0, dropout=0.2, seed=5, backend=backend)


def _mlp(y, t, backend, quantized=False):
    weight = _nf4 if quantized else (lambda w: w)
    return lora_gated_mlp(y, (weight(t["w_g"]), t["a_g"], t["b_g"]), (weight(t["w_u"]), t["a_u"], t["b_u"]),
                          (weight(t["w_d"]), t["a_d"], t["b_d"]), (1.0, 0.5, 2.0), dropouts=(0.1, 0.2, 0.3),
                          seeds=(1, 2, 3), backend=backend)


CONSUMERS = {"lora_linear": _linear, "lora_gated_mlp": _mlp,
             "qlora_linear (nf4)": lambda y, t, backend: _linear(y, t, backend, quantized=True),
             "qlora_gated_mlp (nf4)": lambda y, t, backend: _mlp(y, t, backend, quantized=True)}
NORMS = {"rms_norm llama": lambda t: rms_norm(t["x"], t["norm_w"], EPS, "llama"),
         "rms_norm gemma": lambda t: rms_norm(t["x"], t["norm_w"], EPS, "gemma"),
         "layer_norm": lambda t: layer_norm(t["x"], t["norm_w"], t["norm_b"], EPS)}


def _leaves(seed=0):
    return {k: v.clone().requires_grad_(k in TRAINED) for k, v in norm_and_lora_params(seed).items()}


class SavedLog:
    """The tensors autograd saves inside the ``with`` block."""

    def __init__(self):
        self.saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def low_copies(self, numel: int) -> set:
        """Storages of the bf16 tensors of ``numel`` elements that were saved (a normed copy)."""
        return {s.untyped_storage().data_ptr() for s in self.saved if s.dtype == BF16 and s.numel() == numel}

    def storages(self, numel: int) -> set:
        return {s.untyped_storage().data_ptr() for s in self.saved if s.numel() == numel}


def _step(norm, consumers, backend, untag: bool, backward_in_autocast: bool = False):
    """(outputs, gradients, SavedLog) of norm → each consumer under autocast bf16; ``untag`` feeds the consumers
    an untagged copy of the norm's output (same values) instead of the output itself."""
    t = _leaves()
    with SavedLog() as log, torch.autocast("cpu", dtype=BF16):
        y = NORMS[norm](t)
        assert y.dtype == torch.float32      # the norm is not cast: it runs in its input's dtype
        outs = [CONSUMERS[c](y.clone() if untag else y, t, backend) for c in consumers]
        total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        if backward_in_autocast:
            total.backward()
    if not backward_in_autocast:
        total.backward()
    return [o.detach() for o in outs], {k: t[k].grad for k in TRAINED if t[k].grad is not None}, log, t


def _assert_same(got, want):
    outs, grads = got
    outs_ref, grads_ref = want
    assert all(o.dtype == BF16 and torch.equal(o, r) for o, r in zip(outs, outs_ref))
    assert grads.keys() == grads_ref.keys() and {"x", "norm_w"} <= grads.keys()
    for name in grads_ref:
        assert grads[name].dtype == torch.float32 and torch.equal(grads[name], grads_ref[name]), name


def _backends():
    return ["torch"] + (["triton"] if triton_usable(torch.device("cpu")) else [])


CASES = [(c, n, "torch") for c in CONSUMERS for n in NORMS]
CASES += [(c, "rms_norm llama", "triton") for c in ("lora_linear", "lora_gated_mlp") if "triton" in _backends()]


@pytest.mark.parametrize("consumer, norm, backend", CASES)
def test_consumer_under_autocast_keeps_the_norms_tensors_not_a_bf16_copy(consumer, norm, backend):
    *tagged, log, t = _step(norm, [consumer], backend, untag=False)
    *untagged, log_ref, _ = _step(norm, [consumer], backend, untag=True)
    numel = t["x"].numel()
    assert len(log_ref.low_copies(numel)) == 1, "the untagged bf16 copy must be saved (else this cannot fail)"
    assert not log.low_copies(numel), "a bf16 copy of the normed tensor was saved"
    assert log.storages(numel) == {t["x"].untyped_storage().data_ptr()}   # only the norm's own input
    _assert_same(tagged, untagged)


def test_q_k_v_cast_separately_each_keep_only_the_norms_tensors():
    """Three consumers of one norm output: three casts, each tagged; all three keep the same x and rstd, and the
    saved storages are the norm's plus each consumer's own u and seed."""
    qkv = ["lora_linear"] * 3
    *tagged, log, t = _step("rms_norm llama", qkv, "torch", untag=False, backward_in_autocast=True)
    *untagged, log_ref, _ = _step("rms_norm llama", qkv, "torch", untag=True, backward_in_autocast=True)
    numel = t["x"].numel()
    assert len(log_ref.low_copies(numel)) == 3 and not log.low_copies(numel)
    assert log.storages(numel) == {t["x"].untyped_storage().data_ptr()}
    rstd = {s.untyped_storage().data_ptr() for s in log.saved if tuple(s.shape) == (3, 5, 1)}
    assert len(rstd) == 1, "one rstd, shared by the norm and the three consumers"
    _assert_same(tagged, untagged)


def test_direct_dispatcher_call_is_tagged_by_the_dispatcher_rule():
    """``torch.ops.lowcost.lora_linear`` called directly: the dispatcher's autocast rule makes the cast, and its
    copy is tagged too."""
    def run(untag):
        t = _leaves()
        with SavedLog() as log, torch.autocast("cpu", dtype=BF16):
            y = rms_norm(t["x"], t["norm_w"], EPS)
            out, _ = torch.ops.lowcost.lora_linear(y.clone() if untag else y, t["w"], t["a"], t["b"], None, 2.0,
                                                   0.2, torch.tensor(5), "torch")
        out.float().sum().backward()
        return out.detach(), [t[k].grad for k in ("x", "norm_w", "a", "b")], log, t["x"].numel()

    out, grads, log, numel = run(False)
    out_ref, grads_ref, log_ref, _ = run(True)
    assert len(log_ref.low_copies(numel)) == 1 and not log.low_copies(numel)
    assert torch.equal(out, out_ref) and all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("norm", list(NORMS))
def test_rebuild_then_cast_equals_the_cast_copy(norm):
    for dtype in (BF16, torch.float16):
        t = _leaves(1)
        y = NORMS[norm](t)
        copy = cast_input(y, dtype)
        stored, how = pack_input(copy)
        assert how is not None and how.cast_to == dtype and all(s is u for s, u in zip(stored, source_of(y).tensors))
        rebuilt, _ = unpack_input(stored, how)
        assert rebuilt.dtype == dtype and torch.equal(rebuilt, copy.detach())


WRITES = ["normed before the cast", "normed after the cast", "cast copy", "norm input", "norm weight"]


@pytest.mark.parametrize("write", WRITES)
def test_an_in_place_write_voids_the_cast_copys_tag(write):
    t = _leaves()
    x = t["x"].clone()
    y = rms_norm(x, t["norm_w"], EPS)
    targets = {"normed before the cast": y, "normed after the cast": y, "norm input": x, "norm weight": t["norm_w"]}
    if write == "normed before the cast":
        with torch.no_grad():
            y.mul_(1.5)
    copy = cast_input(y, BF16)
    assert (source_of(copy) is None) == (write == "normed before the cast")
    with torch.no_grad():
        (copy if write == "cast copy" else targets[write]).mul_(1.5)
    assert source_of(copy) is None
    a, b = t["a"], t["b"]
    with SavedLog() as log, torch.autocast("cpu", dtype=BF16):
        out = lora_linear(copy, t["w"], a, b, 2.0)
    assert copy.untyped_storage().data_ptr() in log.low_copies(copy.numel())   # the copy itself is kept
    grads = torch.autograd.grad(out.float().sum(), (a, b))
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        lora_linear(copy.detach().clone(), t["w"], a2, b2, 2.0).float().sum().backward()
    assert torch.equal(a2.grad, grads[0]) and torch.equal(b2.grad, grads[1])


def test_no_tag_on_a_copy_where_nothing_would_be_saved_or_of_a_copy():
    t = _leaves()
    y = rms_norm(t["x"], t["norm_w"], EPS)
    copy = cast_input(y, BF16)
    assert source_of(copy) is not None
    assert source_of(cast_input(copy, torch.float16)) is None          # a copy of a copy: never tagged
    with torch.no_grad():
        assert source_of(cast_input(y, BF16)) is None
    with torch.inference_mode():
        assert source_of(cast_input(y, BF16)) is None
    frozen = rms_norm(t["x"].detach(), t["norm_w"].detach(), EPS)       # needs no grad: nothing to tag
    assert source_of(cast_input(frozen, BF16)) is None
    assert cast_input(y, torch.float32) is y                             # no cast, the tensor itself


def test_the_copys_tag_does_not_keep_the_fp32_norm_output_alive():
    """A consumer that keeps the copy itself (one that does not rebuild) must not keep the fp32 output too."""
    t = _leaves()
    y = rms_norm(t["x"], t["norm_w"], EPS)
    copy = cast_input(y, BF16)
    output = weakref.ref(y)
    del y
    gc.collect()
    assert output() is None and source_of(copy) is not None
    stored, how = pack_input(copy)
    assert torch.equal(unpack_input(stored, how)[0], copy.detach())
