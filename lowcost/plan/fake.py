"""Running the real training code on fake tensors: the context the planner traces in, and a live-bytes meter.

``fake_world()`` enters ``FakeTensorMode`` (tensors with shapes, dtypes, strides and storages but no data)
and fixes the four places where code behaves differently on fake tensors than in an eager CPU run, so
that the trace allocates and saves what the eager run would:

1. storage identity. A fake storage has no memory, so ``data_ptr()`` is 0 for all of them; lowcost's
   saved-tensor accounting (``lowcost.checkpoint.tracking``) and the selective cache key storages by
   ``data_ptr()``. Inside the context, ``UntypedStorage.data_ptr`` of a fake (meta) storage returns the
   address of its ``StorageImpl`` instead: unique while the storage lives, which is all those keys need.
   Real storages are untouched.
2. attention kernel. ``torch._fused_sdp_choice`` answers "math" for fake tensors, which would trace the
   (batch, heads, seq, seq) attention matrix that the CPU and GPU flash kernels never build. ``LiveBytes``
   answers it from real, never-written tensors with the same shapes, strides and dtypes.
3. metadata queries. ``tensor.device`` on a fake tensor is dispatched (``prim.device``) to every dispatch
   mode; lowcost's selective-recompute mode would take it for a read of the tensor's data and keep a cache
   entry the eager run drops. Inside the context that mode lets ``prim`` queries through untouched.
4. causal masks. transformers treats fake tensors as "being compiled" and then builds the (seq × seq)
   causal mask and a packed-sequence mask that an eager run skips. Inside the context
   ``find_packed_sequence_indices`` says "not packed" (the planner's batch holds one sequence per row)
   and the mask helpers do not see fake tensors as tracing.

The fixes patch process-wide attributes for the duration of the context: do not trace in two threads at
once. ``LiveBytes`` is a dispatch mode that follows every storage an op creates until it is freed (weak
references to storages) and records the peak of the live total: the same liveness the eager run has,
because the same Python and autograd code frees the same tensors at the same points. It cannot see memory
a kernel allocates and frees inside itself (that is the workspace the planner adds from ``workspace.py``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

_REAL_DATA_PTR = torch.UntypedStorage.data_ptr


def _data_ptr(storage) -> int:
    return storage._cdata if storage.device.type == "meta" else _REAL_DATA_PTR(storage)


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage: its data pointer, or its StorageImpl address for fake/meta storages."""
    return _data_ptr(tensor.untyped_storage())


@contextlib.contextmanager
def _fake_storage_pointers():
    torch.UntypedStorage.data_ptr = _data_ptr
    try:
        yield
    finally:
        torch.UntypedStorage.data_ptr = _REAL_DATA_PTR


@contextlib.contextmanager
def _eager_transformers_masks():
    """transformers' mask code as it runs eagerly on an unpadded, unpacked batch (see the module docstring)."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    saved = {name: getattr(masking_utils, name) for name in ("find_packed_sequence_indices", "is_tracing")
             if hasattr(masking_utils, name)}
    real_is_tracing = saved.get("is_tracing")
    if "find_packed_sequence_indices" in saved:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    if real_is_tracing is not None:
        masking_utils.is_tracing = lambda tensor=None: real_is_tracing(None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(masking_utils, name, value)


@contextlib.contextmanager
def _metadata_queries_are_not_reads():
    from lowcost.checkpoint import selective
    original = selective._Mode.__torch_dispatch__

    def dispatch(self, func, types, args=(), kwargs=None):
        if func.namespace == "prim":   # prim.device / prim.layout: metadata, never a read of the data
            return func(*args, **(kwargs or {}))
        return original(self, func, types, args, kwargs)

    selective._Mode.__torch_dispatch__ = dispatch
    try:
        yield
    finally:
        selective._Mode.__torch_dispatch__ = original


@contextlib.contextmanager
def fake_world():
    """``FakeTensorMode`` (real inputs allowed and converted) with the fixes above; yields the mode."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_storage_pointers(), _metadata_queries_are_not_reads(), _eager_transformers_masks(), mode:
        yield mode


def _real_like(value):
    """A real CPU tensor with ``value``'s metadata (never written, so it costs no resident memory)."""
    if not isinstance(value, torch.Tensor):
        return value
    t = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="cpu")
    return t.requires_grad_(value.requires_grad) if value.dtype.is_floating_point else t


def _eager_sdp_choice(func, args, kwargs) -> int:
    with _disable_current_modes():
        real_args = [_real_like(a) for a in args]
        real_kwargs = {k: _real_like(v) for k, v in kwargs.items()}
        return func(*real_args, **real_kwargs)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops while active, tracked until freed; ``peak`` is the maximum,
    ``at_peak`` what was live then (storage key → (weak reference, bytes); the reference object tells a
    storage apart from a later one at the same address), ``peak_workspace`` the kernel workspace in it.

    Args:
        ignore: a callable returning storage keys not to count (e.g. offloaded host copies), read at each op.
        workspace: ``(func, args, kwargs, out) -> bytes`` a kernel allocates and frees inside itself,
            added to the live total at that op only.
    """

    def __init__(self, ignore: Optional[Callable[[], Iterable[int]]] = None,
                 workspace: Optional[Callable] = None):
        super().__init__()
        self.ignore, self.workspace = ignore, workspace
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}   # storage key -> (weak reference, bytes)
        self.current = self.peak = self.peak_workspace = 0
        self.peak_op = ""
        self._ignored: set = set()
        self.at_peak: dict = {}   # storage key -> (weak ref, bytes) of what was live at the peak

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            del self.live[key]
        self._ignored = set(self.ignore()) if self.ignore is not None else set()
        self.current = sum(n for key, (_, n) in self.live.items() if key not in self._ignored)

    def _add(self, out, args, kwargs) -> None:
        """Counts the output storages the op created: not one of its inputs' (views, in-place and out=
        results share those), not one already live, not empty."""
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage_key(t)
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    if key not in self._ignored:
                        self.current += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":
            return func(*args, **kwargs)
        if func is torch.ops.aten._fused_sdp_choice.default:
            return _eager_sdp_choice(func, args, kwargs)
        out = func(*args, **kwargs)
        self._sweep()   # first: a new storage may reuse the key of one freed since the last op
        self._add(out, args, kwargs)
        extra = self.workspace(func, args, kwargs, out) if self.workspace is not None else 0
        if self.current + extra > self.peak:
            self.peak, self.peak_workspace, self.peak_op = self.current + extra, extra, str(func)
            self.at_peak = {key: entry for key, entry in self.live.items() if key not in self._ignored}
        return out
