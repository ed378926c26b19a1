"""Installing per-block decisions: each block's ``forward`` is wrapped in place (an instance attribute).

Modules are never re-parented, so ``state_dict()`` keys, parameter identity, hooks and ``named_modules``
stay exactly as they were; ``uninstall`` deletes the instance attribute (or restores a previous one).
A selective decision with ``recompute`` also puts forward (pre-)hooks on the matching submodules
(``selective.RecomputeRegions``); ``uninstall`` removes them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowcost._families import find_blocks
from lowcost.checkpoint import compiled, tracking
from lowcost.checkpoint.function import checkpoint_with
from lowcost.checkpoint.offload import Offloader
from lowcost.checkpoint.policies import Decision
from lowcost.checkpoint.selective import RecomputeRegions, linear_paths, match_modules, save_matmuls

_ATTR = "_lowcost_checkpoint"
_MISSING = object()


@dataclass
class _Segment:
    """Consecutive blocks checkpointed as one frame; ``frame`` is open between its first and last block."""
    size: int
    frame: Optional[object] = None
    next_position: int = 0


@dataclass
class _Installed:
    decision: Decision
    previous_forward: object
    label: str
    segment: Optional[_Segment] = None
    position: int = 0
    extra: dict = field(default_factory=dict)


def resolve_blocks(target) -> list[tuple[str, nn.Module]]:
    """(label, block) pairs from an ``nn.ModuleList``, a list of modules, or a model.

    For a model the block list comes from ``lowcost._families.find_blocks`` (Llama ``model.layers``,
    GPT-2 ``transformer.h``, BERT ``encoder.layer``, else the largest list of same-type modules).
    """
    if isinstance(target, (nn.ModuleList, list, tuple)):
        blocks = list(target)
        if not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("every block must be an nn.Module")
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    if not isinstance(target, nn.Module):
        raise TypeError(f"expected a model, an nn.ModuleList or a list of modules, got {type(target).__name__}")
    blocks = find_blocks(target)
    if not blocks:
        raise ValueError(f"found no block list (nn.ModuleList of layers) in {type(target).__name__}; "
                         f"pass the blocks explicitly")
    names = {id(m): name for name, m in target.named_modules()}
    return [(names.get(id(b), f"blocks.{i}"), b) for i, b in enumerate(blocks)]


def _segments(decisions: list[Decision]) -> list[Optional[tuple[_Segment, int]]]:
    """For each block: (its segment, its position in it) when it belongs to a multi-block segment."""
    out: list = [None] * len(decisions)
    i = 0
    while i < len(decisions):
        seg_id = decisions[i].segment
        j = i
        while j + 1 < len(decisions) and seg_id is not None and decisions[j + 1].segment == seg_id:
            j += 1
        if j > i:
            segment = _Segment(size=j - i + 1)
            for pos in range(i, j + 1):
                out[pos] = (segment, pos - i)
        i = j + 1
    return out


def _make_forward(original, state: _Installed, offloader: Optional[Offloader]):
    """The wrapped forward: sets the block label, then runs the block under its decision; while compiling, the
    decision is lowered to torch's checkpoint operator where it can be (``compiled.py``)."""
    mode = state.decision.mode
    selective = save_matmuls if mode == "selective" else None
    offl = offloader if mode == "offload" else None

    def eager(*args, **kwargs):
        with tracking.block_scope(state.label):
            if mode == "none":
                return original(*args, **kwargs)
            segment = state.segment
            frame = None
            if segment is not None and state.position > 0 and segment.next_position == state.position:
                frame = segment.frame
            out, frame = checkpoint_with(original, args, kwargs, frame=frame, selective=selective,
                                         offloader=offl, label=state.label)
            if segment is not None:
                last = state.position == segment.size - 1
                segment.frame = None if last or frame is None else frame
                segment.next_position = 0 if last or frame is None else state.position + 1
            return out

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():
            if mode == "none":
                return original(*args, **kwargs)
            if compiled.lowerable(state.decision, state.segment):
                return compiled.block_forward(original, args, kwargs, state.decision)
            return compiled.run_eagerly(eager, args, kwargs)
        return eager(*args, **kwargs)

    return forward


def recompute_modules(blocks: list[tuple[str, nn.Module]], decisions: list[Decision]) -> list[list[nn.Module]]:
    """Per block, the submodules its decision's ``recompute`` paths match (see ``CheckpointConfig``).

    Raises ValueError for a path that matches no submodule of any block whose decision names it, listing
    the block's submodules that contain a linear layer. Changes nothing.
    """
    if len(blocks) != len(decisions):
        raise ValueError(f"{len(decisions)} decisions for {len(blocks)} blocks")
    out: list[list[nn.Module]] = []
    matched: dict[str, bool] = {}
    first_block: dict[str, tuple[str, nn.Module]] = {}
    for (label, block), decision in zip(blocks, decisions):
        modules: list[nn.Module] = []
        for path in decision.recompute:
            found = match_modules(block, path)
            matched[path] = matched.get(path, False) or bool(found)
            first_block.setdefault(path, (label, block))
            modules += [m for _, m in found]
        out.append(modules)
    for path, ok in matched.items():
        if not ok:
            label, block = first_block[path]
            raise ValueError(f"checkpoint recompute={path!r} matches no submodule of any checkpointed block; "
                             f"the submodules of {label} ({type(block).__name__}) that contain a linear layer "
                             f"are: {', '.join(linear_paths(block)) or 'none'}")
    return out


def install(blocks: list[tuple[str, nn.Module]], decisions: list[Decision], offloader: Optional[Offloader] = None,
            wrap_none: bool = False) -> None:
    """Wraps each block's forward under its decision (``none`` blocks only when ``wrap_none``).

    ``recompute`` paths are checked for every block before any block is changed."""
    regions = recompute_modules(blocks, decisions)
    for (label, block), decision, seg, modules in zip(blocks, decisions, _segments(decisions), regions):
        if _ATTR in block.__dict__:
            raise RuntimeError(f"checkpointing is already installed on {label}; call remove_checkpointing first")
        if decision.mode == "none" and not wrap_none:
            continue
        state = _Installed(decision, block.__dict__.get("forward", _MISSING), label)
        if seg is not None:
            state.segment, state.position = seg
        original = block.forward
        block.__dict__[_ATTR] = state
        block.forward = _make_forward(original, state, offloader)
        if modules:
            state.extra["recompute"] = RecomputeRegions(modules)


def uninstall(blocks: list[tuple[str, nn.Module]]) -> int:
    """Restores every block's forward; returns how many were wrapped."""
    count = 0
    for _, block in blocks:
        state = block.__dict__.pop(_ATTR, None)
        if state is None:
            continue
        count += 1
        regions = state.extra.pop("recompute", None)
        if regions is not None:
            regions.remove()
        if state.previous_forward is _MISSING:
            del block.forward
        else:
            block.forward = state.previous_forward
    return count


def installed_decisions(blocks: list[tuple[str, nn.Module]]) -> list[Decision]:
    return [block.__dict__[_ATTR].decision if _ATTR in block.__dict__ else Decision("none") for _, block in blocks]
