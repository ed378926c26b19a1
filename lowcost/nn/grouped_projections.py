"""``ProjectionGroup``: LoRA linears that read one input (q/k/v, gate/up) run as one ``lowcost.ops.lora_grouped_linear``.

A model's forward calls them one by one (HF attention: ``self.q_proj(h)``, then ``self.k_proj(h)``, then
``self.v_proj(h)``), so the group is installed on the layers themselves: each ``LoRALinear`` gets an instance
``forward`` (its class, parameters, names and state_dict are untouched) that goes through the group:

- the leader (the first member, q or gate) computes every member's output with one grouped call on its input x
  and keeps the others' outputs as *pending*, together with what they were computed from: x itself (a weak
  reference), x's version counter, and each member's state (training flag, running adapter, the identity and
  version of W, A, B and bias, scale, dropout, backend), grad mode and autocast state;
- a member hands back its pending output only when it is called with that very tensor object, at the same
  version, with nothing in that state changed; the entry is used once. Anything else (another input, x or a
  parameter written in place, an adapter switched, a second call) runs the member's own unfused op; while its
  entry is pending, with the dropout seed the leader drew for it (no second draw: the RNG stream and every later
  mask stay those of the unfused model).

So a pending output is never stale: the grouped call computes exactly what the unfused calls would from the
same x and parameters (same dropout seeds, drawn in the members' order). A leader whose members cannot run
grouped (an adapter merged, disabled or several running, a base weight made trainable) runs unfused too.
``stats`` counts grouped calls, handed-back outputs and fallbacks (for tests and reports). Under
``torch.compile`` (Dynamo tracing) every member runs its own op: the hand-off rests on tensor identity and
version counters, which a traced graph cannot check (the norm tag is left out under compile for the same reason).
"""
from __future__ import annotations

import types
import weakref
from typing import Optional

import torch

from lowcost.nn.lora_linear import LoRALinear
from lowcost.ops.lora_grouped_linear import lora_grouped_linear
from lowcost.ops.lora_linear import draw_seed


def _tensor_key(t: Optional[torch.Tensor]) -> tuple:
    return (None,) if t is None else (id(t), t._version)


def _weight_key(layer: LoRALinear) -> tuple:
    """The base weight's key: a quantized weight's stored tensors as held (not ``packed``, whose bit-cast views of a
    row-shardable weight are new objects at every call: their ids would not match between the leader's call and a
    member's, and every member would run its own op, drawing its dropout seed a second time), else the dense
    weight."""
    if layer.quantized:
        return tuple(k for t in layer.weight.stored for k in _tensor_key(t))
    return _tensor_key(layer.weight)


class ProjectionGroup:
    """``ProjectionGroup([(path, layer), ...])``: the first layer leads. ``install()`` / ``remove()``."""

    def __init__(self, members: list[tuple[str, LoRALinear]]):
        if len(members) < 2 or not all(isinstance(layer, LoRALinear) for _, layer in members):
            raise ValueError("a ProjectionGroup needs at least two LoRALinear members")
        self.paths = [path for path, _ in members]
        self.layers = [layer for _, layer in members]
        self._pending: dict[int, tuple] = {}
        self.stats = {"grouped": 0, "handed": 0, "fallback": 0}

    # ------------------------------------------------------------------------------------------ install
    def install(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.forward = self._member_forward(index)     # an instance attribute: nn.Module.__call__ uses it

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self._pending.clear()

    def _member_forward(self, index: int):
        """The layer's instance forward: a method bound to the layer, so a deep copy of the model rebinds it to
        the copied layer, which is not this group's member and so runs its own op (never this group's)."""
        group = weakref.ref(self)    # the layer must not keep a removed group alive

        def forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():   # Dynamo cannot guard on version counters: each layer its own op
                return LoRALinear.forward(layer, x)
            live = group()
            if live is None or live.layers[index] is not layer:
                return LoRALinear.forward(layer, x)
            return live.call(index, x)

        return types.MethodType(forward, self.layers[index])

    # ------------------------------------------------------------------------------------------ running
    def runnable(self) -> bool:
        """Members that can run grouped now: one running adapter each, frozen base weights (all dense or all
        quantized)."""
        return (len({m.quantized for m in self.layers}) == 1
                and all(len(m.running_adapters()) == 1 and not m.fan_in_fan_out
                        and (m.quantized or not m.weight.requires_grad) for m in self.layers))

    def _state(self, x: torch.Tensor) -> tuple:
        """Everything a member's output depends on besides x's values (which x's version counter covers)."""
        members = []
        for m in self.layers:
            f = m.factors(m.running_adapters()[0])
            members.append((m.training, m.running_adapters()[0], m.backend, f.scaling, f.dropout,
                            *_weight_key(m), *_tensor_key(m.bias), *_tensor_key(f.lora_A),
                            *_tensor_key(f.lora_B)))
        autocast = (torch.is_autocast_enabled(x.device.type),
                    torch.get_autocast_dtype(x.device.type) if x.device.type in ("cpu", "cuda") else None)
        return (x._version, torch.is_grad_enabled(), autocast, tuple(members))

    def _run_group(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """(every member's output, the dropout seed drawn for each member: None where it has no dropout)."""
        factors = [m.factors(m.running_adapters()[0]) for m in self.layers]
        dropouts = [f.dropout if m.training else 0.0 for m, f in zip(self.layers, factors)]
        seeds = [draw_seed(p) for p in dropouts]     # in the members' order, as their unfused calls draw them
        ys = lora_grouped_linear(
            x, [m.base_weight() for m in self.layers], [f.lora_A for f in factors], [f.lora_B for f in factors],
            [f.scaling for f in factors], [m.bias for m in self.layers], dropouts, seeds=torch.stack(seeds),
            backend=self.layers[0].backend)
        return ys, [seed if p > 0.0 else None for seed, p in zip(seeds, dropouts)]

    def call(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        if index == 0:
            self._pending.clear()
            if isinstance(x, torch.Tensor) and self.runnable():
                state = self._state(x)
                ys, seeds = self._run_group(x)
                self._pending = {j: (ys[j], weakref.ref(x), state, seeds[j]) for j in range(1, len(ys))}
                self.stats["grouped"] += 1
                return ys[0]
        else:
            entry = self._pending.pop(index, None)
            if (entry is not None and isinstance(x, torch.Tensor) and entry[1]() is x and self.runnable()
                    and self._state(x) == entry[2]):
                self.stats["handed"] += 1
                return entry[0]
            if entry is not None:   # its own op, with the seed the leader drew for it: no second draw
                self.stats["fallback"] += 1
                return layer.forward_with_seed(x, seed=entry[3])
        self.stats["fallback"] += 1
        return LoRALinear.forward(layer, x)
