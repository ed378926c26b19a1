"""PyTorch's ``TestSelectiveActivationCheckpoint`` (test/test_autograd.py), ported in our own words and run
against ``torch.utils.checkpoint`` (use_reentrant=False) and ``lowcost.checkpoint`` through the ``ck`` fixture:
torch's selective-checkpoint contexts (``create_selective_checkpoint_contexts`` as ``context_fn``) must keep
exactly torch's meaning when lowcost runs them.

Changes from upstream, each for a stated reason:
- ``test_flops_and_mem``: the backward FLOP counts run on the CPU (FlopCounterMode works there); the activation
  memory half reads CUDA allocator statistics and carries the ``gpu`` marker;
- ``test_policy_with_state``: on the installed torch (2.13) the policy is called in the forward only (the
  recompute replays by position, ``ctx.is_recompute`` is always False), so the expected call sequence is the
  forward's three ops; upstream's older expectation also counted recompute calls;
- ``test_bad_inputs`` checks torch's own ``create_selective_checkpoint_contexts`` argument errors, which do not
  involve a checkpoint implementation: run once, not per implementation.
"""
import functools
import itertools
import gc
import weakref

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode


def _save_mm(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


def _save_mm_bool(ctx, op, *args, **kwargs):
    return op == torch.ops.aten.mm.default


def _contexts(policy, **kwargs):
    return functools.partial(create_selective_checkpoint_contexts, policy, **kwargs)


def _mm_fn(x, y):
    return torch.mm(x.cos(), y).sin().sum()


def _backward_flops(run):
    """Backward FLOPs in units of one (n x n x n) matmul (n = 64), after a warm-up step."""
    run().backward()
    out = run()
    with FlopCounterMode(display=False) as counter:
        out.backward()
    return counter.get_total_flops() / (64 ** 3 * 2)


SELECTIVE_VARIANTS = {"op list": _contexts([torch.ops.aten.mm.default]), "policy": _contexts(_save_mm),
                      "bool policy": _contexts(_save_mm_bool)}


def test_flops(ck):
    x, y = torch.randn(64, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    assert _backward_flops(lambda: _mm_fn(x, y)) == 2.0
    assert _backward_flops(lambda: ck(_mm_fn, x, y)) == 3.0
    for name, context_fn in SELECTIVE_VARIANTS.items():
        assert _backward_flops(lambda: ck(_mm_fn, x, y, context_fn=context_fn)) == 2.0, name


@pytest.mark.gpu
def test_activation_memory(ck):
    x, y = (torch.randn(512, 512, requires_grad=True, device="cuda") for _ in range(2))

    def activation_mib(run):
        run().backward()
        start = torch.cuda.memory_stats()["requested_bytes.all.current"]
        out = run()
        held = (torch.cuda.memory_stats()["requested_bytes.all.current"] - start) / 2**20
        out.backward()
        return held

    assert activation_mib(lambda: _mm_fn(x, y)) == 2.0
    assert activation_mib(lambda: ck(_mm_fn, x, y)) == 0.0
    for name, context_fn in SELECTIVE_VARIANTS.items():
        assert activation_mib(lambda: ck(_mm_fn, x, y, context_fn=context_fn)) == 1.0, name


def test_output_already_has_autograd_meta(ck):
    """A view of an integer tensor (which still carries autograd metadata) as a cached output."""
    x, y = torch.tensor([1, 2, 3]), torch.randn(3, requires_grad=True)
    out = ck(lambda a, b: (a.view(-1), b.sin().cos()), x, y, context_fn=_contexts([torch.ops.aten.view.default]))
    out[1].sum().backward()
    assert y.grad is not None


class _SizesTensor(torch.Tensor):
    """A wrapper subclass whose sizes are dispatched (``sym_size`` reaches __torch_dispatch__)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.size(), inner.stride(), None, None, inner.dtype,
                                                   inner.layout, inner.device, False, inner.requires_grad, "sizes")

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs):
        unwrapped = torch.utils._pytree.tree_map_only(cls, lambda t: t.inner, args)
        out = func(*unwrapped, **(kwargs or {}))
        return torch.utils._pytree.tree_map_only(torch.Tensor, cls, out)


def test_subclass_dispatching_sizes(ck):
    """A policy asking to save ``sym_size`` is ignored for it: caching metadata ops would give the second view
    the first view's input shape in the recompute."""
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.sym_size.default else \
            CheckpointPolicy.PREFER_RECOMPUTE

    def fn(x):
        view = (x * x.sum()).view(-1).view(4, 3)
        assert view.grad_fn._saved_self_sym_sizes == (12,)
        return view.exp()

    x = _SizesTensor(torch.randn(4, 3, requires_grad=True))
    ck(fn, x, context_fn=_contexts(policy)).sum().backward()


def test_bad_inputs():
    with pytest.raises(ValueError, match="Expected op in `op_list` to be an OpOverload"):
        create_selective_checkpoint_contexts([2])
    with pytest.raises(ValueError, match="update the OpOverloadPacket to a specific OpOverload"):
        create_selective_checkpoint_contexts([torch.ops.aten.sin])
    with pytest.raises(TypeError, match="either a function or a list of ops"):
        create_selective_checkpoint_contexts(2)


def test_policy_with_state(ck):
    """A stateful policy object is shared by the forward and the recompute; it is called in the forward."""
    calls = []

    class Policy:
        def __init__(self):
            self.count = 0

        def __call__(self, ctx, func, *args, **kwargs):
            assert not ctx.is_recompute
            self.count += 1
            calls.append(self.count)
            return CheckpointPolicy.PREFER_RECOMPUTE

    x = torch.randn(3, requires_grad=True)
    out = ck(lambda t: t.sin().sin().sin(), x, context_fn=_contexts(Policy(), allow_cache_entry_mutation=True))
    out.sum().backward()
    assert calls == [1, 2, 3]


def test_storage_lifetime(ck):
    """The cached outputs are detached (no cycle graph -> hooks -> cache -> graph) and die with the graph, or
    at the backward that consumes them even with retain_graph=True."""
    refs = []

    def fn(x):
        mode = _get_current_dispatch_mode()
        assert isinstance(mode, (tuc._CachingTorchDispatchMode, tuc._CachedTorchDispatchMode))
        out = x.cos().exp()
        if isinstance(mode, tuc._CachingTorchDispatchMode):
            cached = mode.storage[torch.ops.aten.exp.default][0].val
            assert not cached.requires_grad
            refs.append(weakref.ref(cached))
        return out.sin()

    save_all = _contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_SAVE)
    gc.disable()
    try:
        out = ck(fn, torch.randn(3, requires_grad=True), context_fn=save_all)
        assert refs[-1]() is not None
        del out
        assert refs[-1]() is None
        out = ck(fn, torch.randn(3, requires_grad=True), context_fn=save_all)
        assert refs[-1]() is not None
        out.sum().backward(retain_graph=True)
        assert refs[-1]() is None
    finally:
        gc.enable()


def _save_sin(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.sin.default else CheckpointPolicy.PREFER_RECOMPUTE


def test_version_counter(ck):
    """A cached output modified in place is an error, unless allow_cache_entry_mutation."""
    def fn(x):
        return x.sin().mul_(2).cos().exp()

    out = ck(fn, torch.randn(3, requires_grad=True), context_fn=_contexts(_save_sin))
    with pytest.raises(RuntimeError, match="has been mutated"):
        out.sum().backward()
    out = ck(fn, torch.randn(3, requires_grad=True), context_fn=_contexts(_save_sin, allow_cache_entry_mutation=True))
    out.sum().backward()


def test_function_with_more_than_one_output(ck):
    calls = [0]

    def policy(ctx, op, *args, **kwargs):
        if op == torch.ops.aten.var_mean.correction:
            calls[0] += 1
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def fn(x):
        a, b = torch.var_mean(x)
        return a * b

    x = torch.randn(3, requires_grad=True)
    actual = torch.autograd.grad(ck(fn, x, context_fn=_contexts(policy)).sum(), (x,))
    torch.testing.assert_close(actual, torch.autograd.grad(fn(x).sum(), (x,)))
    assert calls[0] == 1  # called in the forward only (upstream's older torch also counted the recompute)


_OP_NAMES = itertools.count()


def test_function_with_non_tensor_output(ck):
    """A saved custom op returning (tensor, int) is not run a second time.

    The op gets a name of its own per run: re-registering one name after the other implementation's run
    could leave ``torch.ops`` handing out the earlier, deregistered overload (the policy then compares
    against a stale object and the op is recomputed), which made the second run fail now and then."""
    name = f"sin_with_extra_{next(_OP_NAMES)}"
    with torch.library._scoped_library("lowcost_port", "FRAGMENT"):
        calls = [0]

        @torch.library.custom_op(f"lowcost_port::{name}", mutates_args=())
        def sin_with_extra(x: torch.Tensor) -> tuple[torch.Tensor, int]:
            calls[0] += 1
            return x.sin(), 2

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        def backward(ctx, grad, _unused):
            return grad * ctx.saved_tensors[0].cos()

        torch.library.register_autograd(f"lowcost_port::{name}", backward, setup_context=setup_context)

        def fn(x):
            return (getattr(torch.ops.lowcost_port, name)(x)[0] * x.sin().exp()).sin()

        x = torch.randn(3, requires_grad=True)
        context_fn = _contexts([getattr(torch.ops.lowcost_port, name).default])
        actual = torch.autograd.grad(ck(fn, x, context_fn=context_fn).sum(), (x,))
        assert calls[0] == 1
        torch.testing.assert_close(actual, torch.autograd.grad(fn(x).sum(), (x,)))


def test_can_only_trigger_recompute_once(ck):
    out = ck(lambda t: t.sin().cos().exp(), torch.randn(3, requires_grad=True), context_fn=_contexts(_save_sin))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="Trying to backward an extra time"):
        out.sum().backward(retain_graph=True)
