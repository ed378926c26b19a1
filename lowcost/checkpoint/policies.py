"""Checkpoint policies: small functions that decide, per block, what to keep and what to recompute.

A policy is ``policy(index, n_blocks, config) -> Decision``. ``Decision.mode`` is one of

- ``"none"``: the block runs as usual, autograd keeps everything it saves;
- ``"full"``: only the block's inputs are kept, the whole block is recomputed in backward;
- ``"selective"``: inputs plus matmul/attention outputs are kept, the pointwise rest is recomputed;
  ``Decision.recompute`` names block submodules (e.g. ``self_attn.o_proj``) whose matmuls are recomputed too;
- ``"offload"``: like ``full`` but the inputs are kept in host memory and prefetched back.

``Decision.segment``, when set, groups consecutive ``full`` blocks into one checkpointed segment whose
single input is kept (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016): with n blocks
in ⌈√n⌉ segments the forward keeps O(√n) inputs and backward holds one segment's activations at a time.
The ``budget`` policy is not a function of the index: ``planner.plan`` picks a mode per block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from lowcost.checkpoint.config import MODES, check_name, module_paths


@dataclass(frozen=True)
class Decision:
    mode: str = "full"
    segment: Optional[int] = None
    recompute: tuple[str, ...] = ()  # "selective": block-relative module paths whose matmuls are recomputed

    def __post_init__(self):
        check_name("checkpoint mode", self.mode, MODES)
        object.__setattr__(self, "recompute", module_paths("recompute", self.recompute))
        if self.recompute and self.mode != "selective":
            raise ValueError(f"recompute={self.recompute!r} applies to mode 'selective' only, got mode {self.mode!r}")

    def __str__(self) -> str:
        if self.recompute:
            return f"{self.mode}[recompute={','.join(self.recompute)}]"
        return self.mode if self.segment is None else f"{self.mode}[segment {self.segment}]"


def none(index: int, n: int, config=None) -> Decision:
    """No checkpointing."""
    return Decision("none")


def full(index: int, n: int, config=None) -> Decision:
    """Every block: keep its inputs, recompute it whole."""
    return Decision("full")


def every_k(index: int, n: int, config=None) -> Decision:
    """Blocks 0, k, 2k, … are checkpointed (full); the others keep their activations."""
    k = getattr(config, "k", 2)
    return Decision("full") if index % k == 0 else Decision("none")


def sqrt(index: int, n: int, config=None) -> Decision:
    """Chen et al.: ⌈√n⌉ contiguous segments of ~√n blocks, each checkpointed as one unit."""
    segments = max(1, math.ceil(math.sqrt(n)))
    length = math.ceil(n / segments)
    return Decision("full", segment=index // length)


def selective(index: int, n: int, config=None) -> Decision:
    """Every block keeps matmul/attention outputs and recomputes norms, activations, RoPE, adds; the matmuls
    inside the modules named by ``config.recompute`` are recomputed too (their outputs are not kept)."""
    return Decision("selective", recompute=tuple(getattr(config, "recompute", ()) or ()))


def offload(index: int, n: int, config=None) -> Decision:
    """Every block: inputs to (pinned) host memory on a side stream, prefetched back in backward."""
    return Decision("offload")


POLICIES: dict[str, Callable[..., Decision]] = {
    "none": none, "full": full, "every_k": every_k, "sqrt": sqrt, "selective": selective, "offload": offload,
}


def decide(policy: str, n: int, config=None) -> list[Decision]:
    """The decisions of a named policy for n blocks."""
    check_name("checkpoint policy", policy, tuple(POLICIES))
    return [POLICIES[policy](i, n, config) for i in range(n)]
