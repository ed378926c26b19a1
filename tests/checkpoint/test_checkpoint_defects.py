"""The seven drop-in defects of issue #10 (Part A), each run against torch.utils.checkpoint(use_reentrant=False)
and lowcost.checkpoint side by side: what torch does is the expected behaviour, lowcost must do the same.

1. an input modified in place after the forward      -> an error at backward, never a silent wrong gradient
2. fn modifying its own input in place                -> the same error; the recompute does not modify it again
3. the same tensor passed twice                       -> one tensor object in the forward and in the recompute
4. torch.autograd.grad inside fn (gradient penalties) -> works, nested as deep as torch's own tests nest it
5. default device and autocast state of the forward   -> restored in the recompute, whatever backward runs under
6. torch's keyword options                            -> never passed on to fn; anything else is
7. torch.compile                                      -> no graph break from checkpointing, eager gradients
"""
import functools

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn

import lowcost


def torch_ckpt(fn, *args, **kwargs):
    kwargs.setdefault("use_reentrant", False)
    return tuc.checkpoint(fn, *args, **kwargs)


IMPLS = {"torch": torch_ckpt, "lowcost": lowcost.checkpoint}
impls = pytest.mark.parametrize("ck", list(IMPLS.values()), ids=list(IMPLS))
INPLACE = "modified by an inplace operation"


# ------------------------------------------------------------------------------------------ 1 and 2: in place
@impls
def test_1_input_modified_after_forward_raises(ck):
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    out = ck(lambda t: (t * w).sum(), x)
    x.add_(1)
    with pytest.raises(RuntimeError, match=INPLACE):
        out.backward()
    assert w.grad is None


@impls
def test_1_view_of_input_modified_after_forward_raises(ck):
    w = torch.randn(4, requires_grad=True)
    base = torch.randn(2, 4)
    out = ck(lambda t: (t.exp() * w).sum(), base[0])
    base[1].mul_(2)  # a view of the same storage: the version counter is shared, as autograd treats it
    with pytest.raises(RuntimeError, match=INPLACE):
        out.backward()


@impls
def test_2_fn_modifying_its_input_raises_and_recompute_leaves_it_alone(ck):
    w = torch.randn(4, requires_grad=True)
    x0 = torch.randn(4)
    x = x0.clone()
    out = ck(lambda t: (t.mul_(2) * w).sum(), x)
    assert torch.equal(x, 2 * x0)  # the forward's own mutation, as without checkpointing
    with pytest.raises(RuntimeError, match=INPLACE):
        out.backward()
    assert torch.equal(x, 2 * x0), "the recompute must not apply fn's mutation a second time"
    assert w.grad is None


# ------------------------------------------------------------------------------------------ 3: identity
@impls
def test_3_same_tensor_twice_is_one_object_in_forward_and_recompute(ck):
    seen = []
    w = torch.randn(3, requires_grad=True)

    def fn(a, b, *, c):
        seen.append((a is b, b is c))
        return (a * b * c * w).sin().sum()

    x = torch.randn(3, requires_grad=True)
    ck(fn, x, x, c=x).backward()
    assert seen == [(True, True), (True, True)]
    expected = torch.autograd.grad((x * x * x * w).sin().sum(), (x, w))
    torch.testing.assert_close((x.grad, w.grad), expected)


@impls
def test_3_multihead_attention_self_attention_path(ck):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = mha(x, x, x, need_weights=False)[0]
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, *mha.parameters()])
    out = ck(mha, x, x, x, need_weights=False)[0]
    grads = torch.autograd.grad(out.square().sum(), [x, *mha.parameters()])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(grads, grads_ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ 4: nested grads
@impls
def test_4_gradient_penalty_inside_fn(ck):
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)

    def fn(x):
        y = torch.tanh(lin(x))
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return y.sum() + gx.square().sum()

    x = torch.randn(3, 5, requires_grad=True)
    expected = torch.autograd.grad(fn(x), [x, *lin.parameters()])
    actual = torch.autograd.grad(ck(fn, x), [x, *lin.parameters()])
    torch.testing.assert_close(actual, expected)


def _grad(fn):
    def wrapped(x):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        return g
    return wrapped


@impls
def test_4_grad_of_checkpoint_of_grad(ck):
    def c(fn):
        return functools.partial(ck, fn)

    def f(x):
        return x.sin().exp().sin()

    x = torch.randn((), requires_grad=True)
    expected = _grad(_grad(f))(x)
    for actual_fn in (_grad(c(_grad(f))), c(_grad(_grad(c(f)))), _grad(c(_grad(c(f))))):
        torch.testing.assert_close(actual_fn(x), expected)


# ------------------------------------------------------------------------------------------ 5: device, autocast
@impls
def test_5_default_device_context_is_restored_in_recompute(ck):
    with torch.device("meta"):
        x = torch.randn(3, requires_grad=True)
        out = ck(lambda t: (t * torch.ones(3)).sin().sum(), x)  # torch.ones follows the default device
    out.backward()  # outside the context: the recompute must still build torch.ones(3) on meta
    assert x.grad.device.type == "meta" and x.grad.shape == (3,)


@impls
def test_5_set_default_device_is_restored_in_recompute(ck):
    torch.set_default_device("meta")
    try:
        x = torch.randn(3, requires_grad=True)
        out = ck(lambda t: (t * torch.ones(3)).sin().sum(), x)
    finally:
        torch.set_default_device(None)  # not "cpu": that would leave a device mode on for every later test
    out.backward()
    assert x.grad.device.type == "meta"


def _mm_chain(x, y):
    z = torch.mm(x, y)
    return torch.mm(z, y).tanh()


@impls
@pytest.mark.parametrize("forward_dtype, backward_dtype", [(None, torch.bfloat16), (torch.bfloat16, None),
                                                            (torch.bfloat16, torch.float16)])
def test_5_autocast_state_of_the_forward_is_used_in_recompute(ck, forward_dtype, backward_dtype):
    def under(dtype):
        return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)

    torch.manual_seed(0)
    x, y = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    with under(forward_dtype):
        ref = _mm_chain(x, y)
    with under(backward_dtype):  # autocast also applies to the backward's own ops: same for both runs
        expected = torch.autograd.grad(ref.float().sum(), (x, y))
    with under(forward_dtype):
        out = ck(_mm_chain, x, y)
    assert out.dtype == ref.dtype
    with under(backward_dtype):
        actual = torch.autograd.grad(out.float().sum(), (x, y))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ 6: options
TORCH_OPTIONS = dict(use_reentrant=False, preserve_rng_state=True, determinism_check="default", debug=False,
                     early_stop=True, context_fn=tuc.noop_context_fn)


@pytest.mark.parametrize("impl", ["torch", "lowcost"])
@pytest.mark.parametrize("option", sorted(TORCH_OPTIONS))
def test_6_torch_options_are_not_passed_to_fn(impl, option):
    received = []

    def fn(x, **kwargs):
        received.append(kwargs)
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    if impl == "torch":
        tuc.checkpoint(fn, x, **{"use_reentrant": False, option: TORCH_OPTIONS[option]}, scale=2).sum().backward()
    else:
        lowcost.checkpoint(fn, x, **{option: TORCH_OPTIONS[option]}, scale=2).sum().backward()
    assert received == [{"scale": 2}, {"scale": 2}]


def test_6_use_reentrant_true_and_bad_option_values_are_clear_errors():
    with pytest.raises(ValueError, match="use_reentrant=True"):
        lowcost.checkpoint(torch.sin, torch.randn(2), use_reentrant=True)
    for impl in IMPLS.values():
        with pytest.raises(ValueError, match="determinism_check"):
            impl(torch.sin, torch.randn(2, requires_grad=True), determinism_check="shapes")


@impls
def test_6_early_stop_false_runs_the_tail_of_fn_again(ck):
    calls = []

    def fn(x):
        y = x.sin()
        calls.append("tail")
        return y.clone()  # clone saves nothing: with early stop, the recompute never gets here

    x = torch.randn(3, requires_grad=True)
    ck(fn, x).sum().backward()
    assert len(calls) == 1  # the forward only: the recompute stops once sin's input is rebuilt
    calls.clear()
    ck(fn, x, early_stop=False).sum().backward()
    assert len(calls) == 2


@impls
def test_6_context_fn_with_torch_selective_policy_keeps_the_matmul(ck):
    from torch.utils.flop_counter import FlopCounterMode
    x, y = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    def fn(a, b):
        return torch.mm(a.cos(), b).sin().sum()

    def backward_flops(**kwargs):
        out = ck(fn, x, y, **kwargs)
        with FlopCounterMode(display=False) as counter:
            out.backward()
        return counter.get_total_flops() // (2 * 16 ** 3)

    save_mm = functools.partial(tuc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    assert backward_flops() == 3           # mm recomputed, plus its two gradient mms
    assert backward_flops(context_fn=save_mm) == 2


@impls
def test_6_determinism_check_none_skips_the_metadata_check(ck):
    calls = [0]

    def fn(x):
        calls[0] += 1
        return x.sin() * (torch.ones(3) if calls[0] == 1 else torch.ones(1))

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError):
        ck(fn, x).sum().backward()
    calls[0] = 0
    ck(fn, x, determinism_check="none").sum().backward()


@impls
def test_6_preserve_rng_state(ck):
    x = torch.randn(64, requires_grad=True)

    def grad_of(**kwargs):
        torch.manual_seed(1)
        out = ck(lambda t: nn.functional.dropout(t, 0.5, training=True), x, **kwargs)
        torch.manual_seed(2)  # backward starts from another RNG state
        (g,) = torch.autograd.grad(out.sum(), x)
        return g

    torch.manual_seed(1)
    (plain,) = torch.autograd.grad(nn.functional.dropout(x, 0.5, training=True).sum(), x)
    assert torch.equal(grad_of(), plain)
    assert not torch.equal(grad_of(preserve_rng_state=False), plain)


# ------------------------------------------------------------------------------------------ 7: torch.compile
def _compile_case(ck):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def model(x):
        h = ck(block, x)
        return ck(lambda t: t.sin() * h, h).sum()

    return block, model


@impls
def test_7_compile_has_no_graph_break_and_eager_gradients(ck):
    torch._dynamo.reset()
    block, model = _compile_case(ck)
    x = torch.randn(4, 8, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    expected = torch.autograd.grad(model(x), [x, *block.parameters()])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    actual = torch.autograd.grad(compiled(x), [x, *block.parameters()])
    torch.testing.assert_close(actual, expected)
