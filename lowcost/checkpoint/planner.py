"""The ``budget`` planner: profile each block under each mode once, then pick modes by knapsack.

Profiling. For each candidate mode m the blocks are installed with m (every block labelled), one step
``loss = profile_step()`` runs forward under ``tracking.track(hook=True)`` and ``autograd.grad`` runs
backward (no ``.grad`` is touched). That gives, per block i, bytes[i][m] = the distinct storages block i
leaves for backward (autograd's saved tensors outside frames + what its frame keeps), seconds[i][m] = the
time block i spent recomputing in backward (0 for "none"), and ``fixed`` = bytes outside all blocks.

Solving. minimise Σ_i seconds[i][m_i] subject to fixed + Σ_i bytes[i][m_i] ≤ budget: a 0/1 multiple-choice
knapsack, solved by dynamic programming over the byte capacity in ``resolution`` units. Item sizes are
rounded *up* to whole units, so the chosen plan's exact predicted bytes never exceed the budget. The floor
is fixed + Σ_i min_m bytes[i][m]; a budget below it is an error that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowcost.checkpoint import tracking
from lowcost.checkpoint.config import format_bytes, parse_budget
from lowcost.checkpoint.install import install, uninstall
from lowcost.checkpoint.offload import Offloader
from lowcost.checkpoint.policies import Decision


class BudgetError(ValueError):
    """The byte budget is below what any choice of modes can reach."""


@dataclass
class Profile:
    """Measured per-block bytes and recompute seconds for each mode, plus the bytes outside blocks."""
    modes: tuple[str, ...]
    bytes: list[dict]      # per block: mode -> bytes
    seconds: list[dict]    # per block: mode -> recompute seconds
    fixed: int

    def total(self, choice: list[str]) -> int:
        return self.fixed + sum(b[m] for b, m in zip(self.bytes, choice))

    @property
    def floor(self) -> int:
        return self.fixed + sum(min(b.values()) for b in self.bytes)


def _graph_leaves(loss: torch.Tensor) -> list:
    """The leaf tensors requiring grad that ``loss`` was computed from (AccumulateGrad nodes of its graph)."""
    leaves, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


def _step_once(profile_step: Callable, parameters: list, device_type: str):
    """One profiling step: forward under ``track``, then ``autograd.grad`` w.r.t. the trainable parameters (or,
    with none, the graph's own leaves, e.g. a trainable prompt), so no ``.grad`` is written."""
    trainable = [p for p in parameters if p.requires_grad]
    with tracking.track(parameters, hook=True) as tracker:
        loss = profile_step()
        if not isinstance(loss, torch.Tensor):
            raise TypeError("profile_step must return the loss tensor (forward only; lowcost runs backward)")
        if not loss.requires_grad:
            raise ValueError("checkpoint budget: the loss from profile_step does not require grad (nothing in the "
                             "model requires grad), so no backward would run to profile; make the trained "
                             "parameters (e.g. LoRA) require grad before planning a budget")
        torch.autograd.grad(loss.sum(), trainable or _graph_leaves(loss), allow_unused=True)
    return tracker.per_label(device_type), tracker.recompute_s


def profile(blocks, profile_step: Callable, parameters: list, modes: tuple[str, ...],
            offloader_args: dict) -> Profile:
    """Runs one profiling step per mode (after one warm-up step) and returns the measured table."""
    device_type = parameters[0].device.type if parameters else "cpu"
    labels = [label for label, _ in blocks]
    per_mode = {}
    for mode in ("none",) + tuple(modes):  # the first "none" run is the warm-up
        offloader = Offloader(**offloader_args) if mode == "offload" else None
        install(blocks, [Decision(mode)] * len(blocks), offloader, wrap_none=True)
        try:
            per_mode[mode] = _step_once(profile_step, parameters, device_type)
        finally:
            uninstall(blocks)
    table_bytes = [{m: per_mode[m][0].get(label, 0) for m in modes} for label in labels]
    table_secs = [{m: (per_mode[m][1].get(label, 0.0) if m != "none" else 0.0) for m in modes} for label in labels]
    fixed = max(per_mode[m][0].get(None, 0) for m in modes)
    return Profile(tuple(modes), table_bytes, table_secs, fixed)


def solve(prof: Profile, budget: int, resolution: int = 2048) -> list[str]:
    """The per-block modes of least total recompute seconds whose predicted bytes fit ``budget``."""
    floor = prof.floor
    if budget < floor:
        raise BudgetError(f"checkpoint budget {format_bytes(budget)} is below the floor {format_bytes(floor)} "
                          f"(bytes outside blocks {format_bytes(prof.fixed)} + the cheapest mode of every block)")
    capacity = budget - prof.fixed
    unit = max(1, math.ceil(capacity / resolution))
    slots = capacity // unit
    inf = float("inf")
    best = [0.0] * (slots + 1)  # best[c]: least seconds of the blocks so far using ≤ c units
    choices: list[list] = []
    for b, s in zip(prof.bytes, prof.seconds):
        units = {m: math.ceil(b[m] / unit) for m in prof.modes}
        new, pick = [inf] * (slots + 1), [None] * (slots + 1)
        for c in range(slots + 1):
            for m in prof.modes:
                if units[m] <= c and best[c - units[m]] + s[m] < new[c]:
                    new[c], pick[c] = best[c - units[m]] + s[m], m
        best = new
        choices.append(pick)
    if best[slots] == inf:  # rounding up made it infeasible: the byte-minimal plan fits exactly
        return [min(b, key=b.get) for b in prof.bytes]
    plan, c = [], slots
    for b, pick in zip(reversed(prof.bytes), reversed(choices)):
        mode = pick[c]
        plan.append(mode)
        c -= math.ceil(b[mode] / unit)
    return plan[::-1]


def plan(blocks, config, profile_step: Optional[Callable], parameters: list) -> tuple[list[Decision], dict]:
    """Profiles, parses the budget, solves; returns the decisions and a summary for the report."""
    if profile_step is None:
        raise ValueError("a budget needs profile_step=: a zero-argument callable running one forward and "
                         "returning the loss")
    modes = tuple(config.candidates)
    on_gpu = bool(parameters) and parameters[0].device.type == "cuda"
    if config.offload_in_budget and on_gpu and "offload" not in modes:
        modes += ("offload",)
    if "none" not in modes:
        modes = ("none",) + modes
    offloader_args = {"pin": config.offload_pin, "prefetch": config.offload_prefetch,
                      "min_bytes": config.offload_min_bytes}
    prof = profile(blocks, profile_step, parameters, modes, offloader_args)
    no_checkpoint = prof.total(["none"] * len(blocks))
    budget = parse_budget(config.budget, no_checkpoint)
    choice = solve(prof, budget)
    summary = {"budget_bytes": budget, "predicted_bytes": prof.total(choice), "floor_bytes": prof.floor,
               "no_checkpoint_bytes": no_checkpoint, "predicted_recompute_s": sum(
                   s[m] for s, m in zip(prof.seconds, choice)), "profile": prof}
    return [Decision(m) for m in choice], summary
