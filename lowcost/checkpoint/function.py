"""``lowcost.checkpoint.checkpoint``: our own recompute mechanism, with torch's non-reentrant semantics.

How it works
------------
Forward. ``fn(*args, **kwargs)`` runs once, with grad enabled, inside a pair of ``saved_tensors_hooks``
owned by a ``Frame``. Every tensor autograd wants to save is *not* kept: the pack hook records its
(shape, dtype, device) under a running index ``i`` and hands autograd a small ``_Handle(frame, i)``
instead. The frame keeps only what it needs to run ``fn`` again: the input objects themselves with their
version counters (or host copies when offloading), and the state of the call (``state.ForwardState``: RNG,
autocast, default device). The call is registered *before* fn runs, so a saved tensor unpacked while fn is
still running (``torch.autograd.grad`` inside fn) can already be recomputed.

Backward. Recomputed tensors belong to one graph task (one ``backward``/``grad`` call, or one torch
``GraphExecGroup``), as in torch: the first unpack of a handle in a graph task makes the frame *recompute*
for that task. It restores the call's state (inside ``fork_rng``, so the backward's own RNG stream is left
untouched) and runs fn again on the same input objects — after checking that none was modified in place
since the call (torch's "modified by an inplace operation" error, never a silent wrong gradient) — under
recompute hooks that put the tensor saved at index ``i`` on the handle of ``i``, for every handle autograd
still holds. As soon as the largest such index is rebuilt it raises ``_StopRecompute`` (early stop) and the
rest of fn is not run again. Unpack takes the tensor off its handle, so each rebuilt tensor lives only as
long as the autograd node that needs it; unpacking it twice in one graph task is an error, as in torch.

The recompute hooks also return what they save, so the recomputed graph can itself be differentiated (a
``grad`` inside fn, run again by a recompute without early stop). That graph is thrown away afterwards:
gradients flow only through the original graph, which is why no input needs ``requires_grad`` (LoRA
parameters closed over inside fn get gradients as usual), why ``autograd.grad`` and ``backward(inputs=…)``
work, and why a parameter used by several checkpointed blocks is accumulated once by its single
``AccumulateGrad`` node (DDP-safe). Unlike torch, what that thrown-away graph holds (the tensors it saved;
through its hooks, the frame with its inputs) is released when the recomputation ends, even if a hook's
reference cycle keeps its nodes alive until the cycle collector runs (``_Recomputation``); differentiating
it later is an error. A recomputation that saves another number of tensors, or (with
``determinism_check="default"``) one of another shape, dtype or device, raises ``CheckpointMismatchError``.

A frame may hold several consecutive calls (a Chen et al. √n *segment* of blocks): the inputs of a later
call that are outputs of an earlier call in the same frame are not kept but re-derived in recompute.
"""
from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint as tuc
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowcost.checkpoint import tracking
from lowcost.checkpoint.inputs import CallInputs
from lowcost.checkpoint.options import Options, describe_divergence, resolve
from lowcost.checkpoint.selective import SelectiveCache
from lowcost.checkpoint.sharded import unshard_owner
from lowcost.checkpoint.state import ForwardState, cuda_initialized

Tensor = torch.Tensor
_LOCAL = threading.local()
_CONSUMED = object()
_NO_CONTEXTS = (nullcontext(), nullcontext())


class CheckpointMismatchError(tuc.CheckpointError):
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


def _graph_task():
    """The key recomputed tensors belong to: torch's GraphExecGroup, the running graph task, or a fresh key
    for an unpack outside any backward (``grad_fn._saved_…``), which therefore always recomputes."""
    group = tuc.GraphExecGroup._get_current_group()
    if group is not None:
        return group
    task = torch._C._current_graph_task_id()
    return task if task != -1 else object()


# ------------------------------------------------------------------------------------------- one call
class _Call:
    """One ``fn(*args, **kwargs)`` inside a frame: its inputs, its state and its two contexts (context_fn)."""

    def __init__(self, frame: "Frame", fn: Callable, args: tuple, kwargs: dict, contexts=_NO_CONTEXTS):
        self.fn, self.contexts = fn, contexts
        leaves, self.spec = tree_flatten((args, kwargs))
        self.state = ForwardState([t for t in leaves if isinstance(t, Tensor)], frame.options.preserve_rng_state)
        self.inputs = CallInputs(frame, leaves)
        self.outputs: list = []  # weakrefs to the forward's output tensor leaves (segment chaining)

    def run(self, frame: "Frame", outputs_so_far: list[list], memo: dict) -> list:
        """Runs fn again on the kept inputs; returns the flat output leaves."""
        args, kwargs = tree_unflatten(self.inputs.decode(outputs_so_far, memo), self.spec)
        unshard_owner(self.fn)  # FSDP2: an earlier block of a segment is still sharded (see sharded.py)
        with self.state.restore(), frame.mode_for_recompute(), self.contexts[1]:
            out = self.fn(*args, **kwargs)
        return tree_flatten(out)[0]


class _Handle:
    """What autograd holds instead of a saved tensor: the frame, the tensor's index, and the tensor rebuilt
    for each graph task (dropped with the handle when autograd frees the saved tensor)."""

    __slots__ = ("frame", "index", "rebuilt", "__weakref__")

    def __init__(self, frame: "Frame", index: int):
        self.frame, self.index, self.rebuilt = frame, index, {}


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
        options: torch's options (``options.Options``); ``preserve_rng`` is its ``preserve_rng_state``.
    """

    def __init__(self, preserve_rng: bool = True, selective=None, offloader=None, label=None,
                 options: Optional[Options] = None):
        self.options = options if options is not None else Options(preserve_rng_state=preserve_rng)
        self.offloader = offloader
        self.label = label if label is not None else tracking.current_block()
        self.meta: list[tuple] = []            # (shape, dtype, device) of each tensor saved in forward
        # the cache counts packs through the list itself: a closure over the frame would make a reference
        # cycle (frame -> cache -> frame) that keeps the frame, its inputs and its cache alive past backward
        # until the cycle collector happens to run
        self.selective = (SelectiveCache(selective, self.label, self.meta.__len__)
                          if selective is not None else None)
        self.calls: list[_Call] = []
        self.live: dict[int, weakref.ref] = {}  # index -> weakref to the handle autograd holds
        self.recomputed: set = set()            # graph tasks this frame has recomputed for
        self.running = False                    # a call's fn is running (its forward is not complete)
        self.recomputations = 0
        self.name = "fn"
        if offloader is not None:
            offloader.register(self)

    # ---- forward
    def run(self, fn: Callable, args: tuple, kwargs: dict, contexts=_NO_CONTEXTS):
        """Runs one call of fn under this frame's pack hooks; returns fn's output unchanged."""
        self.name = getattr(fn, "__qualname__", type(fn).__name__)
        call = _Call(self, fn, args, kwargs, contexts)
        self.calls.append(call)
        self.running = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), self.mode_for_forward(), \
                    contexts[0]:
                out = fn(*args, **kwargs)
        except BaseException:
            self.calls.pop()
            raise
        finally:
            self.running = False
        call.outputs = [weakref.ref(t) if isinstance(t, Tensor) else None for t in tree_flatten(out)[0]]
        call.inputs.note_forward_mutations()
        if self.selective is not None:
            self.selective.finalize(len(self.meta))
        if call.state.rng is not None and not call.state.cuda_was_initialized and cuda_initialized():
            raise tuc.CheckpointError(f"lowcost.checkpoint({self.name}): CUDA was initialised inside the "
                                      f"checkpointed call, so its RNG state could not be captured; initialise "
                                      f"CUDA before the call or pass preserve_rng_state=False")
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
    def unpack(self, handle: _Handle) -> Tensor:
        task = _graph_task()
        if task not in self.recomputed or task not in handle.rebuilt:
            self.recompute(task)
        value = handle.rebuilt[task]
        if value is _CONSUMED:
            raise tuc.CheckpointError(
                f"lowcost.checkpoint({self.name}): saved tensor #{handle.index} was already unpacked once in "
                f"this backward; a recomputed tensor is freed when it is unpacked (read ctx.saved_tensors once)")
        handle.rebuilt[task] = _CONSUMED
        return value

    def recompute(self, task) -> None:
        """Re-runs the calls until every handle still alive has its tensor for ``task`` (module docstring)."""
        self.recomputed.add(task)
        wanted = {i: h for i, ref in self.live.items() if (h := ref()) is not None and task not in h.rebuilt}
        if not wanted:
            return
        stop_at = max(wanted) if self.options.early_stop else None
        run = _Recomputation(self, task, wanted, stop_at)
        start = time.perf_counter()
        if self.offloader is not None:
            self.offloader.before_recompute(self)
        with torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack), _recompute_scope(), torch.enable_grad():
            try:
                outputs: list[list] = []
                memo: dict = {}
                for call in self.calls:
                    outputs.append(call.run(self, outputs, memo))
            except _StopRecompute:
                pass
            finally:
                saved = run.count
                run.release()
        self.recomputations += 1
        tracking.note_recompute(self.label, time.perf_counter() - start)
        self._check_count(saved, stop_at, wanted)

    def _check_count(self, saved: int, stop_at: Optional[int], wanted: dict) -> None:
        """Every wanted tensor rebuilt (and, without early stop, exactly as many saved as in the forward)."""
        if stop_at is not None and saved > stop_at:
            return
        if stop_at is None and (saved == len(self.meta) or (self.running and saved > max(wanted))):
            return
        missing = min([i for i in wanted if i >= saved] or [min(saved, len(self.meta) - 1)])
        raise self._mismatch(f"the recomputation saved {saved} tensors for backward, the forward saved "
                             f"{len(self.meta)}; tensor #{missing} ({_describe(self.meta[missing])}) was never "
                             f"rebuilt. fn must take the same code path when it is run again.")

    def _check(self, i: int, tensor: Tensor) -> None:
        if self.options.determinism_check == "none":
            return
        got = (tensor.shape, tensor.dtype, tensor.device)
        if got != self.meta[i]:
            raise self._mismatch(f"saved tensor #{i} differs between forward and recompute: forward saved "
                                 f"{_describe(self.meta[i])}, recomputation produced {_describe(got)}. "
                                 f"fn must be deterministic in shapes and dtypes.")

    def _mismatch(self, what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"lowcost.checkpoint({self.name}): {what}"
                                       + describe_divergence(self.options.logs))


def _unpack(handle: _Handle) -> Tensor:
    return handle.frame.unpack(handle)


class _Recomputation:
    """One recomputation of a frame for one graph task: its pack and unpack hooks.

    ``pack`` puts the tensor saved at index i on the handle of i when that handle wants it, raises
    ``_StopRecompute`` after index ``stop_at``, and gives autograd a box holding the tensor, so the graph
    the recomputation builds can be differentiated while it runs (a ``grad`` inside fn).

    That graph is garbage once the recomputation ends, but a reference cycle through it (a forward hook that
    registers a gradient hook holding the node it hooks, as ``FlopCounterMode``'s module tracker does) keeps
    its nodes, and the hooks they hold, alive until Python's cycle collector runs: with them every tensor
    they saved (a block's activations) and, through the hooks, the frame (its kept inputs) and the handles,
    piling up over backward, one block per recompute. ``release`` therefore empties the boxes and drops the
    frame and the handles when the recomputation ends; such nodes then hold nothing but this empty object.
    """

    __slots__ = ("frame", "name", "task", "wanted", "stop_at", "count", "boxes")

    def __init__(self, frame: "Frame", task, wanted: dict, stop_at: Optional[int]):
        self.frame, self.name, self.task, self.wanted, self.stop_at = frame, frame.name, task, wanted, stop_at
        self.count, self.boxes = 0, []

    def pack(self, tensor: Tensor) -> list:
        frame, i = self.frame, self.count
        self.count += 1
        kept = tensor.detach() if tensor.requires_grad else tensor
        if i >= len(frame.meta):
            if frame.running:  # a recompute during the forward may run past what was saved so far
                return self._hold(kept)
            raise frame._mismatch(f"the recomputation saves more tensors for backward than the forward "
                                  f"did ({len(frame.meta)}); extra tensor #{i}: "
                                  f"{_describe((tensor.shape, tensor.dtype, tensor.device))}")
        frame._check(i, tensor)
        if i in self.wanted:
            self.wanted[i].rebuilt[self.task] = kept
        if self.stop_at is not None and i >= self.stop_at:
            raise _StopRecompute
        return self._hold(kept)

    def _hold(self, tensor: Tensor) -> list:
        box = [tensor]
        self.boxes.append(box)
        return box

    def unpack(self, box: list) -> Tensor:
        if box[0] is None:
            raise tuc.CheckpointError(f"lowcost.checkpoint({self.name}): the graph built by a recomputation was "
                                      f"differentiated after that recomputation ended; its saved tensors are "
                                      f"freed when it ends (keep no output of fn's recomputation)")
        return box[0]

    def release(self) -> None:
        for box in self.boxes:
            box[0] = None
        self.boxes.clear()
        self.frame = self.wanted = self.task = None


# ------------------------------------------------------------------------------------------- public
def checkpoint(fn: Callable, *args, use_reentrant: Optional[bool] = None,
               context_fn: Callable = tuc.noop_context_fn, determinism_check: str = "default", debug: bool = False,
               early_stop: bool = True, preserve_rng_state: bool = True, **kwargs) -> Any:
    """Runs ``fn(*args, **kwargs)`` keeping only its inputs; what backward needs is recomputed then.

    A drop-in for ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)``, with the
    same options and their meaning (``options.py``): gradients are bit-identical to running ``fn`` without
    checkpointing (RNG replayed on CPU and CUDA, so dropout and the fused LoRA op's seeded dropout give the
    same masks). Inputs need not require grad, kwargs may hold tensors, outputs may be nested or hold
    non-tensors, calls may nest, fn may call ``torch.autograd.grad``. Inputs modified in place after the call
    (or by fn itself) make backward raise, as torch does. Under ``torch.compile`` the call is traced as torch's
    checkpoint operator (no graph break).

    Args:
        fn: any callable (a module, a bound forward, a function closing over parameters).
        *args, **kwargs: passed to fn (every keyword except torch's options below); the tensor inputs are kept
            (the same objects) to run fn again in backward.
        use_reentrant: False or None; True is an error (lowcost is non-reentrant only).
        context_fn, determinism_check, debug, early_stop, preserve_rng_state: as in torch.
    Returns:
        fn's output, unchanged.
    """
    if torch.compiler.is_compiling():
        from lowcost.checkpoint.compiled import torch_checkpoint
        return torch_checkpoint(fn, args, kwargs, use_reentrant=use_reentrant, context_fn=context_fn,
                                determinism_check=determinism_check, debug=debug, early_stop=early_stop,
                                preserve_rng_state=preserve_rng_state)
    options = resolve(use_reentrant, preserve_rng_state, context_fn, determinism_check, debug, early_stop)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return Frame(options=options).run(fn, args, kwargs, options.contexts())


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
