"""What a patch call did: every adapted module and the path it took, what was skipped and why.

``str(report)`` opens with a short summary (modules per path, skipped count, trainable parameters, the
adapter's name and the checkpointing installed with it) and lists the modules after it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

PATHS = ("fused", "fused-conv1d", "fallback", "embedding")


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted layer.

    path: ``"fused"`` (``lowcost.ops.lora_linear``), ``"fused-conv1d"`` (the same op on a transformers
    ``Conv1D``, weight passed as a ``.t()`` view, no copy), ``"embedding"`` (``lowcost.ops.lora_embedding`` on
    an ``nn.Embedding``) or ``"fallback"`` (base module's own forward plus a plain-torch adapter; ``reason``
    says why).
    """
    name: str
    kind: str                   # class name of the original module
    path: str
    in_features: int
    out_features: int
    r: int
    alpha: float
    scaling: float
    reason: str = ""


@dataclass(frozen=True)
class SkippedModule:
    name: str
    reason: str


@dataclass
class PatchReport:
    """Returned by ``lowcost.apply`` / ``lowcost.add_adapter`` / ``lowcost.accelerate_peft``."""
    family: str
    adapted: list[AdaptedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    excluded_head: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    checkpoint: Optional[object] = None          # CheckpointReport when apply(checkpoint=...) ran too
    adapter: str = "default"
    unmatched: list[str] = field(default_factory=list)   # target list entries that name no module
    fusion: Optional[object] = None              # FusionReport when apply(fused=...) ran fusion passes

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.adapted]

    def paths(self) -> dict[str, int]:
        """How many modules took each path."""
        return dict(Counter(m.path for m in self.adapted))

    def summary(self) -> list[str]:
        """The opening lines of ``str(report)``: counts, parameters, checkpointing."""
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        paths = ", ".join(f"{count} {path}" for path, count in self.paths().items())
        extras = [f"{len(self.skipped)} skipped"] if self.skipped else []
        extras += [f"{len(self.modules_to_save)} trained in full"] if self.modules_to_save else []
        lines = [f"lowcost patch ({self.family}), adapter {self.adapter!r}: {len(self.adapted)} adapted ({paths})"
                 + "".join(f", {e}" for e in extras),
                 f"  trainable {self.trainable_params:,} / {self.total_params:,} parameters ({share:.3f}%)"]
        if self.checkpoint is not None:
            head = str(self.checkpoint).splitlines()[0].replace("lowcost checkpointing: ", "")
            modes = Counter(getattr(self.checkpoint, "modes", lambda: [])())
            lines.append(f"  checkpointing: {head}" + (f" ({', '.join(f'{n} {m}' for m, n in modes.items())})"
                                                       if modes else ""))
        return lines

    def __str__(self) -> str:
        lines = self.summary() + ["modules:"]
        for m in self.adapted:
            why = f"  ({m.reason})" if m.reason else ""
            lines.append(f"  {m.path:<13} {m.name}  {m.kind} {m.in_features}->{m.out_features} "
                         f"r={m.r} alpha={m.alpha:g}{why}")
        lines += [f"  skipped       {s.name}  ({s.reason})" for s in self.skipped]
        lines += [f"  trainable     {name}  (modules_to_save)" for name in self.modules_to_save]
        if self.excluded_head:
            lines.append(f"  head left out {self.excluded_head}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.checkpoint is not None:
            lines.append(str(self.checkpoint))
        if self.fusion is not None:
            lines += self.fusion.lines()
        return "\n".join(lines)
