"""Offload: checkpoint inputs go to (pinned) host memory on a side stream and are prefetched back.

Forward. A frame hands each input tensor to ``Offloader.offload``: on CUDA the device→host copy is issued
on a side stream (which first waits for the compute stream; ``record_stream`` keeps the device block
alive until the copy is done) into pinned memory, and the frame keeps only the host buffer. Without a
GPU the same path runs with an ordinary (unpinned) host buffer and a synchronous copy.

Backward. Blocks are recomputed in reverse forward order. When frame k starts recomputing, the offloader
issues the host→device copies of the ``prefetch`` frames before it (k-1, …) on the side stream, so they
overlap with frame k's recompute and backward; ``OffloadedTensor.get`` makes the compute stream wait on
the copy's event. A frame whose inputs were not prefetched (the first one recomputed) copies on demand.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from lowcost.checkpoint import tracking


def _pinning_available() -> bool:
    return torch.cuda.is_available()


def _to_host(tensor: torch.Tensor, offloader: "Offloader") -> torch.Tensor:
    """Device→host copy into (pinned) memory; asynchronous on the side stream when on CUDA."""
    pin = offloader.pin and _pinning_available() and tensor.device.type != "cpu"
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
    stream = offloader.stream
    if stream is not None and tensor.is_cuda:
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)
    else:
        host.copy_(tensor)
    return host


class OffloadedTensor:
    """One frame input living in host memory, with an optional in-flight copy back to its device."""

    def __init__(self, host: torch.Tensor, device: torch.device, offloader: "Offloader"):
        self.host, self.device, self.offloader = host, device, offloader
        self._back: Optional[torch.Tensor] = None
        self._event = None

    def prefetch(self) -> None:
        """Starts the copy back to the device (asynchronous on CUDA); idempotent."""
        if self._back is not None:
            return
        stream = self.offloader.stream
        if stream is not None and self.device.type == "cuda":
            with torch.cuda.stream(stream):
                self._back = self.host.to(self.device, non_blocking=True)
                self._event = stream.record_event()
        else:
            self._back = torch.empty_like(self.host, device=self.device).copy_(self.host)
        self.offloader.stats["prefetched"] += 1

    def get(self) -> torch.Tensor:
        """The tensor back on its device (waits for the prefetch; copies now if none was issued)."""
        if self._back is None:
            self.offloader.stats["on_demand"] += 1
            self.prefetch()
            self.offloader.stats["prefetched"] -= 1
        back, event = self._back, self._event
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            back.record_stream(current)
        self._back, self._event = None, None  # the device copy lives only as long as this recompute
        return back


class Offloader:
    """Moves frame inputs to host memory and prefetches them back in backward order.

    Args:
        pin: use pinned host memory when a GPU is present (skipped otherwise).
        prefetch: how many earlier frames to prefetch when a frame starts recomputing.
        min_bytes: tensors smaller than this stay on the device (masks, position ids).
    """

    def __init__(self, pin: bool = True, prefetch: int = 1, min_bytes: int = 0):
        self.pin, self.prefetch_depth, self.min_bytes = pin, prefetch, min_bytes
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._frames: list[weakref.ref] = []
        self._hosts: dict[int, tuple] = {}  # id(tensor) -> (weakref, host buffer, version at the copy)
        self.stats = {"offloaded_bytes": 0, "prefetched": 0, "on_demand": 0}

    def wants(self, tensor: torch.Tensor) -> bool:
        return (not isinstance(tensor, torch.nn.Parameter)
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def offload(self, tensor: torch.Tensor, label=None) -> OffloadedTensor:
        """Host copy of a frame input; one host buffer per tensor object and version (RoPE tables shared by
        blocks are copied once; a tensor modified in place since its copy is copied again)."""
        ref, host, version = self._hosts.get(id(tensor), (None, None, None))
        if ref is None or ref() is not tensor or version != tensor._version:
            host = _to_host(tensor, self)
            self._hosts[id(tensor)] = (weakref.ref(tensor), host, tensor._version)
            self.stats["offloaded_bytes"] += host.numel() * host.element_size()
        tracking.note_kept(host, label, "offload")
        return OffloadedTensor(host, tensor.device, self)

    def register(self, frame) -> None:
        self._frames = [ref for ref in self._frames if ref() is not None]
        self._hosts = {k: v for k, v in self._hosts.items() if v[0]() is not None}
        self._frames.append(weakref.ref(frame))

    def before_recompute(self, frame) -> None:
        """Prefetches the inputs of the ``prefetch`` frames that precede ``frame`` in forward order."""
        frames = [ref() for ref in self._frames]
        if frame not in frames:
            return
        k = frames.index(frame)
        for earlier in frames[max(0, k - self.prefetch_depth):k]:
            if earlier is not None:
                for leaf in earlier.calls[0].inputs.leaves if earlier.calls else ():
                    if leaf[0] == "offload":
                        leaf[1].prefetch()
