"""Fold LoRA into the base weights and say what the rounding kept.

For each layer: ΔW = Σ_a s_a·B_a A_a (the adapters being merged) in float32, W' = round(W + ΔW) once,
realised delta R = W' − W (float32). ``retained`` = ⟨R, ΔW⟩ / ‖ΔW‖² (1.0 = all of the update survived
rounding; bf16 loses small deltas) and ``rel_error`` = ‖R − ΔW‖ / ‖ΔW‖. Logit drift compares the adapted
model with the merged one on a probe.

A layer over a quantized weight (NF4, int8, GGUF blocks) cannot take the sum back in its format: it becomes a
dense ``nn.Linear`` holding round(dequantized W + ΔW) in the compute dtype (W in the drift figures is the
dequantized weight).

``safe``: every merged weight is first formed in a copy and checked finite; a NaN/inf anywhere raises before
any base weight is written (PEFT's ``safe_merge`` checks layer by layer, after earlier layers are written).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from lowcost.patch.adapter_io import listing
from lowcost.patch.swap import lora_layers, remove_lora, set_module

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
    adapters: list[str] = field(default_factory=list)       # the adapters folded into the weights

    @property
    def min_retained(self) -> float:
        return min((layer.retained for layer in self.layers), default=1.0)

    def __str__(self) -> str:
        drift = ("no probe" if self.logit_max_abs is None else
                 f"logit drift max {self.logit_max_abs:.3e} (relative {self.logit_rel:.3e}) on {self.probe}")
        worst = min(self.layers, key=lambda layer: layer.retained, default=None)
        where = f", worst {worst.name} retained {worst.retained:.6f}" if worst else ""
        return f"merged adapters {self.adapters} into {len(self.layers)} layers: {drift}{where}"


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


def _drift(name: str, original: torch.Tensor, delta: torch.Tensor, merged: torch.Tensor) -> LayerDrift:
    realised = merged.float() - original
    norm2 = float((delta * delta).sum())
    if norm2 == 0.0:
        return LayerDrift(name, 0.0, 1.0, 0.0)
    retained = float((realised * delta).sum()) / norm2
    return LayerDrift(name, norm2 ** 0.5, retained, float((realised - delta).norm()) / norm2 ** 0.5)


@torch.no_grad()
def _merge_layer(name: str, layer: nn.Module, adapters: list[str]) -> LayerDrift:
    weight = layer.base_param()
    original = weight.float().clone()
    delta = sum(layer.delta_weight(a) for a in adapters)
    layer.merge(adapters)
    return _drift(name, original, delta, weight)


@torch.no_grad()
def _merge_quantized(name: str, layer: nn.Module, adapters: list[str]) -> tuple[LayerDrift, nn.Linear]:
    """The dense merged ``nn.Linear`` of a LoRA layer over a quantized weight, and its drift."""
    merged = layer.merged_weight(adapters)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(merged, requires_grad=False)
    linear.bias = layer.bias
    delta = sum(layer.delta_weight(a) for a in adapters)
    return _drift(name, layer.weight.dequantize(torch.float32), delta, merged), linear


def _check_mergeable(layers: dict[str, nn.Module], plan: dict[str, list[str]], safe: bool) -> None:
    """Raises before anything is written: layers that cannot fold an adapter, and (``safe``) weights that
    would not be finite."""
    blocked = [f"{name!r} ({layer.merge_blocker()})" for name, layer in layers.items()
               if name in plan and hasattr(layer, "merge_blocker") and layer.merge_blocker()]
    if blocked:
        raise TypeError(f"lowcost.merge: cannot fold the adapter of {listing(blocked)}; nothing was merged")
    if safe:
        bad = [name for name, names in plan.items() if not torch.isfinite(layers[name].merged_weight(names)).all()]
        if bad:
            raise ValueError(f"lowcost.merge: merging gives weights that are not finite (NaN/inf in the "
                             f"adapter) in {listing(bad)}; nothing was merged")


def _warn_tied(model: nn.Module, plan: dict[str, list[str]], layers: dict[str, nn.Module]) -> None:
    weights = {id(layers[name].base_param()): name for name in plan}
    for other, module in model.named_modules():
        weight = getattr(module, "weight", None)
        owner = weights.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if owner is not None and other != owner and not other.startswith(owner + "."):
            warnings.warn(f"lowcost.merge: {owner!r} shares its weight with {other!r} (tied "
                          "weights), so the merged update reaches both, as it does in PEFT", stacklevel=3)


def merge_model(model: nn.Module, adapters: Sequence[str], probe=None, safe: bool = True) -> DriftReport:
    """Merge ``adapters`` (which must be the active ones, so that the probe sees them) in place and put plain
    modules back; returns the drift report."""
    layers = lora_layers(model)
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    chosen = list(adapters)
    plan = {name: [a for a in chosen if a in layer.adapter_names] for name, layer in layers.items()}
    plan = {name: names for name, names in plan.items() if names}
    _check_mergeable(layers, plan, safe)
    _warn_tied(model, plan, layers)
    probe = default_probe(model) if probe is None else probe
    before = probe_output(model, probe)
    report = DriftReport(probe="none" if probe is None else _describe(probe), adapters=chosen)
    dense = {}
    for name, names in plan.items():
        if getattr(layers[name], "quantized", False):
            drift, dense[name] = _merge_quantized(name, layers[name], names)
            report.layers.append(drift)
        else:
            report.layers.append(_merge_layer(name, layers[name], names))
    remove_lora(model, keep_merged=True)
    for name, linear in dense.items():
        set_module(model, name, linear)
    after = probe_output(model, probe)
    if before is not None:
        diff = float((after - before).abs().max())
        report.logit_max_abs, report.logit_rel = diff, diff / max(float(before.abs().max()), 1e-30)
    return report


def _describe(probe) -> str:
    if isinstance(probe, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in probe.items() if isinstance(v, torch.Tensor))
    return f"input {tuple(probe.shape)}"
