"""What patching needs to know about torch.distributed: ranks agreeing, rank 0 writing, sharded adapters.

Every function here is a no-op (or the single-process answer) when no process group is initialised, so
single-process use never imports or touches torch.distributed's collectives.

- ``collectively(caller, action, describe, undo)``: runs ``action`` on every rank, then compares what each
  rank did (``describe``) in one ``all_gather_object``; a rank that failed or differs makes *every* rank
  raise the same clear error (no rank is left waiting in a later collective), and ``undo`` rolls back.
  This makes ``lowcost.apply`` collective under an initialised process group; inside ``this_rank_only()``
  (e.g. patching an evaluation model on rank 0 alone) the comparison is skipped.
- ``refuse_wrapped(model, caller)``: ``lowcost.apply`` / ``unapply`` / ``merge`` must run before DDP or
  ``fully_shard`` wrap the model: DDP builds its gradient buckets and FSDP2 its parameter groups from the
  parameters that exist at wrap time, so LoRA parameters added later would be silently left out.
- ``full_tensors`` / ``copy_into``: FSDP2 keeps each parameter as a DTensor shard. Saving gathers the full
  tensor (a collective: every rank must call ``save_adapter``); loading keeps each rank's own chunk of
  the file's full tensor, so a file loads at any world size.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Callable, Optional

import torch
from torch import nn

_SHOWN = 4  # differences named in an error message
_ORDER = ("call lowcost.apply(model, ...) first, then wrap: DistributedDataParallel(model), or fully_shard(block) "
          "for each decoder block and then fully_shard(model) (lowcost.distributed.shard_model does both)")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, or when not distributed: the one process that writes files."""
    return world()[0] == 0


# ------------------------------------------------------------------------------------------ wrapped models
def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def wrapper_of(model: nn.Module) -> Optional[str]:
    """How ``model`` is wrapped for data parallelism ("DistributedDataParallel", "fully_shard", …) or None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp2 = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    for name, module in model.named_modules():
        where = f" (module {name!r})" if name else ""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel" + where
        if fsdp2 is not None and isinstance(module, fsdp2):
            return "fully_shard (FSDP2)" + where
        if type(module).__name__ == "FullyShardedDataParallel":
            return "FullyShardedDataParallel (FSDP1)" + where
    if any(is_dtensor(p) for p in model.parameters()):
        return "DTensor parameters (sharded)"
    return None


def refuse_wrapped(model: nn.Module, caller: str) -> None:
    """Raises RuntimeError when ``model`` is already wrapped by DDP or sharded by FSDP."""
    wrapper = wrapper_of(model)
    if wrapper is not None:
        raise RuntimeError(f"{caller}: the model is already wrapped by {wrapper}; {_ORDER}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 keeps the same module object)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


# ------------------------------------------------------------------------------------------ agreement
def describe_config(config) -> dict:
    """A comparable {field: repr} of a (dataclass) config."""
    if is_dataclass(config):
        return {f.name: repr(getattr(config, f.name)) for f in fields(config)}
    return {"config": repr(config)}


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(reference: dict, other: dict) -> list[str]:
    """'key: <reference's value> vs <other's value>' for each key whose value differs (or is missing)."""
    lines = []
    for key in sorted(set(reference) | set(other)):
        first, second = reference.get(key, "<missing>"), other.get(key, "<missing>")
        if first != second:
            lines.append(f"{key}: {_short(first)} vs {_short(second)}")
    return lines


_LOCAL = threading.local()


@contextmanager
def this_rank_only():
    """Inside it, ``lowcost.apply`` / ``add_adapter`` do not compare with the other ranks (not collective)."""
    previous = getattr(_LOCAL, "alone", False)
    _LOCAL.alone = True
    try:
        yield
    finally:
        _LOCAL.alone = previous


def _gather(payload) -> list:
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, payload)
    return out


def collectively(caller: str, action: Callable, describe: Callable, undo: Optional[Callable] = None):
    """Runs ``action()`` and checks that every rank did the same (see the module docstring).

    Returns ``action()``'s result. Raises this rank's own exception when it failed here, RuntimeError when
    another rank failed, ValueError naming the first differing rank and each difference otherwise."""
    if world()[1] == 1 or getattr(_LOCAL, "alone", False):
        return action()
    result, error = None, None
    try:
        result = action()
        payload = {"ok": describe(result)}
    except Exception as exc:  # reported to every rank, then re-raised here
        error, payload = exc, {"error": f"{type(exc).__name__}: {exc}"}
    everyone = _gather(payload)
    failed = [(rank, p["error"]) for rank, p in enumerate(everyone) if "error" in p]
    if error is not None:
        raise error
    problem = _first_problem(caller, everyone, failed)
    if problem is not None:
        if undo is not None:
            undo()
        raise problem
    return result


def _first_problem(caller: str, everyone: list, failed: list) -> Optional[Exception]:
    if failed:
        rank, message = failed[0]
        return RuntimeError(f"{caller} failed on rank {rank} ({message}); every rank must run the same call")
    reference = everyone[0]["ok"]
    for rank, payload in enumerate(everyone[1:], start=1):
        diff = differences(reference, payload["ok"])
        if diff:
            more = f"; and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else ""
            return ValueError(f"{caller}: rank {rank} differs from rank 0 (rank 0's value vs rank {rank}'s): "
                              + "; ".join(diff[:_SHOWN]) + more
                              + ". Every rank must apply the same LoRA config to the same model")
    return None


# ------------------------------------------------------------------------------------------ sharded tensors
def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each DTensor gathered to its full tensor (collective, in key order on every rank); others as they are."""
    out = {}
    for key in sorted(tensors):
        value = tensors[key].detach()
        out[key] = value.full_tensor() if is_dtensor(value) else value
    return out


def any_sharded(tensors) -> bool:
    return any(is_dtensor(t) for t in tensors)


@torch.no_grad()
def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)``; for a DTensor parameter only this rank's chunk is copied (no communication)."""
    if not is_dtensor(param):
        param.copy_(full.to(device=param.device, dtype=param.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full.to(device=param.device, dtype=param.dtype), param.device_mesh,
                              param.placements, src_data_rank=None)
    param.to_local().copy_(local.to_local())


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()
