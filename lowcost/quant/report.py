"""What ``lowcost.quantize`` / ``load_pretrained(quantize=...)`` did: each quantized module and its bytes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QuantizedModule:
    name: str
    scheme: str
    shape: tuple
    bytes: int              # resident bytes of the stored tensors
    dense_bytes: int        # the same weight dense in its compute dtype
    padded: bool = False    # NF4 rows padded to a whole number of blocks


@dataclass
class QuantReport:
    """``bytes``: the quantized weights' resident bytes; ``dense_bytes``: the same weights dense in their
    compute dtype; ``bf16_bytes``: dense in bfloat16 (the usual baseline of the ratios)."""
    scheme: str
    modules: list[QuantizedModule] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(m.bytes for m in self.modules)

    @property
    def dense_bytes(self) -> int:
        return sum(m.dense_bytes for m in self.modules)

    @property
    def bf16_bytes(self) -> int:
        return sum(2 * m.shape[0] * m.shape[1] for m in self.modules)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    def __str__(self) -> str:
        ratio = self.bytes / self.bf16_bytes if self.bf16_bytes else 0.0
        lines = [f"lowcost.quantize: {len(self.modules)} modules to {self.scheme}, {self.bytes / 2**20:.2f} MiB "
                 f"({ratio:.3f}x of bf16, {self.dense_bytes / 2**20:.2f} MiB dense before)"]
        padded = [m.name for m in self.modules if m.padded]
        if padded:
            lines.append(f"  padded to whole blocks: {', '.join(padded[:5])}" + (" ..." if len(padded) > 5 else ""))
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
