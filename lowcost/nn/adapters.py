"""Named LoRA adapters on one layer, with PEFT's semantics.

A lowcost LoRA layer holds one or more named adapters, each a pair A: (r, in), B: (out, r) with its own r,
alpha, dropout and scaling s = alpha / r (alpha / √r with rsLoRA). Its output is

    y = base(x) + Σ_{a in running} s_a · B_a A_a (D_a ⊙ x)

where ``running`` is ``active`` (a tuple of names; names this layer does not hold are skipped, as in PEFT)
unless the layer is ``disabled`` or has adapters merged into its base weight (then y = base(x)).

The first adapter's factors are the layer's own ``lora_A`` / ``lora_B`` parameters, so a one-adapter model keeps
the state_dict keys it always had (``<module>.lora_A``); every further adapter is a ``LoRAAdapter`` in
``layer.extra_adapters[name]`` (``<module>.extra_adapters.<name>.lora_A``), a container created only when a
second adapter arrives. Deleting the first adapter promotes the next one into the layer's own parameters.

A layer class mixes ``AdapterSlots`` into ``nn.Module`` and provides ``_init_factors(A, B)`` (its init rule),
``base_param()`` (the weight a merge writes into) and ``_delta_layout(delta)`` (s·B A (out, in) → that
weight's layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter on one layer."""
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class Factors:
    """One adapter's live tensors: A (r, in), B (out, r), its scaling s and dropout probability."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: float


class LoRAAdapter(nn.Module):
    """A further named adapter: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r) and its spec."""

    def __init__(self, spec: AdapterSpec, in_features: int, out_features: int, factory: dict):
        super().__init__()
        self.spec = spec
        self.lora_A = nn.Parameter(torch.empty(spec.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, spec.r, **factory))

    def extra_repr(self) -> str:
        return f"r={self.spec.r}, alpha={self.spec.alpha}, dropout={self.spec.dropout}, rslora={self.spec.use_rslora}"


class AdapterSlots:
    """Mixin for LoRA layers (see the module docstring). The first adapter lives in the layer's own attributes
    ``adapter_name``, ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``scaling``, ``lora_A``, ``lora_B``."""

    def _init_slots(self, name: str, spec: AdapterSpec, factory: dict) -> None:
        self.adapter_name = name
        self._set_primary_spec(spec)
        self.lora_A = nn.Parameter(torch.empty(spec.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, spec.r, **factory))
        self.active: tuple[str, ...] = (name,)
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._init_factors(self.lora_A, self.lora_B)

    def _set_primary_spec(self, spec: AdapterSpec) -> None:
        self.r, self.alpha, self.dropout, self.use_rslora = spec.r, float(spec.alpha), float(spec.dropout), \
            spec.use_rslora
        self.scaling = spec.scaling

    # ----------------------------------------------------------------------------------------------- names
    @property
    def adapter_names(self) -> list[str]:
        extra = self._modules.get("extra_adapters")
        return [self.adapter_name] + (list(extra) if extra is not None else [])

    def spec(self, name: str) -> AdapterSpec:
        if name == self.adapter_name:
            return AdapterSpec(self.r, self.alpha, self.dropout, self.use_rslora)
        return self._extra(name).spec

    def factors(self, name: str) -> Factors:
        if name == self.adapter_name:
            return Factors(self.lora_A, self.lora_B, self.scaling, self.dropout)
        extra = self._extra(name)
        return Factors(extra.lora_A, extra.lora_B, extra.spec.scaling, extra.spec.dropout)

    def _extra(self, name: str) -> LoRAAdapter:
        extra = self._modules.get("extra_adapters")
        if extra is None or name not in extra:
            raise KeyError(f"this layer holds no adapter named {name!r} (it holds {self.adapter_names})")
        return extra[name]

    def running_adapters(self) -> list[str]:
        """The adapters whose terms the forward adds: active ones this layer holds, none when disabled/merged."""
        if self.disabled or self.merged_adapters:
            return []
        held = set(self.adapter_names)
        return [name for name in self.active if name in held]

    # ----------------------------------------------------------------------------------------------- add / delete
    def add_adapter(self, name: str, spec: AdapterSpec, dtype: Optional[torch.dtype] = None) -> None:
        """A further adapter, initialised by the layer's rule, on the first adapter's device and dtype."""
        if name in self.adapter_names:
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        factory = {"device": self.lora_A.device, "dtype": dtype or self.lora_A.dtype}
        if self._modules.get("extra_adapters") is None:
            self.extra_adapters = nn.ModuleDict()
        adapter = LoRAAdapter(spec, self.in_features, self.out_features, factory)
        self._init_factors(adapter.lora_A, adapter.lora_B)
        self.extra_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Removes ``name``; deleting the first adapter promotes the next one into ``lora_A`` / ``lora_B``."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge it first")
        names = self.adapter_names
        if name not in names:
            raise KeyError(f"this layer holds no adapter named {name!r} (it holds {names})")
        if len(names) == 1:
            raise ValueError(f"{name!r} is the layer's only adapter; restore the original module instead")
        if name == self.adapter_name:
            successor = self._extra(names[1])
            self.adapter_name = names[1]
            self._set_primary_spec(successor.spec)
            self.lora_A, self.lora_B = successor.lora_A, successor.lora_B
            name = names[1]
        del self.extra_adapters[name]
        if len(self.extra_adapters) == 0:
            del self.extra_adapters

    def set_trainable(self, names: Iterable[str]) -> None:
        """requires_grad on the factors of the adapters in ``names``, off for every other adapter."""
        wanted = set(names)
        for name in self.adapter_names:
            factors = self.factors(name)
            factors.lora_A.requires_grad_(name in wanted)
            factors.lora_B.requires_grad_(name in wanted)

    # ----------------------------------------------------------------------------------------------- merge
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        """s · B A in float32, in the base weight's layout (default: the first running or held adapter)."""
        name = name or (self.running_adapters() or self.merged_adapters or [self.adapter_name])[0]
        f = self.factors(name)
        return self._delta_layout((f.lora_B.float() @ f.lora_A.float()).mul_(f.scaling))

    @torch.no_grad()
    def merged_weight(self, names: Sequence[str]) -> torch.Tensor:
        """round(W + Σ_a s_a B_a A_a): accumulated in float32, rounded once; the base weight is not touched."""
        weight = self.base_param()
        total = weight.float()
        for name in names:
            total = total + self.delta_weight(name)
        return total.to(weight.dtype)

    @torch.no_grad()
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Folds ``names`` (default: the active adapters this layer holds) into the base weight. ``safe``: the
        sum is formed in a copy and checked finite first, so a NaN/inf never reaches the weight."""
        if self.merged_adapters:
            raise RuntimeError(f"{type(self).__name__}.merge(): adapters {self.merged_adapters} are already merged")
        names = list(names) if names is not None else [n for n in self.active if n in self.adapter_names]
        if not names:
            raise ValueError(f"{type(self).__name__}.merge(): no adapter to merge (active {list(self.active)}, "
                             f"held {self.adapter_names})")
        merged = self.merged_weight(names)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapters {names} gives a weight that is not finite; nothing was merged")
        self.base_param().copy_(merged)
        self.merged_adapters = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← round(W − Σ s_a B_a A_a) in float32: exact in fp32 up to one rounding, ≤ 1 ulp off in bf16."""
        if not self.merged_adapters:
            raise RuntimeError(f"{type(self).__name__}.unmerge(): no adapter is merged")
        weight = self.base_param()
        total = weight.float()
        for name in self.merged_adapters:
            total = total - self.delta_weight(name)
        weight.copy_(total.to(weight.dtype))
        self.merged_adapters = []

    # ----------------------------------------------------------------------------------------------- per class
    def _init_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        raise NotImplementedError

    def base_param(self) -> torch.Tensor:
        raise NotImplementedError

    def _delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta


def kaiming_a_zero_b(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """PEFT's init for linear layers: A ~ Kaiming-uniform, a = √5 (U(±1/√in)); B = 0, so a fresh adapter adds 0."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)


def extra_lora_term(x: torch.Tensor, factors: Factors, training: bool) -> torch.Tensor:
    """s · B A (D ⊙ x) in the adapter's dtype, plain torch (autograd keeps x̃ and A x̃, as PEFT does)."""
    h = x.to(factors.lora_A.dtype)
    if training and factors.dropout > 0:
        h = nn.functional.dropout(h, factors.dropout)
    return nn.functional.linear(nn.functional.linear(h, factors.lora_A), factors.lora_B) * factors.scaling
