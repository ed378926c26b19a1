"""What a frame keeps of one call's inputs, and the in-place checks that guard them.

Each leaf of the call's ``(args, kwargs)`` is kept as one of

- ``("const", value)``: not a tensor, passed again as is;
- ``("keep", tensor, version)``: the caller's tensor object itself, so the recompute sees the same objects
  (``x`` passed twice is one object again, attributes and identity checks behave as in the forward);
- ``("ref", call, leaf, weakref, version)``: an output of an earlier call of the same frame (a segment),
  or an exact alias of one (same storage, dtype, shape, strides and offset: the new view FSDP2's pre-forward
  hook hands the next block), re-derived by the recompute instead of kept;
- ``("offload", host handle, requires_grad, weakref, version)``: a host copy (``offload.py``); one device copy
  per host buffer and recompute, so a tensor passed twice is one object again.

Versions. A kept input modified in place after the call — by the caller, or by fn itself — would make the
recompute run on other values and give a silently wrong gradient. As torch does for the inputs it saves, the
version counter read at the call is compared when the recompute needs the input, and a change is an error.
Host copies and re-derived outputs cannot see later changes (the copy is a snapshot, the output is rebuilt),
so for them only a change made while fn ran (fn modifying its own input) is recorded and raised.
"""
from __future__ import annotations

import weakref

import torch
import torch.utils.checkpoint as tuc

from lowcost.checkpoint import tracking


def _version(tensor: torch.Tensor):
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


def _exact_alias(x: torch.Tensor, other: torch.Tensor) -> bool:
    """True when ``x`` is ``other`` or a view of the very same elements (so it always holds the same values)
    that autograd treats alike (``out.detach()`` is not one: the recompute would save other tensors)."""
    if x is other:
        return True
    try:
        storage = x.untyped_storage()
        return (storage.nbytes() > 0 and storage.data_ptr() == other.untyped_storage().data_ptr()
                and x.dtype == other.dtype and x.device == other.device and x.shape == other.shape
                and x.stride() == other.stride() and x.storage_offset() == other.storage_offset()
                and x.requires_grad == other.requires_grad)
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (fake, functional, ...)
        return False


class CallInputs:
    """The kept inputs of one call (see the module docstring for the kinds)."""

    def __init__(self, frame, leaves: list):
        self.mutated = None  # (leaf index, description) of an input fn modified in place
        self.leaves = [self._encode(frame, x) for x in leaves]
        self.name = frame.name

    @staticmethod
    def _encode(frame, x):
        if not isinstance(x, torch.Tensor):
            return ("const", x)
        for ci, call in enumerate(frame.calls):
            for li, ref in enumerate(call.outputs):
                out = ref() if ref is not None else None
                if out is not None and _exact_alias(x, out):
                    return ("ref", ci, li, weakref.ref(x), _version(x))
        if frame.offloader is not None and frame.offloader.wants(x):
            return ("offload", frame.offloader.offload(x, frame.label), x.requires_grad, weakref.ref(x), _version(x))
        tracking.note_kept(x, frame.label, "input")
        return ("keep", x, _version(x))

    def note_forward_mutations(self) -> None:
        """After fn returned: remember an input of the snapshot kinds that fn modified in place."""
        for i, leaf in enumerate(self.leaves):
            if leaf[0] in ("ref", "offload"):
                tensor = leaf[-2]()
                if tensor is not None and _version(tensor) != leaf[-1]:
                    self.mutated = (i, tensor, leaf[-1])
                    return

    def decode(self, outputs_so_far: list, memo: dict) -> list:
        """The leaves for a recompute; raises if a kept input was modified in place since the call."""
        if self.mutated is not None:
            self._raise(*self.mutated)
        out = []
        for i, leaf in enumerate(self.leaves):
            kind = leaf[0]
            if kind == "const":
                out.append(leaf[1])
            elif kind == "keep":
                if _version(leaf[1]) != leaf[2]:
                    self._raise(i, leaf[1], leaf[2])
                out.append(leaf[1])
            elif kind == "ref":
                out.append(outputs_so_far[leaf[1]][leaf[2]])
            else:
                key = id(leaf[1].host)
                if key not in memo:
                    memo[key] = leaf[1].get().detach().requires_grad_(leaf[2])
                out.append(memo[key])
        return out

    def _raise(self, index: int, tensor: torch.Tensor, expected) -> None:
        raise tuc.CheckpointError(
            f"lowcost.checkpoint({self.name}): input #{index} ({_describe(tensor)}) was modified by an inplace "
            f"operation after the checkpointed call received it (version {_version(tensor)}, expected "
            f"{expected}), so the recompute would give a wrong gradient; modify a clone instead")
