"""How long what a recomputation builds stays alive.

The recompute runs fn on the caller's input objects with grad enabled and gives autograd the tensors it saves
(torch's semantics: fn may differentiate inside itself), so it builds a graph of its own, garbage once the
recomputation ends. A forward hook that registers a gradient hook holding the node it hooks (as torch's
``ModuleTracker`` does, inside ``FlopCounterMode``) makes that graph a reference cycle, which only Python's
cycle collector frees; the tensors its nodes saved must not wait for it: a block's activations per
recompute would pile up over backward (the planner's FLOP-counting trace saw the step peak grow with depth).
The frame must not wait for it either (its kept inputs). The cycle collector is off in these tests, so what
is alive is what plain reference counting keeps.
"""
import gc

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.module_tracker import ModuleTracker

from lowcost.checkpoint import checkpoint, recomputing


class Block(nn.Module):
    """lin2(sin(lin1(x))): sin saves lin1's output, the tensor a leaked recomputed graph would keep."""

    def __init__(self, width: int, rebuilt: list):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.rebuilt = rebuilt

    def forward(self, x):
        h = self.lin1(x)
        if recomputing():
            self.rebuilt.append(StorageWeakRef(h.untyped_storage()))
        return self.lin2(torch.sin(h))


@pytest.fixture
def no_cycle_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_recomputed_graph_saves_are_freed_when_the_recompute_ends_even_in_a_cycle(no_cycle_collector):
    rebuilt: list = []
    torch.manual_seed(0)
    blocks = [Block(6, rebuilt) for _ in range(4)]
    x = torch.randn(3, 6, requires_grad=True)
    with ModuleTracker():   # its hooks (and the cycles) live until it exits
        h = x
        for block in blocks:
            h = checkpoint(block, h)
        h.sum().backward()
        assert len(rebuilt) == len(blocks)   # each block recomputed once
        alive = sum(not ref.expired() for ref in rebuilt)
        assert alive == 0, f"{alive} of {len(rebuilt)} recomputed activations outlived their recomputation"
    assert all(b.lin1.weight.grad is not None for b in blocks)


def test_frames_and_their_inputs_are_freed_once_their_block_is_done(no_cycle_collector):
    """The recomputed graph's hooks referred to the frame; in a cycle they kept every block's input."""
    torch.manual_seed(0)
    blocks = [Block(6, []) for _ in range(4)]
    x = torch.randn(3, 6, requires_grad=True)
    inputs, alive = [], []
    with ModuleTracker():
        h = x
        for block in blocks:
            if block is not blocks[0]:
                inputs.append(StorageWeakRef(h.untyped_storage()))
            h = checkpoint(block, h)
        x.register_hook(lambda grad: alive.append(sum(not ref.expired() for ref in inputs)))
        h.sum().backward()
    assert alive == [0], "the inputs of blocks whose backward is done must be freed (blocks 1..3)"


def test_gradients_unchanged_under_module_tracker(no_cycle_collector):
    torch.manual_seed(0)
    blocks = nn.Sequential(*[Block(5, []) for _ in range(3)])
    x = torch.randn(2, 5, requires_grad=True)

    def grads(ckpt):
        blocks.zero_grad()
        x.grad = None
        with ModuleTracker():
            h = x
            for block in blocks:
                h = ckpt(block, h)
            h.square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]

    plain = grads(lambda fn, *a: fn(*a))
    ours = grads(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))


def test_differentiating_the_recomputed_graph_after_the_recompute_is_refused():
    """fn stashing a tensor of its recomputation: that graph's saved tensors are gone, so its backward raises
    (torch would keep them alive with the graph; lowcost frees them and says so, never a wrong gradient)."""
    w = torch.randn(4, requires_grad=True)
    stash: list = []

    def fn(t):
        y = (t * w).sin()
        if recomputing():
            stash.append(y)
        return (y * y).sum()   # saves y: the recompute (early stop) runs until here

    checkpoint(fn, torch.randn(4)).backward()
    assert len(stash) == 1
    with pytest.raises(tuc.CheckpointError, match="after that recomputation ended"):
        stash[0].sum().backward()
