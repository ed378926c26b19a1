"""Freeze-then-unfreeze: train only what a warm start created, then everything (or LoRA).

Phase "new": every parameter is frozen except the new pieces (``report.new`` of ``add_tokens`` or
``model.lowcost_grow_report.new``). A whole new parameter (a new block's) trains as it is. New rows or
columns of an old parameter (embedding rows, MLP units) become their own small ``nn.Parameter`` spliced
into the old one by a ``torch.nn.utils.parametrize`` parametrization, so the optimizer holds state only for
them; every module that shares the old parameter (tied input/output embeddings) gets the same splice and
stays tied.

After ``warm_steps`` optimizer steps the schedule switches:
- ``then="unfreeze"``: the new slices are written back into their parameters, the splices removed (the
  original ``nn.Parameter`` objects return, ties intact), everything trains with a fresh optimizer;
- ``then="lora"``: ``lowcost.apply(model, lora=…)`` adds LoRA adapters (``lowcost.api`` registers that
  switch with ``register_lora_switch`` when it loads, so this layer never imports the api above it); new embedding/head rows stay spliced
  (the optimizer trains the adapters, the new blocks and those rows only), new units inside a linear that
  LoRA wraps are folded back and trained through its adapter. ``finish()`` writes the remaining slices back
  (call it before saving).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowcost.warmstart.report import NewSlice


class _Splice(nn.Module):
    """Parametrization: ``W`` with everything from ``start`` along ``dim`` replaced by ``values``."""

    def __init__(self, base: torch.Tensor, dim: int, start: int):
        super().__init__()
        self.dim, self.start = dim, start
        self.values = nn.Parameter(base.detach().narrow(dim, start, base.shape[dim] - start).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight.narrow(self.dim, 0, self.start).detach(), self.values], self.dim)


def _owners(model: nn.Module, param: nn.Parameter) -> list:
    """(module, attribute) pairs holding ``param`` directly (several when tied)."""
    return [(module, name) for module in model.modules()
            for name, p in list(module._parameters.items()) if p is param]


def _resolve(model: nn.Module, new: Iterable[NewSlice]) -> tuple[list, dict]:
    """Whole parameters to train, and {id(param): (param, dim, start)} slices (whole wins over a slice)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    whole, slices = {}, {}
    for item in new:
        if item.param not in params:
            raise KeyError(f"new piece {item.param!r} is not a parameter of the model")
        p = params[item.param]
        if item.dim is None or item.start == 0:
            whole[id(p)] = p
        else:
            slices.setdefault(id(p), (p, item.dim, item.start))
    return list(whole.values()), {k: v for k, v in slices.items() if k not in whole}


_LORA_SWITCH: Optional[Callable] = None


def register_lora_switch(switch: Callable) -> None:
    """``switch(model, lora_config)`` adds LoRA adapters to ``model``; set by ``lowcost.api`` on import."""
    global _LORA_SWITCH
    _LORA_SWITCH = switch


class FreezeThenUnfreeze:
    """Drives the two phases; call ``step()`` after each ``loss.backward()`` (it steps the optimizer).

    Args:
        model: the warm-started model.
        new: the new pieces (``NewSlice`` list, e.g. ``report.new``).
        warm_steps: optimizer steps in phase "new".
        optimizer: ``params → torch.optim.Optimizer`` factory, used for both phases.
        then: "unfreeze" or "lora".
        lora: a ``lowcost.LoRAConfig`` for ``then="lora"``.
    """

    def __init__(self, model: nn.Module, new: Iterable[NewSlice], warm_steps: int,
                 optimizer: Callable[[list], torch.optim.Optimizer] = lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                 then: str = "unfreeze", lora=None):
        if then not in ("unfreeze", "lora"):
            raise ValueError(f"then must be 'unfreeze' or 'lora', not {then!r}")
        if then == "lora" and lora is None:
            raise ValueError("then='lora' needs lora=lowcost.LoRAConfig(...)")
        self.model, self.warm_steps, self.factory, self.then, self.lora = model, warm_steps, optimizer, then, lora
        self.steps, self.phase, self.splices = 0, "new", []
        whole, slices = _resolve(model, list(new))
        if not whole and not slices:
            raise ValueError("nothing new to train first (empty `new`)")
        model.requires_grad_(False)
        for p in whole:
            p.requires_grad_(True)
        for param, dim, start in slices.values():
            self._splice(param, dim, start)
        self.optimizer = optimizer(self.trainable())

    def _splice(self, param: nn.Parameter, dim: int, start: int) -> None:
        splice = _Splice(param, dim, start)
        owners = _owners(self.model, param)
        for module, name in owners:
            parametrize.register_parametrization(module, name, splice, unsafe=True)
        self.splices.append((splice, param, owners))

    def trainable(self) -> list:
        """Parameters with ``requires_grad`` (each once)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self) -> None:
        """Optimizer step + zero_grad; switches phase after ``warm_steps`` steps."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.phase == "new" and self.steps >= self.warm_steps:
            self.switch()

    @torch.no_grad()
    def finish(self) -> None:
        """Writes the spliced slices back into their parameters and removes the splices."""
        for splice, param, owners in self.splices:
            param.narrow(splice.dim, splice.start, param.shape[splice.dim] - splice.start).copy_(splice.values)
            for module, name in owners:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self.splices = []

    def _to_lora(self) -> None:
        """Folds the splices back, adds LoRA, then re-splices the slices whose modules LoRA left alone
        (embeddings, the output head); slices inside LoRA-wrapped linears are trained through LoRA."""
        if _LORA_SWITCH is None:
            raise RuntimeError("then='lora' needs lowcost.api loaded (import lowcost) to add the adapters")
        slices = [(param, s.dim, s.start) for s, param, _ in self.splices]
        whole = [p for p in self.trainable() if all(p is not s.values for s, _, _ in self.splices)]
        self.finish()
        _LORA_SWITCH(self.model, self.lora)
        for p in whole:
            p.requires_grad_(True)
        for param, dim, start in slices:
            owners = _owners(self.model, param)
            if owners and not any("lora" in type(m).__name__.lower() for m, _ in owners):
                self._splice(param, dim, start)

    def switch(self) -> None:
        """Ends phase "new": unfreeze everything, or add LoRA and keep training the new slices."""
        if self.then == "unfreeze":
            self.finish()
            self.model.requires_grad_(True)
        else:
            self._to_lora()
        self.phase = self.then
        self.optimizer = self.factory(self.trainable())
