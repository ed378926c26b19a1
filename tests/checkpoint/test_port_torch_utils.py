"""PyTorch's ``TestCheckpoint`` (test/test_utils.py), ported in our own words and run against both
``torch.utils.checkpoint`` (use_reentrant=False) and ``lowcost.checkpoint`` through the ``ck`` fixture.

Changes from upstream, each for a stated reason:
- upstream runs most cases with ``use_reentrant=True`` too; lowcost is non-reentrant only (use_reentrant=True
  is an error, tested in test_checkpoint_defects.py), so every case here is the non-reentrant one;
- ``checkpoint_sequential`` is written here as ``_sequential`` over the implementation under test (lowcost has
  no such function; its √n segments are ``CheckpointConfig(policy="sqrt")``): chunks of modules, each chunk but
  the last checkpointed, as torch's helper does;
- reentrant-only expectations (errors about ``autograd.grad``, "none of output has requires_grad", the output
  wrapper that makes a second backward through a returned input fail) are replaced by what the
  non-reentrant variant does, and say so;
- the CUDA cases carry the ``gpu`` marker (skipped without a GPU, run by benchmarks/device/run.sh).
"""
import random

import pytest
import torch
from torch import nn


def _sequential(ck, modules, chunks: int, x):
    """torch's checkpoint_sequential, for any implementation: ``chunks`` runs, all but the last checkpointed."""
    modules = list(modules.children()) if isinstance(modules, nn.Module) else list(modules)
    size = len(modules) // chunks
    end = -1

    def run(start, stop):
        def forward(h):
            for module in modules[start:stop + 1]:
                h = module(h)
            return h
        return forward

    for start in range(0, size * (chunks - 1), size):
        end = start + size - 1
        x = ck(run(start, end), x)
    return run(end + 1, len(modules) - 1)(x)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 5), nn.ReLU())


def _compare_sequential(ck, model, variants, chunks, x):
    """Output, input gradient and parameter gradients of each checkpointed variant equal the plain model's."""
    out = model(x)
    model.zero_grad()
    out.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected_x = x.grad.clone()
    for variant in variants:
        leaf = x.detach().requires_grad_()
        model.zero_grad()
        got = _sequential(ck, variant, chunks, leaf)
        torch.testing.assert_close(got, out)
        got.sum().backward()
        torch.testing.assert_close(leaf.grad, expected_x)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name])


def test_checkpoint_trigger(ck):
    """The checkpointed half of the modules runs twice (forward + recompute), the last chunk once."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * torch.tensor(2.0)

    modules = [Counting() for _ in range(10)]
    out = _sequential(ck, modules, 2, torch.randn(3, 4, requires_grad=True))
    assert [m.calls for m in modules] == [1] * 10
    out.sum().backward()
    assert [m.calls for m in modules] == [2] * 5 + [1] * 5


def test_checkpoint_valid_with_autograd_grad_create_graph(ck):
    """Upstream checks that the reentrant variant refuses autograd.grad; the non-reentrant one supports it,
    with create_graph=True, and gives the plain model's gradients."""
    model = _mlp()
    x = torch.randn(1, 100, requires_grad=True)
    out = model(x)
    expected = torch.autograd.grad(out, x, torch.ones(1, 5), create_graph=True)
    got = _sequential(ck, model, 2, x)
    torch.testing.assert_close(got, out)
    torch.testing.assert_close(torch.autograd.grad(got, x, torch.ones(1, 5), create_graph=True), expected)


def test_checkpoint_sequential_model_and_children(ck):
    model = _mlp()
    _compare_sequential(ck, model, [list(model.children()), model], 2, torch.randn(1, 100, requires_grad=True))


def test_checkpoint_module_list(ck):
    class ModuleListNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.module_list = nn.ModuleList(list(_mlp().children()))

        def forward(self, x):
            for layer in self.module_list:
                x = layer(x)
            return x

    model = ModuleListNet()
    _compare_sequential(ck, model, [list(model.module_list.children()), model.module_list], 2,
                        torch.randn(1, 100, requires_grad=True))


def _dropout_rng_case(ck, device):
    for _ in range(3):
        x = torch.randn(20000, device=device).requires_grad_()
        first, second = nn.Dropout(), nn.Dropout()
        state = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
        ck(second, first(x)).sum().backward()
        with_checkpoint = x.grad
        (torch.set_rng_state if device == "cpu" else torch.cuda.set_rng_state)(state)
        x.grad = None
        second(first(x)).sum().backward()
        assert torch.equal(with_checkpoint, x.grad)


def test_checkpoint_rng_cpu(ck):
    _dropout_rng_case(ck, "cpu")


@pytest.mark.gpu
def test_checkpoint_rng_cuda(ck):
    _dropout_rng_case(ck, "cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_checkpoint_not_preserve_rng_state(ck, device):
    """Upstream: CUDA only, "runs without error". On the CPU too here, since the option means the same there."""
    x = torch.randn(2, device=device).requires_grad_()
    ck(nn.Dropout(), x, preserve_rng_state=False).sum().backward()
    assert x.grad is not None


def test_checkpoint_non_tensor(ck):
    def fn(t1, t2):
        return t1 if t2 is None else t1 + t2

    x = torch.randn(1, 100, requires_grad=True)
    ck(fn, x, None).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _mixed(t1, t2, scale, t3):
    t4 = t1 + t2 * t3
    t5 = t1 * t2 + t3
    t4 *= scale
    t5 *= scale
    return scale, t4, None, True, t5, "bar", t1


def test_checkpoint_non_tensor_inputs_outputs(ck):
    """Non-tensor inputs and outputs pass through; gradients equal the plain run's. Upstream also expects a
    second backward through the returned input ``t1`` to fail: that is the reentrant variant's output wrapper;
    without it ``res[6]`` is ``t1`` itself (both implementations), so a second backward is a fresh graph."""
    t1, t2, t3 = torch.rand(10, requires_grad=True), torch.rand(10, requires_grad=True), torch.rand(10)
    scale = random.Random(0).randint(1, 10)
    res = ck(_mixed, t1, t2, scale, t3)
    assert res[0] == scale and res[2] is None and res[3] is True and res[5] == "bar" and res[6] is t1
    torch.testing.assert_close(res[1], (t1 + t2 * t3) * scale)
    torch.testing.assert_close(res[4], (t1 * t2 + t3) * scale)
    res[1].sum().backward(retain_graph=True)
    res[4].sum().backward(retain_graph=True)
    res[6].sum().backward()
    grads = t1.grad.clone(), t2.grad.clone()
    t1.grad = t2.grad = None
    plain = _mixed(t1, t2, scale, t3)
    torch.autograd.backward([plain[1].sum(), plain[4].sum(), plain[6].sum()])
    torch.testing.assert_close((t1.grad, t2.grad), grads)


def test_checkpoint_no_tensors(ck):
    rng = random.Random(1)
    t1, t2, t3, scale = rng.random(), rng.random(), rng.random(), rng.randint(0, 10)
    assert ck(_mixed, t1, t2, scale, t3) == _mixed(t1, t2, scale, t3)


def test_checkpoint_partial_grad(ck):
    """One output used for backward, one not. Upstream's second case is the reentrant variant's error when no
    output requires grad; non-reentrant returns the input that does not require grad, so backward through it
    is autograd's own "does not require grad" error, for both implementations."""
    x, other = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4)
    out = ck(lambda a, b: (a, b), x, other)
    out[0].sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    out = ck(lambda a, b: a, torch.randn(1, 4), torch.randn(1, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()


@pytest.mark.gpu
def test_checkpointing_without_reentrant_early_free(ck):
    """Recomputed tensors are freed as backward consumes them, with and without retain_graph: the device
    memory after each step of backward matches the plain backward's."""
    def measure(run):
        stats = []

        def mark(t, idx):
            def hook(_):
                torch.cuda.synchronize()
                assert len(stats) == idx
                stats.append(torch.cuda.memory_allocated())
            t.register_hook(hook)

        def fn(x):
            for idx in (2, 1, 0):
                x = x ** 2
                mark(x, idx)
            return (x ** 2).sum()

        run(fn)
        return stats

    x = torch.zeros(10, device="cuda", requires_grad=True)
    x.grad = torch.zeros_like(x)
    plain = measure(lambda fn: fn(x).backward())
    assert all(b < a for a, b in zip(plain, plain[1:]))
    assert measure(lambda fn: ck(fn, x).backward()) == plain
    assert measure(lambda fn: ck(fn, x).backward(retain_graph=True)) == plain
