"""The GPU price table (``data/gpus.json``, or a user's file of the same shape) and the choice from it.

A setup fits a GPU when its predicted peak is at most ``(1 − headroom)`` of the GPU's memory: the
headroom (default 10 %) stands for what the plan does not trace — the CUDA context, the caching
allocator's fragmentation, library workspaces. Time per step is an estimate: the step's FLOPs over the
table's bf16 peak times ``utilization`` (default 0.4, a typical fraction of peak for fine-tuning steps).
``sms`` (optional, streaming multiprocessors) sizes the Triton fused loss's chunk (``Estimate.peak_on``); an
entry without it is planned with ``FALLBACK_SMS``, more than any GPU of the shipped table, so its fit errs safe.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

DEFAULT_TABLE = Path(__file__).resolve().parent / "data" / "gpus.json"
_FIELDS = {"name": str, "memory_gib": (int, float), "bf16_tflops": (int, float), "usd_per_hour": (int, float)}
FALLBACK_SMS = 160


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float
    usd_per_hour: float
    sms: int = FALLBACK_SMS

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


def load_table(path=None) -> list[GPU]:
    """GPUs from ``path`` (default: the shipped table); a clear ValueError names a bad entry."""
    path = Path(path) if path is not None else DEFAULT_TABLE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileNotFoundError(f"GPU table {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"GPU table {path} is not valid JSON: {exc}") from None
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"GPU table {path} needs a non-empty list under \"gpus\"")
    table = []
    for i, entry in enumerate(entries):
        for key, kind in _FIELDS.items():
            value = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool) or (kind != str and value <= 0):
                raise ValueError(f"GPU table {path}: entry {i} needs {key!r} "
                                 f"({'a name' if kind is str else 'a positive number'}), got {value!r}")
        table.append(GPU(entry["name"], float(entry["memory_gib"]), float(entry["bf16_tflops"]),
                         float(entry["usd_per_hour"]), _sms(path, i, entry)))
    return table


def _sms(path, index: int, entry: dict) -> int:
    sms = entry.get("sms", FALLBACK_SMS)
    if not isinstance(sms, int) or isinstance(sms, bool) or sms < 1:
        raise ValueError(f"GPU table {path}: entry {index} has 'sms' {sms!r}; expected a whole number >= 1 "
                         f"(streaming multiprocessors) or no 'sms' key")
    return sms


def find(table: list[GPU], name: str) -> GPU:
    """The table entry ``name`` names (case and spaces ignored): the full name, else its first word ("l4"),
    else a unique prefix ("a100 80")."""
    squash = lambda text: text.lower().replace(" ", "")  # noqa: E731
    wanted = squash(name)
    hits = [g for g in table if squash(g.name) == wanted] or \
        [g for g in table if squash(g.name.split()[0]) == wanted] or \
        [g for g in table if squash(g.name).startswith(wanted)]
    if len(hits) != 1:
        names = ", ".join(g.name for g in table)
        raise ValueError(f"--gpu {name!r} matches {'no' if not hits else 'several'} GPU(s) in the table ({names})")
    return hits[0]


def fits(gpu: GPU, peak: int, headroom: float) -> bool:
    return peak <= (1.0 - headroom) * gpu.memory_bytes


def cheapest_fit(table: list[GPU], peak: Union[int, Callable[[GPU], int]], headroom: float) -> Optional[GPU]:
    """The lowest-priced GPU whose memory holds ``peak`` (bytes, or a function of the GPU giving them) with the
    headroom (None: none does)."""
    peak_on = peak if callable(peak) else (lambda gpu: peak)
    fitting = [g for g in table if fits(g, peak_on(g), headroom)]
    return min(fitting, key=lambda g: (g.usd_per_hour, g.memory_gib)) if fitting else None


def step_seconds(gpu: GPU, flops: int, utilization: float) -> float:
    """Estimated seconds per step: FLOPs / (bf16 peak × utilization)."""
    return flops / (gpu.bf16_tflops * 1e12 * utilization)
