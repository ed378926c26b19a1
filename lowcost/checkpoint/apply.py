"""``apply_checkpointing`` / ``remove_checkpointing``: install a policy on a model's blocks, with a report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from lowcost.checkpoint.config import CheckpointConfig, format_bytes
from lowcost.checkpoint.install import install, installed_decisions, recompute_modules, resolve_blocks, uninstall
from lowcost.checkpoint.offload import Offloader
from lowcost.checkpoint.planner import plan
from lowcost.checkpoint.policies import Decision, decide


@dataclass
class CheckpointReport:
    """What was installed: one decision per block, and for a budget the prediction and the profile."""
    policy: str
    blocks: list[str]
    decisions: list[Decision]
    budget_bytes: Optional[int] = None
    predicted_bytes: Optional[int] = None
    floor_bytes: Optional[int] = None
    no_checkpoint_bytes: Optional[int] = None
    profile: Optional[object] = None
    offloader: Optional[Offloader] = None
    notes: list[str] = field(default_factory=list)
    recompute: tuple[str, ...] = ()

    def modes(self) -> list[str]:
        return [d.mode for d in self.decisions]

    def __str__(self) -> str:
        recompute = f", recompute={','.join(self.recompute)}" if self.recompute else ""
        lines = [f"lowcost checkpointing: policy={self.policy}{recompute}, {len(self.blocks)} blocks"]
        for i, (name, decision) in enumerate(zip(self.blocks, self.decisions)):
            extra = ""
            if self.profile is not None:
                b, s = self.profile.bytes[i], self.profile.seconds[i]
                extra = "  " + ", ".join(f"{m}: {b[m] / 2**20:.2f} MiB/{s[m] * 1e3:.1f} ms" for m in b)
            lines.append(f"  {name}: {decision}{extra}")
        for key in ("budget_bytes", "predicted_bytes", "floor_bytes", "no_checkpoint_bytes"):
            if getattr(self, key) is not None:
                lines.append(f"  {key.replace('_bytes', '').replace('_', ' ')}: {format_bytes(getattr(self, key))}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parameters(target, blocks) -> list:
    if isinstance(target, nn.Module) and not isinstance(target, nn.ModuleList):
        return list(target.parameters())
    return [p for _, b in blocks for p in b.parameters()]


def apply_checkpointing(target, config: Optional[CheckpointConfig] = None, *,
                        profile_step: Optional[Callable] = None) -> CheckpointReport:
    """Installs checkpointing on every block of ``target`` under ``config``; returns a report.

    Args:
        target: a model (blocks found by the model-family table), an ``nn.ModuleList`` or a list of modules.
        config: ``CheckpointConfig`` (default: policy="full").
        profile_step: for a budget, a zero-argument callable running one forward and returning the loss;
            lowcost runs backward with ``autograd.grad`` (no ``.grad`` is written).
    Returns:
        ``CheckpointReport``: the block names, a ``Decision`` per block and, for a budget, the predicted
        bytes, the floor and the profile table.
    """
    config = config or CheckpointConfig()
    blocks = resolve_blocks(target)
    decisions = None
    if config.policy != "budget":
        decisions = decide(config.policy, len(blocks), config)
        recompute_modules(blocks, decisions)  # a recompute path matching nothing raises before the model changes
    uninstall(blocks)
    report = CheckpointReport(config.policy, [label for label, _ in blocks], [], recompute=config.recompute)
    hf_config = getattr(target, "config", None)
    if config.disable_use_cache and getattr(hf_config, "use_cache", False):
        hf_config.use_cache = False
        report.notes.append("set model.config.use_cache = False (a KV cache would be written twice)")
    if config.policy == "budget":
        decisions, summary = plan(blocks, config, profile_step, _parameters(target, blocks))
        for key, value in summary.items():
            if hasattr(report, key):
                setattr(report, key, value)
    offloader = None
    if any(d.mode == "offload" for d in decisions):
        offloader = Offloader(config.offload_pin, config.offload_prefetch, config.offload_min_bytes)
    install(blocks, decisions, offloader)
    report.decisions, report.offloader = decisions, offloader
    return report


def remove_checkpointing(target) -> int:
    """Restores every block's original forward; returns how many blocks were checkpointed."""
    return uninstall(resolve_blocks(target))


def checkpointing_of(target) -> list[Decision]:
    """The decisions currently installed on ``target``'s blocks."""
    return installed_decisions(resolve_blocks(target))
