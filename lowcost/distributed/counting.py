"""``AllGatherCounter``: how many all-gathers a step issues (FSDP2 gathers each block's parameters).

FSDP2 all-gathers a block's parameters in its pre-forward and again in its pre-backward (after resharding
them post-forward). Recomputation must add none: the recomputed forward runs inside the block's backward,
while its parameters are unsharded. The counter wraps the collectives FSDP2 calls through
``torch.distributed`` (``all_gather_single`` on recent torch, ``all_gather_into_tensor`` before) for the
duration of a ``with`` block, on this rank, and counts calls; ``phase(name)`` files later calls under a name::

    with AllGatherCounter() as gathers:
        gathers.phase("forward");  loss = model(**batch).loss
        gathers.phase("backward"); loss.backward()
    gathers.counts   # {"forward": n_blocks + 1, "backward": n_blocks} with reshard_after_forward=True
"""
from __future__ import annotations

import functools
from collections import Counter

import torch

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor")


class AllGatherCounter:
    """Counts all-gather collectives issued through ``torch.distributed`` inside its ``with`` block."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.current = "all"
        self._originals: dict = {}
        self._depth = 0

    def phase(self, name: str) -> None:
        """Calls from now on are counted under ``name``."""
        self.current = name

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()

    def _wrap(self, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:  # one collective may call the other: count the outermost call only
                self.counts[self.current] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __enter__(self) -> "AllGatherCounter":
        if self._originals:
            raise RuntimeError("AllGatherCounter is already active")
        dist = torch.distributed
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
        if not self._originals:
            raise RuntimeError(f"torch.distributed has none of {COLLECTIVES}; cannot count all-gathers")
        for name, original in self._originals.items():
            setattr(dist, name, self._wrap(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.distributed, name, original)
        self._originals = {}
