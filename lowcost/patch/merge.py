"""Fold LoRA into the base weights and say what the rounding kept.

For each layer: ΔW = s·B A in float32, W' = round(W + ΔW) once, realised delta R = W' − W (float32).
``retained`` = ⟨R, ΔW⟩ / ‖ΔW‖² (1.0 = all of the update survived rounding; bf16 loses small deltas) and
``rel_error`` = ‖R − ΔW‖ / ‖ΔW‖. Logit drift compares the adapted model with the merged one on a probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowcost.patch.swap import lora_layers, remove_lora


@dataclass(frozen=True)
class LayerDrift:
    name: str
    delta_norm: float
    retained: float
    rel_error: float


@dataclass
class DriftReport:
    """Per-layer delta retention and logit drift (max |merged − adapted| and that over max |adapted|)."""
    layers: list[LayerDrift] = field(default_factory=list)
    logit_max_abs: Optional[float] = None
    logit_rel: Optional[float] = None
    probe: str = "none"

    @property
    def min_retained(self) -> float:
        return min((layer.retained for layer in self.layers), default=1.0)

    def __str__(self) -> str:
        drift = ("no probe" if self.logit_max_abs is None else
                 f"logit drift max {self.logit_max_abs:.3e} (relative {self.logit_rel:.3e}) on {self.probe}")
        worst = min(self.layers, key=lambda layer: layer.retained, default=None)
        where = f", worst {worst.name} retained {worst.retained:.6f}" if worst else ""
        return f"merged {len(self.layers)} layers: {drift}{where}"


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight


def default_probe(model: nn.Module) -> Optional[dict]:
    """input_ids (2, 16) from a fixed generator for HF models with a vocabulary, else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return None
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device)}


@torch.no_grad()
def probe_output(model: nn.Module, probe) -> Optional[torch.Tensor]:
    """The model's first output (logits) on ``probe`` (a tensor or a kwargs dict), in eval mode, float32."""
    if probe is None:
        return None
    was_training = model.training
    model.eval()
    try:
        out = model(**probe) if isinstance(probe, dict) else model(probe)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        out = out.logits if getattr(out, "logits", None) is not None else out[0]
    return out.float()


@torch.no_grad()
def _merge_layer(name: str, layer: nn.Module) -> LayerDrift:
    if layer.merged:
        layer.unmerge()
    weight = _weight(layer)
    original = weight.float().clone()
    delta = layer.delta_weight()
    layer.merge()
    realised = weight.float() - original
    norm2 = float((delta * delta).sum())
    if norm2 == 0.0:
        return LayerDrift(name, 0.0, 1.0, 0.0)
    retained = float((realised * delta).sum()) / norm2
    return LayerDrift(name, norm2 ** 0.5, retained, float((realised - delta).norm()) / norm2 ** 0.5)


def merge_model(model: nn.Module, probe=None) -> DriftReport:
    """Merge every adapter in place and put plain modules back; returns the drift report."""
    blocked = [f"{name!r} ({layer.merge_blocker()})" for name, layer in lora_layers(model).items()
               if hasattr(layer, "merge_blocker") and layer.merge_blocker()]
    if blocked:
        raise TypeError(f"lowcost.merge: cannot fold the adapter of {', '.join(blocked)}; nothing was merged")
    probe = default_probe(model) if probe is None else probe
    before = probe_output(model, probe)
    report = DriftReport(probe="none" if probe is None else _describe(probe))
    for name, layer in lora_layers(model).items():
        report.layers.append(_merge_layer(name, layer))
    remove_lora(model, keep_merged=True)
    after = probe_output(model, probe)
    if before is not None:
        diff = float((after - before).abs().max())
        report.logit_max_abs, report.logit_rel = diff, diff / max(float(before.abs().max()), 1e-30)
    return report


def _describe(probe) -> str:
    if isinstance(probe, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in probe.items() if isinstance(v, torch.Tensor))
    return f"input {tuple(probe.shape)}"
