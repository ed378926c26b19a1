"""What a training step costs, measured: saved-activation bytes, peak memory, optimizer-state bytes.

Saved-activation bytes are counted the way the benchmarks count them (``benchmarks/harness.py``): the
distinct storages autograd saves for backward (an outer ``saved_tensors_hooks``), plus what lowcost's
checkpoint frames keep outside autograd (``lowcost.checkpoint.track``), plus, for torch/HF gradient
checkpointing, the block inputs that ``torch.utils.checkpoint`` holds in a closure no hook sees (recorded by
forward pre-hooks on the blocks). Each storage is counted once; parameters are excluded.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated when measuring began;
on a CPU the resident set size (``/proc/self/statm``) sampled every 5 ms by a thread, above the RSS
when measuring began. Before a CPU measurement freed heap pages are handed back to the system
(``malloc_trim``), so memory freed by an earlier run does not hide a later run's growth.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import threading
import time

import torch
from torch import nn

from lowcost.checkpoint import track
from lowcost.checkpoint.install import resolve_blocks

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had (getrusage; kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB max alloc"
    return f"RSS {rss_bytes() / 2**30:.2f} GiB"


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the peak above the starting point."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self._base = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.bytes = self._peak - self._base


@contextlib.contextmanager
def _closure_inputs(model: nn.Module, exclude: set, seen: dict):
    """Records the tensor inputs of every block (what torch.utils.checkpoint keeps in its closure)."""
    def pre(module, args, kwargs):
        values = list(args) + list(kwargs.values())
        values += [t for v in kwargs.values() if isinstance(v, (tuple, list)) for t in v]
        for t in values:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in exclude and storage.nbytes():
                    seen.setdefault(storage.data_ptr(), storage.nbytes())
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True) for _, block in resolve_blocks(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class SavedBytes:
    """Counts the saved-activation bytes of the forwards run inside ``with SavedBytes(model, hf=...)``.

    ``hf=True`` also counts the block inputs kept by torch/HF gradient checkpointing (see module docstring).
    ``bytes`` is set on exit."""

    def __init__(self, model: nn.Module, hf_checkpointing: bool = False):
        self.model, self.hf = model, hf_checkpointing
        self.bytes = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "SavedBytes":
        params = list(self.model.parameters())
        exclude = {p.untyped_storage().data_ptr() for p in params}
        self._closure: dict = {}
        if self.hf:
            self._stack.enter_context(_closure_inputs(self.model, exclude, self._closure))
        self._tracker = self._stack.enter_context(track(params, hook=True))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        storages = {ptr: entry[0] for ptr, entry in self._tracker.storages.items()}
        for ptr, nbytes in self._closure.items():
            storages.setdefault(ptr, nbytes)
        self.bytes = sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (Adam: exp_avg, exp_avg_sq, step)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), shared storages counted once; a quantized frozen weight
    (``QuantizedWeight``, held as buffers) counts its N·K logical parameters, once when shared."""
    from lowcost.reference.quant import QuantizedWeight
    seen, n_train, n_all = set(), 0, 0
    for param in model.parameters():
        key = param.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n_all += param.numel()
        n_train += param.numel() if param.requires_grad else 0
    quantized = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}
    n_all += sum(w.shape[0] * w.shape[1] for w in quantized.values())
    return n_train, n_all


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights, views; a quantized
    base counts its codes and scales)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def hardware(device: torch.device) -> str:
    """The machine in words: GPU name, or CPU model, core count and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
