"""``LoRAGatedMLP``: a gated MLP whose LoRA-adapted projections run as one ``lowcost.ops.lora_gated_mlp`` call.

    y = down(act(gate(x)) ⊙ up(x))          x: (..., H) → y: (..., H)

It wraps the original MLP module and holds the *same* ``LoRALinear`` children under the original attribute
names (``gate_proj``/``up_proj``/``down_proj``, or Phi-3's packed ``gate_up_proj`` + ``down_proj``), so
``state_dict`` keys, PEFT-format adapters and optimiser parameters do not change. The original module is
kept (outside the module tree) and comes back on ``lowcost.unapply``.

Dropout: each projection uses its own ``LoRALinear.dropout`` (in training mode) and draws its seed as its
own forward would, in the order the unfused MLP calls them, so the masks are the unfused model's.
Quantized frozen weights (``QuantizedWeight``, all three projections) run the same op on its quantized path
(``lowcost.ops.qlora_gated_mlp``). When a child is not a ``LoRALinear``, does not run exactly one adapter (merged, ``disable_adapter``, several
active), or has a base weight that requires grad, the original module's forward runs (the same children,
unfused).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowcost.nn.lora_linear import LoRALinear
from lowcost.ops.lora_gated_mlp import lora_gated_mlp
from lowcost.ops.lora_linear import _seed_tensor


class LoRAGatedMLP(nn.Module):
    """Build with ``LoRAGatedMLP(original, activation, down=("down_proj", layer), gate=(...), up=(...))`` or
    ``gate_up=("gate_up_proj", layer)`` for a packed projection whose output is [gate | up]."""

    def __init__(self, original: nn.Module, activation: str, down: tuple[str, nn.Module],
                 gate: Optional[tuple[str, nn.Module]] = None, up: Optional[tuple[str, nn.Module]] = None,
                 gate_up: Optional[tuple[str, nn.Module]] = None):
        super().__init__()
        if (gate_up is None) == (gate is None or up is None):
            raise ValueError("LoRAGatedMLP needs gate and up, or gate_up (packed), not both")
        self.__dict__["original"] = original           # not a child: its parameters are the children's
        self.activation = activation
        self.packed = gate_up is not None
        self.roles = {"gate_up": gate_up[0]} if self.packed else {"gate": gate[0], "up": up[0]}
        self.roles["down"] = down[0]
        for name, layer in (gate_up,) if self.packed else (gate, up):
            self.add_module(name, layer)
        self.add_module(down[0], down[1])
        self.training = original.training

    def layer(self, role: str) -> nn.Module:
        return getattr(self, self.roles[role])

    def _fusable(self) -> bool:
        """Fused path only for LoRALinear children running exactly one adapter (not merged, not disabled, not
        several active) with frozen base weights (a weight made trainable later, e.g. by a warm-start
        schedule, needs dW: the original forward computes it)."""
        layers = [self.layer(role) for role in self.roles]
        return all(isinstance(m, LoRALinear) and len(m.running_adapters()) == 1 and
                   not getattr(m.weight, "requires_grad", False) for m in layers)

    @staticmethod
    def _factors(layer: LoRALinear):
        """(A, B, scaling, dropout now, seed) of the layer's running adapter; the seed is drawn as the layer's
        own forward would draw it (same RNG use)."""
        f = layer.factors(layer.running_adapters()[0])
        p = f.dropout if layer.training else 0.0
        return f.lora_A, f.lora_B, f.scaling, p, _seed_tensor(None, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable():
            return self.original(x)
        down = self.layer("down")
        if self.packed:
            gate_up = self.layer("gate_up")
            a, b, s, p, seed = self._factors(gate_up)
            a_d, b_d, s_d, p_d, seed_d = self._factors(down)
            half = gate_up.out_features // 2
            w = gate_up.base_weight()
            gate, up = (w[:half], a, b[:half]), (w[half:], a, b[half:])
            scales, dropouts, seeds = (s, s, s_d), (p, p, p_d), torch.stack([seed, seed, seed_d])
        else:
            layers = (self.layer("gate"), self.layer("up"), down)
            drawn = [self._factors(layer) for layer in layers]              # gate, up, down: the unfused order
            gate, up = ((m.base_weight(), f[0], f[1]) for m, f in zip(layers[:2], drawn))
            a_d, b_d = drawn[2][:2]
            scales, dropouts = tuple(f[2] for f in drawn), tuple(f[3] for f in drawn)
            seeds = torch.stack([f[4] for f in drawn])
        return lora_gated_mlp(x, gate, up, (down.base_weight(), a_d, b_d), scales, activation=self.activation,
                              dropouts=dropouts, seeds=seeds, backend=down.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, packed={self.packed}"
