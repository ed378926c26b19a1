"""``lowcost.checkpoint.checkpoint``: our own recompute mechanism (non-reentrant semantics).

How it works
------------
Forward. ``fn(*args, **kwargs)`` runs once, with grad enabled, inside a pair of ``saved_tensors_hooks``
owned by a ``Frame``. Every tensor autograd wants to save is *not* kept: the pack hook records its
(shape, dtype, device) under a running index ``i`` and hands autograd a small ``_Handle(frame, i)``
instead. The frame keeps only what it needs to run ``fn`` again: the inputs (detached references, or
host copies when offloading), the CPU and CUDA RNG states and the autocast state at the call.

Backward. The first time autograd unpacks a handle whose tensor is not yet rebuilt, the frame
*recomputes*: it restores the RNG states (inside ``fork_rng``, so the backward's own RNG stream is left
untouched) and runs ``fn`` again under recompute hooks that put the detached tensor saved at index ``i``
into ``frame.store[i]`` — but only for indices whose handles are still alive and not already stored.
As soon as the largest such index has been rebuilt it raises ``_StopRecompute`` (early stop): the rest
of ``fn`` is never run again. Unpack then pops the tensor from the store, so each rebuilt tensor lives
only as long as the autograd node that needs it. A later backward through a retained graph simply
recomputes again.

The recomputed graph is thrown away (inputs are detached copies with the same ``requires_grad``), so
gradients flow only through the original graph: this is why no input needs ``requires_grad`` (LoRA
parameters closed over inside ``fn`` get gradients as usual), why ``autograd.grad`` and
``backward(inputs=…)`` work, and why a parameter used by several checkpointed blocks is accumulated once
by its single ``AccumulateGrad`` node (DDP-safe). If the recomputation saves a tensor of another shape,
dtype or device than the forward did at the same index, a ``CheckpointMismatchError`` names it.

A frame may hold several consecutive calls (a Chen et al. √n *segment* of blocks): the inputs of a later
call that are outputs of an earlier call in the same frame are not kept but re-derived in recompute.
"""
from __future__ import annotations

import threading
import time
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowcost.checkpoint import tracking
from lowcost.checkpoint.selective import SelectiveCache
from lowcost.checkpoint.sharded import unshard_owner

Tensor = torch.Tensor
_LOCAL = threading.local()


class CheckpointMismatchError(RuntimeError):
    """The recomputation saved tensors that differ (shape/dtype/device/count) from the forward's."""


class _StopRecompute(Exception):
    """Raised from the recompute pack hook once every tensor still needed has been rebuilt."""


def recomputing() -> bool:
    """True while a lowcost checkpoint is re-running a forward inside backward (this thread)."""
    return getattr(_LOCAL, "depth", 0) > 0


@contextmanager
def _recompute_scope():
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


# ------------------------------------------------------------------------------------------- RNG / autocast
def _cuda_devices(tensors) -> list[int]:
    """CUDA devices whose RNG state must be replayed: those of the inputs plus the current one."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    devices = {t.device.index for t in tensors if t.is_cuda}
    devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


class _RNGState:
    """CPU and CUDA generator states at the start of a call, replayed in recompute."""

    def __init__(self, tensors):
        self.cpu = torch.get_rng_state()
        self.devices = _cuda_devices(tensors)
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [(dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]


def _autocast(state):
    if not state:
        return nullcontext()
    stack = ExitStack()
    for dev, dtype in state:
        stack.enter_context(torch.autocast(dev, dtype=dtype))
    return stack


# ------------------------------------------------------------------------------------------- one call
class _Call:
    """One ``fn(*args, **kwargs)`` inside a frame: its inputs as leaves, RNG and autocast state.

    Each tensor leaf is kept as one of: ("keep", detached tensor, requires_grad), ("offload", handle,
    requires_grad) or ("ref", call index, leaf index) for an output of an earlier call in the frame.
    """

    def __init__(self, frame: "Frame", fn: Callable, args: tuple, kwargs: dict):
        self.fn = fn
        leaves, self.spec = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        self.rng = _RNGState(tensors) if frame.preserve_rng else None
        self.autocast = _autocast_state()
        self.leaves = [frame.encode_leaf(x) for x in leaves]
        self.outputs: list = []  # weakrefs to the forward's output tensor leaves (segment chaining)

    def run(self, frame: "Frame", outputs_so_far: list[list]) -> list:
        """Runs fn again on the decoded inputs; returns the flat output leaves."""
        leaves = [frame.decode_leaf(x, outputs_so_far) for x in self.leaves]
        args, kwargs = tree_unflatten(leaves, self.spec)
        unshard_owner(self.fn)  # FSDP2: an earlier block of a segment is still sharded (see sharded.py)
        rng = self.rng.replay() if self.rng is not None else nullcontext()
        with rng, _autocast(self.autocast), frame.mode_for_recompute():
            out = self.fn(*args, **kwargs)
        return tree_flatten(out)[0]


class _Handle:
    """What autograd holds instead of a saved tensor: the frame and the tensor's index in it."""

    __slots__ = ("frame", "index", "__weakref__")

    def __init__(self, frame: "Frame", index: int):
        self.frame, self.index = frame, index


def _describe(meta) -> str:
    shape, dtype, device = meta
    return f"shape {tuple(shape)} {str(dtype).replace('torch.', '')} on {device}"


# ------------------------------------------------------------------------------------------- the frame
class Frame:
    """State of one checkpointed region (one call, or a segment of consecutive calls).

    Args:
        preserve_rng: capture and replay the CPU/CUDA RNG states (needed for dropout).
        selective: ``func -> bool`` naming the ops whose outputs are kept (a ``SelectiveCache`` per frame,
            see ``selective.py``), or None to recompute everything.
        offloader: an ``Offloader`` that moves kept inputs to host memory (or None).
        label: the block this frame belongs to (for measurements).
    """

    def __init__(self, preserve_rng: bool = True, selective=None, offloader=None, label=None):
        self.preserve_rng, self.offloader = preserve_rng, offloader
        self.label = label if label is not None else tracking.current_block()
        self.selective = (SelectiveCache(selective, self.label, lambda: len(self.meta))
                          if selective is not None else None)
        self.calls: list[_Call] = []
        self.meta: list[tuple] = []            # (shape, dtype, device) of each tensor saved in forward
        self.live: dict[int, weakref.ref] = {}  # index -> weakref to the handle autograd holds
        self.store: dict[int, Tensor] = {}      # rebuilt tensors not yet unpacked
        self.recomputations = 0
        self.name = "fn"
        if offloader is not None:
            offloader.register(self)

    # ---- inputs
    def encode_leaf(self, x):
        if not isinstance(x, Tensor):
            return ("const", x)
        for ci, call in enumerate(self.calls):
            for li, ref in enumerate(call.outputs):
                if ref is not None and ref() is x:
                    return ("ref", ci, li)
        if self.offloader is not None and self.offloader.wants(x):
            return ("offload", self.offloader.offload(x, self.label), x.requires_grad)
        kept = x.detach()
        tracking.note_kept(kept, self.label, "input")
        return ("keep", kept, x.requires_grad)

    def decode_leaf(self, leaf, outputs_so_far):
        kind = leaf[0]
        if kind == "const":
            return leaf[1]
        if kind == "ref":
            return outputs_so_far[leaf[1]][leaf[2]]
        tensor = leaf[1].get() if kind == "offload" else leaf[1]
        return tensor.detach().requires_grad_(leaf[2])

    # ---- forward
    def run(self, fn: Callable, args: tuple, kwargs: dict):
        """Runs one call of fn under this frame's pack hooks; returns fn's output unchanged."""
        self.name = getattr(fn, "__qualname__", type(fn).__name__)
        call = _Call(self, fn, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), self.mode_for_forward():
            out = fn(*args, **kwargs)
        call.outputs = [weakref.ref(t) if isinstance(t, Tensor) else None for t in tree_flatten(out)[0]]
        if self.selective is not None:
            self.selective.finalize(len(self.meta))
        self.calls.append(call)
        return out

    def _pack(self, tensor: Tensor) -> _Handle:
        handle = _Handle(self, len(self.meta))
        self.meta.append((tensor.shape, tensor.dtype, tensor.device))
        if self.selective is not None:
            self.selective.note_saved(tensor, handle.index)
        self.live[handle.index] = weakref.ref(handle)
        return handle

    def mode_for_forward(self):
        return self.selective.recording() if self.selective is not None else nullcontext()

    def mode_for_recompute(self):
        return self.selective.replaying() if self.selective is not None else nullcontext()

    # ---- backward
    def unpack(self, index: int) -> Tensor:
        if index not in self.store:
            self.recompute(index)
        return self.store.pop(index)

    def _wanted(self, index: int) -> set[int]:
        alive = {i for i, ref in self.live.items() if ref() is not None and i not in self.store}
        alive.add(index)
        return alive

    def recompute(self, index: int) -> None:
        """Re-runs the calls until every still-needed saved tensor is rebuilt (see module docstring)."""
        wanted = self._wanted(index)
        last, counter = max(wanted), [0]
        start = time.perf_counter()

        def pack(tensor: Tensor):
            i = counter[0]
            counter[0] += 1
            self._check(i, tensor)
            if i in wanted:
                self.store[i] = tensor.detach()
            if i >= last:
                raise _StopRecompute
            return None

        if self.offloader is not None:
            self.offloader.before_recompute(self)
        outputs: list[list] = []
        with torch.autograd.graph.saved_tensors_hooks(pack, _no_unpack), _recompute_scope(), \
                torch.enable_grad():
            try:
                for call in self.calls:
                    outputs.append(call.run(self, outputs))
            except _StopRecompute:
                pass
        self.recomputations += 1
        tracking.note_recompute(self.label, time.perf_counter() - start)
        if counter[0] <= last:
            raise CheckpointMismatchError(
                f"lowcost.checkpoint({self.name}): the recomputation saved {counter[0]} tensors for backward, "
                f"the forward saved {len(self.meta)}; tensor #{last} ({_describe(self.meta[last])}) was never "
                f"rebuilt. fn must take the same code path when it is run again.")

    def _check(self, i: int, tensor: Tensor) -> None:
        if i >= len(self.meta):
            raise CheckpointMismatchError(
                f"lowcost.checkpoint({self.name}): the recomputation saved more tensors for backward than the "
                f"forward did ({len(self.meta)}); extra tensor #{i}: {_describe((tensor.shape, tensor.dtype, tensor.device))}")
        got = (tensor.shape, tensor.dtype, tensor.device)
        if got != self.meta[i]:
            raise CheckpointMismatchError(
                f"lowcost.checkpoint({self.name}): saved tensor #{i} differs between forward and recompute: "
                f"forward saved {_describe(self.meta[i])}, recomputation produced {_describe(got)}. "
                f"fn must be deterministic in shapes and dtypes.")


def _unpack(handle: _Handle) -> Tensor:
    return handle.frame.unpack(handle.index)


def _no_unpack(_):
    raise RuntimeError("lowcost.checkpoint: backward through a recomputed graph is not supported")


# ------------------------------------------------------------------------------------------- public
def checkpoint(fn: Callable, *args, use_reentrant: Optional[bool] = None, preserve_rng_state: bool = True,
               **kwargs) -> Any:
    """Runs ``fn(*args, **kwargs)`` keeping only its inputs; what backward needs is recomputed then.

    A drop-in for ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)``:
    gradients are bit-identical to running ``fn`` without checkpointing (RNG replayed on CPU and CUDA,
    so dropout and the fused LoRA op's seeded dropout give the same masks). Inputs need not require grad,
    kwargs may hold tensors, outputs may be nested or hold non-tensors, calls may nest.

    Args:
        fn: any callable (a module, a bound forward, a function closing over parameters).
        *args, **kwargs: passed to fn; tensor leaves are kept (detached) to re-run fn in backward.
        use_reentrant: accepted for compatibility; only False/None is supported.
        preserve_rng_state: replay the RNG states (default True).
    Returns:
        fn's output, unchanged.
    """
    if use_reentrant:
        raise ValueError("lowcost.checkpoint implements non-reentrant checkpointing only (use_reentrant=False)")
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return Frame(preserve_rng=preserve_rng_state).run(fn, args, kwargs)


def checkpoint_with(fn: Callable, args: tuple, kwargs: dict, *, frame: Optional[Frame] = None,
                    selective=None, offloader=None, label=None):
    """Policy entry point: checkpoint one call with a selective cache and/or offloader, or extend ``frame``.

    Returns (output, frame). Pass the returned frame back to append the next block of a segment.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs), None
    if frame is None:
        frame = Frame(selective=selective, offloader=offloader, label=label)
    return frame.run(fn, args, kwargs), frame
