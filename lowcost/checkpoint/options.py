"""``torch.utils.checkpoint``'s keyword options, with torch's meaning, for ``lowcost.checkpoint``.

- ``use_reentrant``: lowcost is non-reentrant only; ``False`` (or not given) is accepted, ``True`` is an error.
- ``preserve_rng_state``: capture the RNG states at the call and replay them in the recompute.
- ``determinism_check``: ``"default"`` compares shape, dtype and device of every tensor saved in the recompute
  with the forward's; ``"none"`` skips that comparison (the number of saved tensors is still checked).
- ``debug``: a mismatch error also shows the operators the forward and the recompute ran around the first
  difference. ``torch.utils.checkpoint.set_checkpoint_debug_enabled`` overrides it, as it does for torch.
- ``early_stop``: stop the recompute once every still-needed tensor is rebuilt (default); ``False`` runs fn to
  its end. ``torch.utils.checkpoint.set_checkpoint_early_stop`` overrides it, as it does for torch.
- ``context_fn``: returns two context managers, the forward runs under the first and the recompute under the
  second; torch's selective-checkpoint contexts (``create_selective_checkpoint_contexts``) work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint as tuc
from torch.utils._python_dispatch import TorchDispatchMode

DETERMINISM_CHECKS = ("default", "none")


@dataclass
class Options:
    preserve_rng_state: bool = True
    determinism_check: str = "default"
    early_stop: bool = True
    debug: bool = False
    context_fn: Callable = tuc.noop_context_fn
    logs: tuple = field(default_factory=tuple)  # with debug: ([forward ops], [recompute ops])

    def contexts(self):
        """(forward context, recompute context) for one call."""
        if self.debug:
            forward_ops, recompute_ops = [], []
            self.logs = (forward_ops, recompute_ops)
            return OpLog(forward_ops), OpLog(recompute_ops)
        pair = self.context_fn()
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"lowcost.checkpoint: context_fn must return a tuple of two context managers "
                            f"(forward, recompute), got {type(pair).__name__}")
        return pair


def resolve(use_reentrant, preserve_rng_state, context_fn, determinism_check, debug, early_stop) -> Options:
    """Checks torch's options and applies torch's global overrides; raises a one-line error for a bad value."""
    if use_reentrant:
        raise ValueError("lowcost.checkpoint is non-reentrant only: pass use_reentrant=False (or leave it out); "
                         "use_reentrant=True is not supported")
    if determinism_check not in DETERMINISM_CHECKS:
        raise ValueError(f"lowcost.checkpoint: determinism_check must be one of {list(DETERMINISM_CHECKS)}, "
                         f"got {determinism_check!r}")
    if not callable(context_fn):
        raise TypeError(f"lowcost.checkpoint: context_fn must be a callable returning two context managers, "
                        f"got {type(context_fn).__name__}")
    global_debug = getattr(tuc, "_checkpoint_debug_enabled", None)
    debug = bool(global_debug if global_debug is not None else debug)
    if debug and context_fn is not tuc.noop_context_fn:
        raise ValueError("lowcost.checkpoint: debug=True cannot be combined with a context_fn (as in torch)")
    global_stop = getattr(tuc, "_enable_checkpoint_early_stop", None)
    early_stop = bool(global_stop if global_stop is not None else early_stop)
    return Options(bool(preserve_rng_state), determinism_check, early_stop, debug, context_fn)


class OpLog(TorchDispatchMode):
    """Records the name of every operator that runs (``debug=True``)."""

    def __init__(self, names: list):
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.detach.default:  # the recompute detaches what it keeps: not fn's
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def describe_divergence(logs: tuple, window: int = 4) -> str:
    """'… forward ran [a, b, c] where the recompute ran [a, b, d]', around the first operator that differs."""
    if not logs:
        return ""
    forward, recompute = logs
    first = next((i for i, (f, r) in enumerate(zip(forward, recompute)) if f != r), min(len(forward), len(recompute)))
    start = max(0, first - window + 1)

    def part(ops):
        shown = ", ".join(ops[start:first + 1]) or "nothing"
        return ("…, " if start else "") + shown

    return (f" debug: operator #{first} differs; the forward ran [{part(forward)}] where the recompute ran "
            f"[{part(recompute)}] ({len(forward)} vs {len(recompute)} operators).")
