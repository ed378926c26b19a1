"""Exact accounting of what checkpointing keeps: saved-tensor storages, kept inputs, caches, host copies.

``track()`` collects, while active:
- every storage autograd saves *outside* a lowcost frame (an outer ``saved_tensors_hooks``, when
  ``hook=True``), attributed to the block running at the time (``block_scope``) or to ``None`` (the rest
  of the model);
- every tensor a lowcost frame keeps elsewhere (its inputs, the selective cache, offload host buffers),
  which no saved-tensor hook sees;
- the seconds each block spent recomputing in backward.
Storages are counted once (by data pointer), parameters excluded, first attribution wins.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

_LOCAL = threading.local()
_TRACKERS: list["Tracker"] = []


def current_block():
    """Label of the block whose forward is running on this thread (None outside blocks)."""
    return getattr(_LOCAL, "block", None)


@contextmanager
def block_scope(label):
    previous = current_block()
    _LOCAL.block = label
    try:
        yield
    finally:
        _LOCAL.block = previous


@dataclass
class Tracker:
    """Storages kept for backward and recompute seconds, per block label."""

    exclude: set = field(default_factory=set)                     # parameter storage pointers
    storages: dict = field(default_factory=dict)                  # ptr -> (nbytes, label, kind, device type)
    recompute_s: dict = field(default_factory=dict)               # label -> seconds

    def add(self, tensor: torch.Tensor, label, kind: str) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or ptr in self.storages or storage.nbytes() == 0:
            return
        self.storages[ptr] = (storage.nbytes(), label, kind, tensor.device.type)

    def bytes(self, kinds: Optional[Iterable[str]] = None, device_type: Optional[str] = None) -> int:
        """Total bytes, optionally only of some kinds ("saved", "input", "cache", "offload") / device."""
        kinds = set(kinds) if kinds is not None else None
        return sum(n for n, _, kind, dev in self.storages.values()
                   if (kinds is None or kind in kinds) and (device_type is None or dev == device_type))

    def per_label(self, device_type: Optional[str] = None) -> dict:
        """label -> bytes (None: everything outside blocks)."""
        out: dict = {}
        for n, label, _, dev in self.storages.values():
            if device_type is None or dev == device_type:
                out[label] = out.get(label, 0) + n
        return out


def note_kept(tensor: torch.Tensor, label, kind: str) -> None:
    """Called by frames for every tensor they keep outside autograd's saved tensors."""
    for tracker in _TRACKERS:
        tracker.add(tensor, label, kind)


def note_recompute(label, seconds: float) -> None:
    for tracker in _TRACKERS:
        tracker.recompute_s[label] = tracker.recompute_s.get(label, 0.0) + seconds


@contextmanager
def track(parameters: Iterable[torch.Tensor] = (), hook: bool = False):
    """Collects kept storages (and, with ``hook``, autograd's saved storages) while active.

    With ``hook=True`` an outer ``saved_tensors_hooks`` pair is installed: it sees what autograd saves
    outside lowcost frames (frames install their own, inner hooks). Leave ``hook=False`` when another
    counter (``benchmarks.harness.saved_activation_bytes``) installs the outer hook.
    """
    tracker = Tracker(exclude={p.untyped_storage().data_ptr() for p in parameters})

    def pack(tensor):
        tracker.add(tensor, current_block(), "saved")
        return tensor

    _TRACKERS.append(tracker)
    try:
        if hook:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield tracker
        else:
            yield tracker
    finally:
        _TRACKERS.remove(tracker)
