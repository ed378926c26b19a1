"""``CheckpointConfig``: which policy, its parameters, the byte budget and the offload options."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional, Union

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class CheckpointConfig:
    """How to checkpoint a model's blocks.

    Attributes:
        policy: "full", "every_k", "sqrt", "selective", "offload", "none" or "budget" (implied by ``budget``).
        k: for "every_k", checkpoint blocks 0, k, 2k, ….
        budget: bytes the saved activations may take: "6GiB", "512MB", an int of bytes, or a float in
            (0, 1] meaning that fraction of the no-checkpoint bytes. Needs a profiling step.
        candidates: the modes the budget planner chooses from ("offload" is added on a GPU when
            ``offload_in_budget``; on a CPU host memory is the device memory, so it never helps there).
        offload_pin: pinned host buffers for offload (skipped when no GPU is present).
        offload_prefetch: how many blocks ahead backward prefetches offloaded inputs.
        offload_min_bytes: inputs smaller than this are not offloaded.
        offload_in_budget: let the planner pick "offload" on a GPU.
        disable_use_cache: set ``model.config.use_cache = False`` on HF models (a KV cache written
            during the forward would be written again by the recompute).
        recompute: for "selective" only: module paths relative to a block (e.g. ``("self_attn.o_proj",)``)
            whose matmuls are recomputed instead of kept. A path matches a block submodule whose name
            equals it or ends with "." + it ("o_proj" matches "self_attn.o_proj", a PEFT ``lora.Linear``
            wrapper included); inside a matching module the selective cache neither records nor replays,
            so its outputs are rebuilt from the kept inputs in backward. A path matching no submodule of
            any checkpointed block is a ValueError when checkpointing is installed.
    """
    policy: str = "full"
    k: int = 2
    budget: Optional[Union[str, int, float]] = None
    candidates: tuple[str, ...] = ("none", "selective", "full")
    offload_pin: bool = True
    offload_prefetch: int = 1
    offload_min_bytes: int = 0
    offload_in_budget: bool = True
    disable_use_cache: bool = True
    recompute: tuple[str, ...] = ()

    def __post_init__(self):
        check_name("checkpoint policy", self.policy, policy_names())
        for mode in self.candidates if isinstance(self.candidates, (tuple, list)) else [self.candidates]:
            check_name("checkpoint budget candidates: mode", mode, MODES)
        if self.budget is not None:
            check_budget(self.budget)
        if self.budget is not None and self.policy not in ("full", "budget"):
            raise ValueError(f"budget= picks the policy itself; got policy={self.policy!r} as well")
        if self.budget is not None:
            object.__setattr__(self, "policy", "budget")
        if self.policy == "budget" and self.budget is None:
            raise ValueError("policy='budget' needs budget= (e.g. '6GiB' or 0.3)")
        for name, low in (("k", 1), ("offload_prefetch", 0), ("offload_min_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        object.__setattr__(self, "recompute", module_paths("recompute", self.recompute))
        if self.recompute and self.policy != "selective":
            raise ValueError(f"recompute={self.recompute!r} applies to policy='selective' only (it names modules "
                             f"whose matmuls selective recomputes); got policy={self.policy!r}")


def module_paths(what: str, paths) -> tuple[str, ...]:
    """A tuple of dotted module paths ("self_attn.o_proj"); a single string is one path."""
    if paths is None:
        return ()
    if isinstance(paths, str):
        paths = (paths,)
    if not isinstance(paths, (tuple, list)):
        raise ValueError(f"{what} must be a tuple of module paths such as ('self_attn.o_proj',), got {paths!r}")
    for path in paths:
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ValueError(f"{what}: each entry must be a dotted module path such as 'self_attn.o_proj', "
                             f"got {path!r}")
    return tuple(dict.fromkeys(paths))


MODES = ("none", "full", "selective", "offload")


def policy_names() -> tuple[str, ...]:
    from lowcost.checkpoint.policies import POLICIES  # policies.py imports this module
    return tuple(POLICIES) + ("budget",)


def check_name(what: str, value, allowed) -> None:
    """A one-line ValueError naming the closest allowed name when ``value`` is not one of ``allowed``."""
    if isinstance(value, str) and value in allowed:
        return
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {what} {value!r}{hint} (expected one of {', '.join(map(repr, allowed))})")


def check_budget(budget) -> None:
    """Raises the one-line error ``parse_budget`` would raise, without knowing the no-checkpoint bytes."""
    if isinstance(budget, (str, int, float)) and not isinstance(budget, bool):
        parse_budget(budget, 1)
        return
    raise ValueError(f"budget must be a size such as '6GiB' or 10**9, or a fraction in (0, 1]; got {budget!r}")


def parse_budget(budget, no_checkpoint_bytes: int) -> int:
    """Budget in bytes: "6GiB" / "1.5 GB" / int bytes / float fraction in (0, 1] of the no-checkpoint bytes."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a size or a fraction, got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a fraction of the no-checkpoint bytes in (0, 1], got {budget}")
        return int(budget * no_checkpoint_bytes)
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        return budget
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read budget {budget!r}; use a number with a unit among "
                         f"{', '.join(u for u in _UNITS if u)} (e.g. '6GiB', '512MB'), 10**9 bytes or a fraction 0.3")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return value


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n} bytes)"
