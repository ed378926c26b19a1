"""Reports returned by the warm-start functions: what was loaded, mapped, initialised, skipped.

A report prints as a short table (``print(report)``), compares by its counts (``report.counts``) and
names the new trainable pieces (``report.new``) that ``FreezeThenUnfreeze`` trains first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class NewSlice:
    """A trainable piece created by a warm start: ``param`` (a parameter name) from ``start`` on along ``dim``;
    ``start`` 0 and ``dim`` None mean the whole parameter."""
    param: str
    dim: Optional[int] = None
    start: int = 0


@dataclass
class WarmstartReport:
    """Counts per source (``counts[source][category]``), one entry per tensor or word (``entries``), notes.

    Categories used: embeddings — ``matched``, ``case_folded``, ``sub_token``, ``projected``, ``random``;
    new tokens — ``added``, ``existing``, ``sub_token``, ``jittered``; transplant — ``copied``, ``sliced``,
    ``initialised``, ``unused``.
    """
    kind: str
    counts: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    new: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def count(self, source: str, category: str, n: int = 1) -> None:
        bucket = self.counts.setdefault(source, {})
        bucket[category] = bucket.get(category, 0) + n

    def total(self, category: str) -> int:
        return sum(bucket.get(category, 0) for bucket in self.counts.values())

    def __str__(self) -> str:
        lines = [f"warm start: {self.kind}"]
        for source, bucket in self.counts.items():
            shown = ", ".join(f"{k} {v}" for k, v in bucket.items())
            lines.append(f"  {source}: {shown}")
        for key, value in self.extra.items():
            lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def table(self, limit: int = 50) -> str:
        """Per-entry lines (tensor or word), at most ``limit``."""
        rows = [" ".join(str(v) for v in entry.values()) for entry in self.entries[:limit]]
        if len(self.entries) > limit:
            rows.append(f"… {len(self.entries) - limit} more")
        return "\n".join(rows)
