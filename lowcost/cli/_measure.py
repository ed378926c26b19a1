"""What a training step costs, measured: saved-activation bytes, peak memory, optimizer-state bytes.

Saved-activation bytes are counted the way the benchmarks count them (``benchmarks/harness.py``): the
distinct storages autograd saves for backward (an outer ``saved_tensors_hooks``), plus what lowcost's
checkpoint frames keep outside autograd (``lowcost.checkpoint.track``), plus, for torch/HF gradient
checkpointing, the block inputs that ``torch.utils.checkpoint`` holds in a closure no hook sees (recorded by
forward pre-hooks on the blocks). Each storage is counted once; parameters are excluded.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated when measuring began.
On a CPU, two meters:
- ``AllocatorPeak``: the most bytes that the tensors allocated while measuring held at one time, replayed from
  the profiler's allocation and free records in order. It counts tensors and nothing else, so it is the same
  from run to run (the demo uses it);
- ``PeakMemory``: the resident set size (``/proc/self/statm``) sampled every 5 ms by a thread, above the RSS
  when measuring began (``lowcost finetune`` uses it: no profiler over a long run). It also counts the C heap's
  retained and fragmented pages and the libraries' own buffers, so the same command spreads by 100 MiB and
  more from run to run. Before it starts, freed heap pages are handed back to the system (``malloc_trim``).
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
def _stderr_silenced():
    """fd 2 to /dev/null for the duration (the profiler's C++ side prints a line when it starts and stops)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class AllocatorPeak:
    """``with AllocatorPeak() as peak: ...`` then ``peak.bytes``: the most bytes that tensors allocated inside the
    block held at one time. ``torch.profiler`` (``profile_memory=True``) records every allocation and free of
    torch's CPU allocator; they are replayed in time order as a running total. A tensor allocated before the
    block and freed inside it is not subtracted (the profiler knows no size for it), so nothing that existed
    before the block can hide what the block needed."""

    def __init__(self):
        self.bytes = 0
        self.events = 0

    def __enter__(self) -> "AllocatorPeak":
        from torch.profiler import ProfilerActivity, profile
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        older = torch.empty(1)
        with _stderr_silenced():
            self._profile.__enter__()
            del older   # c10 warns once per process about such a free: let that warning go to /dev/null here
        return self

    def __exit__(self, *exc) -> None:
        with _stderr_silenced():
            self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        records = sorted(((e.start_ns(), e.nbytes()) for e in self._profile.profiler.kineto_results.events()
                          if e.name() == "[memory]"), key=lambda record: record[0])
        total = peak = 0
        for _, nbytes in records:
            total += nbytes
            peak = max(peak, total)
        self.bytes, self.events = peak, len(records)


def peak_meter(device: torch.device):
    """The demo's peak meter: CUDA max allocated on a GPU (``PeakMemory``), the CPU allocator's records elsewhere."""
    return PeakMemory(device) if device.type == "cuda" else AllocatorPeak()


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
