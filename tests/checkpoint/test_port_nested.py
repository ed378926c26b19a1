"""PyTorch's ``TestNestedCheckpoint`` (test/test_autograd.py), ported in our own words and run against
``torch.utils.checkpoint`` (use_reentrant=False) and ``lowcost.checkpoint`` through the ``ck`` fixture:
checkpoints inside checkpoints, ``torch.autograd.grad`` inside and around them (``grad(c(grad(c(f))))``),
with and without early stop, and no autograd graph kept alive once its outputs are gone.

Changes from upstream: none in substance. The early-stop setting is torch's own
``set_checkpoint_early_stop`` context manager in both runs (lowcost reads it as torch does).
"""
import collections
import weakref

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch.utils._python_dispatch import TorchDispatchMode

early_stop = pytest.mark.parametrize("early_stop", [True, False])


def grad(fn):
    def wrapped(x):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(x), inputs=(x,), create_graph=True)
        return g
    return wrapped


def total(fn):
    return lambda x: fn(x).sum()


def checkpointed(ck):
    return lambda fn: (lambda *args, **kwargs: ck(fn, *args, **kwargs))


def _cases(ck, fn):
    """(plain function, its checkpointed variants) at several depths of grad and checkpoint nesting."""
    c = checkpointed(ck)
    return [
        (fn, (c(fn), c(c(fn)))),
        (grad(fn), (grad(c(fn)), grad(c(c(fn))))),
        (grad(grad(fn)), (grad(c(grad(fn))), c(grad(grad(c(fn)))), grad(c(grad(c(fn)))))),
        (grad(grad(grad(fn))), (grad(c(grad(grad(c(fn))))), grad(c(grad(c(grad(c(fn)))))))),
    ]


def _graph_nodes(root):
    seen, queue = {root}, collections.deque([root])
    while queue:
        node = queue.popleft()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)


def assert_graph_dies(fn):
    """Every autograd node of fn's output is freed once the output is: no reference cycle keeps it."""
    class Marker:
        pass

    def scope():
        out = fn(torch.randn((), requires_grad=True))
        refs = []
        for node in _graph_nodes(out.grad_fn):
            marker = Marker()
            node.metadata["marker"] = marker
            refs.append((node.name(), weakref.ref(marker)))
        return refs

    alive = [name for name, ref in scope() if ref() is not None]
    assert alive == []


@early_stop
def test_nested_checkpoint(ck, early_stop):
    def f(x):
        return x.sin().exp().sin()

    def g(x):
        a = x.sin().exp().sin()
        b = x.sin().exp().sin()
        torch.autograd.grad(a, x)
        torch.autograd.grad(b, x)
        return x.sin()

    with tuc.set_checkpoint_early_stop(early_stop):
        x = torch.randn((), requires_grad=True)
        for fn in (f, g):
            for expected_fn, actual_fns in _cases(ck, fn):
                expected = expected_fn(x)
                for actual_fn in actual_fns:
                    torch.testing.assert_close(actual_fn(x), expected)
                    assert_graph_dies(actual_fn)


@early_stop
def test_nested_checkpoint_two_children(ck, early_stop):
    c = checkpointed(ck)

    def f(x):
        return x.sin().exp().sin()

    def g(x):
        return x.cos().sin().exp()

    def hc(x):
        return c(g)(c(f)(x))

    def h(x):
        return g(f(x))

    with tuc.set_checkpoint_early_stop(early_stop):
        a = torch.randn(3, 3, requires_grad=True)
        expected = grad(total(grad(total(h))))(a)
        torch.testing.assert_close(grad(total(grad(total(c(hc)))))(a), expected)
        torch.testing.assert_close(grad(total(c(grad(total(c(hc))))))(a), expected)
        assert_graph_dies(grad(c(hc)))
        assert_graph_dies(grad(total(grad(total(c(hc))))))
        assert_graph_dies(grad(total(c(grad(total(c(hc)))))))


@early_stop
def test_nested_checkpoint_non_tensor_inputs_and_outputs(ck, early_stop):
    def fn(k, a, b, f):
        return f(k * a * b.exp()), 1, "abcd"

    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    with tuc.set_checkpoint_early_stop(early_stop):
        out, one, text = ck(fn, 3, a, b, torch.sin)
    assert (one, text) == (1, "abcd")
    actual = torch.autograd.grad(out, (a, b))
    expected = torch.autograd.grad(fn(3, a, b, torch.sin)[0], (a, b))
    torch.testing.assert_close(actual, expected)


@early_stop
def test_nested_checkpoint_kwargs(ck, early_stop):
    def fn(a, blah=None):
        out = a.sin().exp()
        if blah is not None:
            out = out * blah
        return out.sin().exp()

    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    with tuc.set_checkpoint_early_stop(early_stop):
        actual = torch.autograd.grad(ck(fn, a, blah=b), (a, b))
        expected = torch.autograd.grad(fn(a, blah=b), (a, b))
    torch.testing.assert_close(actual, expected)


@early_stop
def test_nested_checkpoint_same_graph(ck, early_stop):
    """Backward runs on the original graph: a hook registered on it fires once."""
    calls = []
    a = torch.tensor(1.0, requires_grad=True)
    with tuc.set_checkpoint_early_stop(early_stop):
        out = ck(lambda t: t.sin().cos().sin(), a)
    out.grad_fn.next_functions[0][0].register_hook(lambda *_: calls.append(1))
    out.backward()
    assert len(calls) == 1


@early_stop
def test_nested_checkpoint_reentrant_backwards(ck, early_stop):
    """A hook inside backward starts another backward over part of the same checkpointed graph; ``a`` gets
    both gradients (upstream only checks that this runs)."""
    def fn(a):
        x = a.sin().cos()
        return x, x.sin()

    a = torch.tensor(1.0, requires_grad=True)
    with tuc.set_checkpoint_early_stop(early_stop):
        x, out = ck(fn, a)
    out.grad_fn.register_hook(lambda *_: x.backward(retain_graph=True))
    out.backward(retain_graph=True)
    expected = torch.autograd.grad(fn(a)[1], a)[0] + torch.autograd.grad(fn(a)[0], a)[0]
    torch.testing.assert_close(a.grad, expected)


def _counting_fn(counter):
    def clone(x):
        counter[0] += 1
        return x.clone()
    return lambda x: clone(x.sin().cos())  # clone saves nothing: reached in the recompute only without early stop


def test_nested_checkpoint_set_early_stop(ck):
    """Default on; the argument; torch's context manager at forward time (not backward time) overrides it."""
    def recomputed(**kwargs):
        counter = [0]
        a = torch.tensor(1.0, requires_grad=True)
        out = ck(_counting_fn(counter), a, **kwargs)
        out.backward()
        return counter[0]

    assert recomputed() == 1
    assert recomputed(early_stop=False) == 2
    assert recomputed(early_stop=True) == 1
    for setting, argument, expected in [(False, None, 2), (True, None, 1), (False, True, 2), (True, False, 1)]:
        counter = [0]
        a = torch.tensor(1.0, requires_grad=True)
        kwargs = {} if argument is None else {"early_stop": argument}
        with tuc.set_checkpoint_early_stop(setting):
            out = ck(_counting_fn(counter), a, **kwargs)
        out.backward()
        assert counter[0] == expected, (setting, argument)
    counter = [0]
    with tuc.set_checkpoint_early_stop(False):
        with tuc.set_checkpoint_early_stop(True):
            out = ck(_counting_fn(counter), torch.tensor(1.0, requires_grad=True), early_stop=False)
    out.backward()
    assert counter[0] == 1


class _SinCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.sin.default
        return func(*args, **(kwargs or {}))


def test_nested_checkpoint_set_early_stop_no_recompution_needed(ck):
    """Only the input is saved: fn is called again either way, but with early stop its sin never reaches the
    kernel a second time. A fn that saves nothing is never called again at all."""
    for setting, sins in ((True, 1), (False, 2)):
        counter = [0]

        def fn(x):
            counter[0] += 1
            return x.sin()

        a = torch.tensor(1.0, requires_grad=True)
        with _SinCounter() as sin_counter:
            with tuc.set_checkpoint_early_stop(setting):
                out = ck(fn, a)
            out.backward()
        assert (counter[0], sin_counter.count) == (2, sins)
    for setting in (True, False):
        counter = [0]

        def fn2(x):
            counter[0] += 1
            return x.clone()

        with tuc.set_checkpoint_early_stop(setting):
            out = ck(fn2, torch.tensor(1.0, requires_grad=True))
        out.backward()
        assert counter[0] == 1
