"""Fusion passes after the LoRA swap: ``lowcost.apply(model, lora=..., fused=...)``.

    "mlp"   gated MLPs → one ``lowcost.ops.lora_gated_mlp`` (``fuse_mlp``)
    "loss"  causal-LM loss → ``lowcost.ops.linear_cross_entropy``, no logits (``fuse_loss``)
    "norm"  each block's RMSNorm / LayerNorm → ``FusedRMSNorm`` / ``FusedLayerNorm``: the LoRA ops reading
            its output keep the norm's input and statistics, not the normed tensor (``fuse_norm``)
    "qkv"   q/k/v (and gate/up of an MLP the "mlp" fusion did not take) sharing one input → one
            ``lowcost.ops.lora_grouped_linear`` call (``fuse_qkv``): installed on the projections themselves,
            exact fallback to each projection's own op when they are not called on the same tensor

Every requested fusion is either taken (per module, with what it does) or refused (with the reason) in a
``FusionReport``. The passes plan first and swap after; ``remove_fusions`` puts back the original modules
and forward. The fused modules hold the same parameter objects under the same names, so state_dict keys,
PEFT-format adapter files and merged weights are those of the unfused model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from torch import nn

from lowcost.patch.fuse_loss import install_fused_loss, loss_problem, remove_fused_loss
from lowcost.patch.fuse_mlp import plan_mlp_fusions
from lowcost.patch.fuse_norm import plan_norm_fusions
from lowcost.patch.fuse_qkv import plan_grouped_fusions

FUSIONS = ("mlp", "norm", "qkv", "loss")
STATE_ATTR = "_lowcost_fusion"


@dataclass(frozen=True)
class Fusion:
    kind: str          # one of FUSIONS
    module: str        # module path ("" for the whole model, "*" for every candidate)
    detail: str        # what was done, or why not


@dataclass
class FusionReport:
    taken: list[Fusion] = field(default_factory=list)
    refused: list[Fusion] = field(default_factory=list)

    def kinds(self) -> set[str]:
        return {f.kind for f in self.taken}

    def lines(self) -> list[str]:
        out = [f"  fused {f.kind:<5} {f.module or '(model)'}  ({f.detail})" for f in self.taken]
        return out + [f"  not fused {f.kind:<5} {f.module or '(model)'}  ({f.detail})" for f in self.refused]

    def __str__(self) -> str:
        return "\n".join([f"lowcost fusions: {len(self.taken)} taken, {len(self.refused)} refused"] + self.lines())


@dataclass
class FusionState:
    originals: dict = field(default_factory=dict)   # module path → original module
    groups: list = field(default_factory=list)      # installed ProjectionGroups ("qkv")
    loss: bool = False


def normalize_fused(fused: Union[None, str, Sequence[str]]) -> tuple[str, ...]:
    """None/() → no fusion; "all" → every fusion; else a subset of FUSIONS (ValueError naming the stranger)."""
    if fused is None:
        return ()
    if isinstance(fused, str):
        fused = FUSIONS if fused == "all" else (fused,)
    fused = tuple(fused)
    unknown = [f for f in fused if f not in FUSIONS]
    if unknown or not all(isinstance(f, str) for f in fused):
        raise ValueError(f"fused must be a subset of {FUSIONS} (or 'all' / None), got {list(fused)!r}")
    return tuple(f for f in FUSIONS if f in fused)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_fusions(model: nn.Module, fused: Sequence[str], avoid: tuple[str, ...] = ()) -> FusionReport:
    """Run the requested passes on a LoRA-patched model; ``avoid``: checkpoint recompute paths."""
    if STATE_ATTR in model.__dict__:
        raise RuntimeError("lowcost.apply: fusions are already installed; call lowcost.unapply(model) first")
    report, state = FusionReport(), FusionState()
    swaps: list[tuple[str, str, nn.Module, str]] = []          # (kind, path, replacement, detail)
    for kind, plan in (("mlp", plan_mlp_fusions), ("norm", plan_norm_fusions)):
        if kind in fused:
            taken, refused = plan(model, avoid)
            swaps += [(kind, path, module, detail) for path, (module, detail) in taken.items()]
            report.refused += [Fusion(kind, path, why) for path, why in refused]
    groups: dict = {}
    if "qkv" in fused:
        mlp_taken = {path for kind, path, _, _ in swaps if kind == "mlp"}
        groups, refused = plan_grouped_fusions(model, avoid, mlp_taken)
        report.refused += [Fusion("qkv", path, why) for path, why in refused]
    loss_why = loss_problem(model) if "loss" in fused else None
    try:
        for kind, path, module, detail in swaps:
            state.originals[path] = model.get_submodule(path)
            _set_module(model, path, module)
            report.taken.append(Fusion(kind, path, detail))
        for path, (group, detail) in groups.items():
            group.install()
            state.groups.append(group)
            report.taken.append(Fusion("qkv", path, detail))
        if loss_why == "":
            install_fused_loss(model)
            state.loss = True
            report.taken.append(Fusion("loss", "", "linear_cross_entropy on lm_head; logits None with labels"))
    except BaseException:
        _restore(model, state)
        raise
    if loss_why:
        report.refused.append(Fusion("loss", "", loss_why))
    model.__dict__[STATE_ATTR] = state
    return report


def _restore(model: nn.Module, state: FusionState) -> None:
    if state.loss:
        remove_fused_loss(model)
    for group in state.groups:
        group.remove()
    for path, original in state.originals.items():
        _set_module(model, path, original)


def remove_fusions(model: nn.Module) -> bool:
    """Undo ``apply_fusions`` (original MLP and norm modules and forward back); False when nothing to undo."""
    state: Optional[FusionState] = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return False
    _restore(model, state)
    return True


def fusions_installed(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__
