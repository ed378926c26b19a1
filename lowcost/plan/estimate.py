"""Memory and FLOPs of one training step for one setup (full fine-tuning, LoRA, LoRA + a checkpoint policy).

For a setup the model is built from its config on the meta device, patched with the real ``lowcost.apply``,
given fake tensors and traced (``trace.trace_step``): one forward + backward of ``batch × seq`` tokens.

Depth. A fake trace costs time per op, not per byte, so a 32-block model costs 16× a 2-block one. The
blocks of a decoder are identical and every policy but ``sqrt`` decides per block with a period p (1, or k
for ``every_k``), so every figure of the step is affine in the depth L along L ≡ L₀ (mod p): blocks add the
same bytes, FLOPs and parameters, and the peak is reached at the same point of the step plus what the
added blocks keep. The estimate therefore traces two shallow copies, d₁ ≥ 2 with d₁ ≡ L (mod p) and
d₂ = d₁ + p (block 0 differs: its input needs no gradient), and extends the line to L. ``sqrt`` (segment
lengths depend on L), configs with per-layer types, and ``exact=True`` trace the full depth.
tests/plan/test_plan_depth.py checks the line against full-depth traces.

Memory of a step (bytes, the categories of ``Estimate``):
- weights: every parameter and buffer, as stored (a quantized base: its codes and scales, ``quantized.py``);
- optimizer: AdamW's two moments in float32 (8 B per trainable parameter), plus a float32 master copy (4 B)
  of trainable parameters stored in 16 bits (mixed precision);
- the step's own peak (``StepTrace.peak``): saved activations, gradients as backward creates them, the
  logits and loss, and transient tensors and kernel workspace;
- the optimizer update: all gradients plus AdamW's temporaries for one parameter (2 × its float32 size,
  the single-tensor update; ``fused=True`` needs none).
peak = weights + optimizer + max(step peak, gradients + update temporaries).
On a GPU, ``peak_on(sms)`` adds what the Triton fused loss's larger chunk holds (``workspace.triton_loss_extra``;
an upper bound: it is added even when the step's peak is not at the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from lowcost.api import LoRAConfig
from lowcost.checkpoint import CheckpointConfig
from lowcost.patch.fuse_loss import has_fused_loss
from lowcost.plan.build import meta_model, patch, to_fake
from lowcost.plan.fake import fake_world
from lowcost.plan.quantized import check_plan_scheme, quantize_base
from lowcost.plan.trace import trace_step
from lowcost.plan.workspace import triton_loss_extra

PLANNED_POLICIES = ("full", "every_k", "sqrt", "selective", "offload")


@dataclass(frozen=True)
class Setup:
    """One way to fine-tune: ``lora`` None means full fine-tuning; ``checkpoint`` None means none;
    ``quantize`` ("nf4", "nf4-dq", "int8"; LoRA only) the frozen base's format, None for a dense base."""
    name: str
    lora: Optional[LoRAConfig] = None
    checkpoint: Optional[CheckpointConfig] = None
    quantize: Optional[str] = None

    def __post_init__(self):
        if self.quantize is not None:
            check_plan_scheme(self.quantize)
            if self.lora is None:
                raise ValueError("a quantized base is frozen: quantize= needs LoRA (full fine-tuning trains W)")

    @property
    def period(self) -> Optional[int]:
        """Blocks after which the per-block decisions repeat (None: they depend on the depth)."""
        policy = self.checkpoint.policy if self.checkpoint is not None else "none"
        if policy in ("none", "full", "selective", "offload"):
            return 1
        return self.checkpoint.k if policy == "every_k" else None


@dataclass
class Estimate:
    """Bytes and FLOPs of one step of ``setup`` (see the module docstring for each category)."""
    setup: Setup
    parameters: int
    trainable: int
    weights: int
    grads: int
    optimizer: int
    saved_blocks: int
    saved_outside: int
    host_offload: int
    step_peak: int
    peak_saved: int
    peak_grads: int
    peak_transient: int
    peak_workspace: int
    update_peak: int
    flops: int
    depths: tuple = ()
    quantized_weights: int = 0     # of ``weights``: the quantized layers' codes + scales (QuantReport.bytes)
    fused_loss: tuple = ()         # (tokens, vocab, itemsize) of the fused loss's hidden; () without it

    @property
    def saved(self) -> int:
        return self.saved_blocks + self.saved_outside

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + max(self.step_peak, self.update_peak)

    def peak_on(self, sms: int) -> int:
        """``peak`` on a GPU with ``sms`` streaming multiprocessors: plus the Triton fused loss's larger chunk."""
        return self.peak + (triton_loss_extra(*self.fused_loss, sms) if self.fused_loss else 0)

    @property
    def dynamic_peak(self) -> int:
        """What the step adds at its peak on top of weights and optimizer state (a measured RSS delta)."""
        return max(self.step_peak, self.update_peak)


_COUNTS = ("parameters", "trainable", "weights", "grads", "optimizer", "saved_blocks", "saved_outside",
           "host_offload", "step_peak", "peak_saved", "peak_grads", "peak_transient", "peak_workspace",
           "update_peak", "flops", "quantized_weights")


def _optimizer_bytes(params) -> tuple[int, int]:
    """(AdamW state: fp32 moments + fp32 master copy of 16-bit parameters, update temporaries)."""
    state = largest = 0
    for p in params:
        if p.requires_grad:
            state += 8 * p.numel() + (4 * p.numel() if p.element_size() < 4 else 0)
            largest = max(largest, p.numel())
    return state, 2 * 4 * largest


def _unique(tensors) -> list:
    return list({id(t): t for t in tensors}.values())


def trace_setup(config, setup: Setup, batch: int, seq: int, dtype: torch.dtype, depth: int) -> Estimate:
    """One fake trace of ``setup`` on ``config`` cut to ``depth`` blocks."""
    config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": depth})
    model = meta_model(config, dtype)
    quantized = quantize_base(model, setup.quantize).bytes if setup.quantize else 0
    model = patch(model, setup.lora, setup.checkpoint)
    with fake_world():
        to_fake(model)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        trace = trace_step(model, ids, count_flops=True)
        params = _unique(model.parameters())
        buffers = _unique(model.buffers())
    optimizer, update_temp = _optimizer_bytes(params)
    return Estimate(setup=setup, parameters=sum(p.numel() for p in params),
                    trainable=sum(p.numel() for p in params if p.requires_grad),
                    weights=sum(t.numel() * t.element_size() for t in params + buffers), grads=trace.grads,
                    optimizer=optimizer, saved_blocks=trace.saved_blocks, saved_outside=trace.saved_outside,
                    host_offload=trace.host_offload, step_peak=trace.peak, peak_saved=trace.peak_saved,
                    peak_grads=trace.peak_grads, peak_transient=trace.peak_transient,
                    peak_workspace=trace.peak_workspace, update_peak=trace.grads + update_temp,
                    flops=trace.flops, depths=(depth,), quantized_weights=quantized,
                    fused_loss=_fused_loss_operands(model, config, batch * seq, dtype))


def _fused_loss_operands(model, config, tokens: int, dtype: torch.dtype) -> tuple:
    """(tokens, vocab, itemsize) when ``lowcost.apply`` installed the fused loss on ``model``, else ()."""
    if not has_fused_loss(model):
        return ()
    return tokens, int(config.vocab_size), torch.empty((), dtype=dtype).element_size()


def _extend(a: Estimate, b: Estimate, steps: int, depth: int) -> Estimate:
    """a + steps·(b − a) for every count (a and b traced one period apart)."""
    values = {name: getattr(a, name) + steps * (getattr(b, name) - getattr(a, name)) for name in _COUNTS}
    return replace(a, **values, depths=a.depths + b.depths + (depth,))


def _layer_types_vary(config) -> bool:
    types = getattr(config, "layer_types", None)
    return isinstance(types, (list, tuple)) and len(set(types)) > 1


def estimate(config, setup: Setup, batch: int, seq: int, dtype: torch.dtype, exact: bool = False) -> Estimate:
    """The step's figures at the config's full depth (two shallow traces extended, or one full trace)."""
    depth = int(config.num_hidden_layers)
    period = setup.period
    if exact or period is None or _layer_types_vary(config):
        return trace_setup(config, setup, batch, seq, dtype, depth)
    first = 2 + (depth - 2) % period
    if first + period >= depth:
        return trace_setup(config, setup, batch, seq, dtype, depth)
    a = trace_setup(config, setup, batch, seq, dtype, first)
    b = trace_setup(config, setup, batch, seq, dtype, first + period)
    return _extend(a, b, (depth - first) // period, depth)


def standard_setups(lora: LoRAConfig, checkpoint: Optional[str] = None, k: int = 2,
                    quantize: Optional[str] = None) -> list[Setup]:
    """Full fine-tuning (with ``checkpoint`` too when one is named), LoRA, and LoRA with each policy.

    With ``quantize``, the policies run on the quantized base ("nf4 LoRA + selective", ...) and the dense base
    keeps two rows to compare with: LoRA, and LoRA + ``checkpoint`` when one is named."""
    setups = [Setup("full fine-tuning")]
    named = checkpoint not in (None, "none")
    if named:
        setups.append(Setup(f"full fine-tuning + {checkpoint}", None, CheckpointConfig(policy=checkpoint, k=k)))
    setups.append(Setup("LoRA", lora))
    if quantize is None:
        return setups + [Setup(f"LoRA + {p}", lora, CheckpointConfig(policy=p, k=k)) for p in PLANNED_POLICIES]
    if named:
        setups.append(Setup(f"LoRA + {checkpoint}", lora, CheckpointConfig(policy=checkpoint, k=k)))
    base = f"{quantize} LoRA"
    setups.append(Setup(base, lora, None, quantize))
    return setups + [Setup(f"{base} + {p}", lora, CheckpointConfig(policy=p, k=k), quantize) for p in PLANNED_POLICIES]
