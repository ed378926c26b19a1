"""Count the matmuls a checkpointed backward runs again (the figure the selective policy keeps at zero).

    with RecomputeCounter() as counter:
        loss.backward()
    counter.count   # matmul, attention and lowcost::lora_linear calls made while a lowcost frame recomputed
"""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

from lowcost.checkpoint.function import recomputing
from lowcost.checkpoint.selective import default_save_ops


class RecomputeCounter(TorchDispatchMode):
    """A dispatch mode counting, in ``count``, the calls of ``ops`` (default: the op kinds the selective
    policy keeps — ``selective.default_save_ops()``) made while a lowcost checkpoint is recomputing."""

    def __init__(self, ops=None):
        super().__init__()
        self.ops = default_save_ops() if ops is None else set(ops)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if recomputing() and func.overloadpacket in self.ops:
            self.count += 1
        return func(*args, **(kwargs or {}))
