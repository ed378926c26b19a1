"""Selective recompute: keep the outputs of matmul/attention ops, recompute everything cheap.

A ``SelectiveCache`` belongs to one frame. During the frame's forward a ``TorchDispatchMode`` (below
autograd, so it sees ``aten.mm``/``aten.addmm``/``aten.bmm``/the SDPA kernels and the fused
``lowcost::lora_linear``) records, in call order, the (detached) outputs of every op the policy says to
save. During recompute the same mode *replays*: the n-th saved op returns the n-th recorded output instead
of running, so no matmul is done twice; norms, activations, RoPE, adds and dropout (RNG replayed) run
again. A recorded output modified in place after the forward (version counter changed) is recomputed
instead of replayed, so in-place code stays correct.

Recompute regions. ``RecomputeRegions`` puts a forward pre-hook and an (always called) forward hook on
chosen block submodules (``CheckpointConfig.recompute``, e.g. ``self_attn.o_proj``). While such a module's
forward runs, the mode neither records (forward) nor replays (recompute) — its ops simply run, and its
outputs are rebuilt in backward from the kept inputs (bit-identical: same inputs, same RNG replay, so the
same dropout masks). Skipped ops never enter the cache, so record and replay stay aligned by call order.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from lowcost.checkpoint import tracking

aten = torch.ops.aten


def _packets(names: Iterable[str]) -> set:
    out = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            out.add(packet)
    return out


MATMUL_OPS = _packets(["mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "addbmm", "_int_mm",
                       "convolution", "_scaled_mm"])
ATTENTION_OPS = _packets(["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                          "_flash_attention_forward", "_efficient_attention_forward"])


def _lowcost_ops() -> set:
    import lowcost.ops.lora_linear  # noqa: F401  (registers torch.ops.lowcost.lora_linear)
    import lowcost.ops.lora_gated_mlp  # noqa: F401  (a fused MLP: three matmuls, kept like lora_linear)
    import lowcost.ops.lora_grouped_linear  # noqa: F401  (grouped q/k/v or gate/up: matmuls, kept like lora_linear)
    import lowcost.ops.linear_cross_entropy  # noqa: F401  (the loss's matmuls, kept like lora_linear)
    import lowcost.ops.qlora_linear  # noqa: F401  (the ops over a quantized weight: also matmuls)
    import lowcost.ops.qlora_gated_mlp  # noqa: F401  (the fused MLP over quantized weights)
    ops = torch.ops.lowcost
    return {ops.lora_linear, ops.lora_gated_mlp, ops.lora_grouped_linear, ops.linear_cross_entropy, ops.qlora_linear,
            ops.quantized_linear, ops.qlora_gated_mlp}


def default_save_ops() -> set:
    """Op packets whose outputs the selective policy keeps: matmuls, attention, ``lowcost::lora_linear`` and
    its quantized-weight forms (``qlora_linear``, ``quantized_linear``, ``qlora_gated_mlp``: replaying them also
    skips dequantizing the weight again in backward)."""
    return MATMUL_OPS | ATTENTION_OPS | _lowcost_ops()


def save_matmuls(func) -> bool:
    """The default selective policy: save the outputs of matmul and attention ops."""
    return func.overloadpacket in _SAVE_OPS


_SAVE_OPS = default_save_ops()


_NEVER = 2**62
_ALIASING = _packets(["_unsafe_view", "_reshape_alias", "detach", "alias"])


# ------------------------------------------------------------------------------------------- recompute regions
_REGIONS = threading.local()  # .stack: ids of the recompute-region modules whose forward runs on this thread


def _region_stack() -> list:
    stack = getattr(_REGIONS, "stack", None)
    if stack is None:
        stack = _REGIONS.stack = []
    return stack


def _enter_region(module, args):
    _region_stack().append(id(module))


def _exit_region(module, args, output):
    # always called (also when the forward raises, e.g. the recompute's early stop); pops only this module's
    # own entry, so a pre-hook that never ran (an earlier pre-hook raised) leaves the stack alone
    stack = _region_stack()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] == id(module):
            del stack[i]
            break


def match_modules(block: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The submodules of ``block`` whose name relative to it equals ``path`` or ends with "." + ``path``."""
    return [(name, m) for name, m in block.named_modules()
            if name and (name == path or name.endswith("." + path))]


def _is_linear(module: nn.Module) -> bool:
    from lowcost.nn.lora_linear import LoRALinear, is_conv1d
    from lowcost.nn.quantized import QuantizedLinear
    if isinstance(module, (nn.Linear, LoRALinear, QuantizedLinear)) or is_conv1d(module):
        return True
    base = getattr(module, "base_layer", None)  # a PEFT LoRA layer wrapping a linear
    return isinstance(base, nn.Module) and _is_linear(base)


def linear_paths(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of its submodules that are or contain a linear layer, not descending
    into a linear layer (a PEFT ``lora.Linear``'s base_layer / lora_A / lora_B are not listed)."""
    out = []

    def walk(module: nn.Module, prefix: str) -> bool:
        if prefix and _is_linear(module):
            out.append(prefix)
            return True
        position = len(out)
        found = False
        for name, child in module.named_children():
            found = walk(child, f"{prefix}.{name}" if prefix else name) or found
        if found and prefix:
            out.insert(position, prefix)
        return found

    walk(block, "")
    return out


class RecomputeRegions:
    """Hooks marking ``modules`` as recompute regions for every selective mode on this thread."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.handles = []
        seen = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            self.handles.append(module.register_forward_pre_hook(_enter_region))
            self.handles.append(module.register_forward_hook(_exit_region, prepend=True, always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Mode(TorchDispatchMode):
    def __init__(self, cache: "SelectiveCache", replay: bool):
        super().__init__()
        self.cache, self.replay, self.position = cache, replay, 0
        self.depth = len(_region_stack())  # regions entered before this frame's call do not count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.replay and not (func.is_view or func.overloadpacket in _ALIASING):
            self.cache.note_uses(args, kwargs)  # views share the storage: their readers are what counts
        if len(_region_stack()) > self.depth or not self.cache.should_save(func):
            return func(*args, **kwargs)  # not saved, or inside a recompute region: run (no record/replay)
        if self.replay:
            return self._replay(func, args, kwargs)
        out = func(*args, **kwargs)
        self.cache.record(func, out)
        return out

    def _replay(self, func, args, kwargs):
        entries = self.cache.entries
        if self.position >= len(entries) or entries[self.position][0] is not func:
            seen = entries[self.position][0] if self.position < len(entries) else "nothing"
            raise RuntimeError(f"lowcost.checkpoint(selective): recompute called {func} as saved op "
                               f"#{self.position}, the forward called {seen}")
        _, out, versions = entries[self.position]
        self.position += 1
        now = _versions(out)
        if any(v is not None and v != old for v, old in zip(now, versions)):
            return func(*args, **kwargs)  # modified in place since the forward: cannot replay
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else _materialize(t), out)


def _versions(out) -> list:
    return [t._version if isinstance(t, torch.Tensor) else None for t in _leaves(out, True)]


class _Dropped:
    """A recorded output leaf that no recompute can reach (consumed only after the last saved tensor)."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device


def _materialize(x):
    """A dropped leaf comes back as NaN (never read: the recompute stops before anything consumes it)."""
    if isinstance(x, _Dropped):
        fill = float("nan") if x.dtype.is_floating_point else 0
        return torch.full(x.shape, fill, dtype=x.dtype, device=x.device)
    return x


def _leaves(out, dropped: bool = False) -> list:
    if isinstance(out, torch.Tensor) or (dropped and isinstance(out, _Dropped)):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _leaves(item, dropped)]
    return []


class SelectiveCache:
    """Outputs of the saved ops of one frame's forward, in call order.

    Args:
        should_save: ``func -> bool`` (an ``OpOverload``); default ``save_matmuls``.
        label: the block, for measurements.
    """

    def __init__(self, should_save: Callable = save_matmuls, label=None, pack_count: Callable = lambda: 0):
        self.should_save, self.label, self.pack_count = should_save, label, pack_count
        self.entries: list[tuple] = []  # (func, detached output tree, version counters)
        self._first_use: dict[int, int] = {}  # storage ptr of a recorded leaf -> pack count at its first use

    def record(self, func, out) -> None:
        kept = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
        for t in _leaves(kept):
            self._first_use.setdefault(t.untyped_storage().data_ptr(), _NEVER)
        self.entries.append((func, kept, _versions(kept)))

    def note_uses(self, args, kwargs) -> None:
        """Forward: a recorded leaf read by an op (or saved) at the current pack count."""
        if not self._first_use:
            return
        count = None
        for t in _leaves(list(args) + list(kwargs.values())):
            ptr = t.untyped_storage().data_ptr()
            if self._first_use.get(ptr, -1) == _NEVER:
                count = self.pack_count() if count is None else count
                self._first_use[ptr] = count

    def note_saved(self, tensor: torch.Tensor, index: int) -> None:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self._first_use:
            self._first_use[ptr] = min(self._first_use[ptr], index)

    def finalize(self, n_saved: int) -> None:
        """End of forward: drop leaves first read after the last saved tensor (no recompute reaches them).

        A recompute stops right after rebuilding saved tensor #n_saved-1 at the latest, so an op that ran
        when n_saved tensors had already been packed is never run again; a leaf whose first reader (or
        first save) came that late, or that nobody read, is never needed (e.g. the last matmul's output).
        """
        def keep(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t if self._first_use.get(t.untyped_storage().data_ptr(), _NEVER) < n_saved else _Dropped(t)

        self.entries = [(func, tree_map(keep, out), versions) for func, out, versions in self.entries]
        for _, out, _ in self.entries:
            for t in _leaves(out):
                tracking.note_kept(t, self.label, "cache")
        self._first_use.clear()

    @contextmanager
    def recording(self):
        with _Mode(self, replay=False):
            yield

    @contextmanager
    def replaying(self):
        with _Mode(self, replay=True):
            yield
