"""The global state a checkpointed call ran under, captured at the call and restored in its recompute.

A recompute runs inside backward, which may run under another RNG state, another autocast setting or another
default device than the forward did. ``ForwardState`` captures, at the call:

- the CPU RNG state and the CUDA RNG state of every device the inputs live on plus the current device
  (only when CUDA is already initialised; with ``preserve_rng_state=False`` nothing is captured);
- the autocast state of the CPU and of every accelerator present: enabled or not, dtype, cache flag
  (so an autocast that was *off* in the forward is switched off again in the recompute);
- the default device (``with torch.device(...)`` or ``torch.set_default_device``).

``restore()`` re-enters exactly what differs from the state backward runs under, so a recompute whose
state already matches pays nothing (no context manager is entered for autocast or the device).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch

def _autocast_devices() -> tuple[str, ...]:
    """The device types whose autocast state can matter here: the CPU and every accelerator present."""
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
               "mps": torch.backends.mps.is_available()}
    return tuple(d for d, ok in present.items() if ok and torch.amp.is_autocast_available(d))


_AUTOCAST_DEVICES = _autocast_devices()


def _cuda_devices(tensors) -> list[int]:
    """CUDA devices whose RNG state must be replayed: those of the inputs plus the current one."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    devices = {t.device.index for t in tensors if t.is_cuda}
    devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


def cuda_initialized() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGState:
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


def default_device():
    """The default device set by ``with torch.device(...)``/``set_default_device``, or None when none is set (the
    CPU; checked without the cost of ``torch.get_default_device`` when no torch-function mode is active)."""
    if torch._C._len_torch_function_stack() == 0:
        return None
    device = torch.get_default_device()
    return None if device == torch.device("cpu") else device


def autocast_state() -> tuple:
    """((device type, enabled, dtype, cache enabled), ...) for every device type with autocast."""
    cache = torch.is_autocast_cache_enabled()
    return tuple((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), cache)
                 for dev in _AUTOCAST_DEVICES)


class ForwardState:
    """RNG (optional), autocast and default device of one call; ``restore()`` puts them back."""

    def __init__(self, tensors, preserve_rng: bool):
        self.rng = RNGState(tensors) if preserve_rng else None
        self.cuda_was_initialized = cuda_initialized()
        self.autocast = autocast_state()
        self.device = default_device()

    def _changed(self) -> list:
        """Context managers putting back what differs now from the call's autocast and default device."""
        changed = []
        now = autocast_state()
        if now != self.autocast:
            current = {dev: rest for dev, *rest in now}
            for dev, enabled, dtype, cache in self.autocast:
                if current.get(dev) != [enabled, dtype, cache]:
                    changed.append(torch.autocast(dev, enabled=enabled, dtype=dtype, cache_enabled=cache))
        if default_device() != self.device:
            changed.append(torch.device(self.device if self.device is not None else "cpu"))
        return changed

    @contextmanager
    def restore(self):
        rng = self.rng.replay() if self.rng is not None else nullcontext()
        changed = self._changed()
        with rng, ExitStack() if changed else nullcontext() as stack:
            for context in changed:
                stack.enter_context(context)
            yield
