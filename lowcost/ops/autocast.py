"""``torch.autocast`` for lowcost's custom ops: which operand is cast to the autocast dtype, and which is not.

A ``torch.library.custom_op`` gets no autocast casting of its own: under ``torch.autocast`` it would run on
whatever dtypes it is given (an fp32 layer silently staying fp32, or a bf16 activation meeting an fp32 weight
and being refused), and its body would run with autocast still on (the torch backend's deliberate fp32
accumulations silently cast down). Here every forward op gets an autocast rule, on the CPU and CUDA:

- compute operands (the activation x / hidden, the frozen base weights, the biases): cast to the autocast
  dtype, as torch's autocast casts ``F.linear``'s operands. float64 and integer tensors (labels, seeds) are
  left alone, as torch does.
- LoRA adapters (lora_a, lora_b): float32 adapters stay float32, the ops' mixed mode for a low-precision x
  (their products accumulate in float32 whatever the adapter dtype, so rounding A and B first would only lose
  precision; dA and dB come out in float32 directly). Adapters of another low dtype go to the autocast dtype.
- quantized weights (the packed codes and scales of ``qlora_linear``, ``quantized_linear``,
  ``qlora_gated_mlp``, ``qlora_grouped_linear``): untouched; the op decodes them to x's dtype, the autocast dtype.
- ``linear_cross_entropy``: the logits come out of the matmul in the autocast dtype (as torch's autocast
  ``F.linear`` gives them), the log-softmax and the loss run in float32 inside the op (as torch's autocast
  runs ``cross_entropy`` in float32), and the loss defaults to float32 (``autocast_loss_dtype``).
- a lowcost norm's tagged output (the "norm" fusion, ``lowcost.ops.normed_input``) cast for a consumer gives a
  copy tagged "rebuild the norm's output, then cast": the consumer keeps the norm's tensors, not the copy.
- the op then runs with autocast off, so its body computes exactly as it does outside autocast on the cast
  operands. Backward ops run with autocast off too (a backward inside the autocast region changes nothing).

Casts go through autograd, so the gradient of a cast operand reaches the fp32 tensor in fp32. The public
wrappers (``lowcost.ops.lora_linear`` ...) check dtypes before the op is called, so they apply the same rule
first (``autocast_operands``); the dispatcher rule then finds nothing left to cast and serves direct
``torch.ops.lowcost.*`` callers. ``lowcost.ops.lora_embedding`` is plain torch ops: torch's own rules apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lowcost.ops.normed_input import cast_input

Tensor = torch.Tensor
DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


@dataclass(frozen=True)
class Rule:
    """Positions, in the op's schema, of its compute operands and of its adapters."""
    compute: tuple[int, ...]
    adapters: tuple[int, ...] = ()


# The forward ops. A new lowcost op needs a line here (tests/ops/test_autocast.py checks every op has one).
RULES = {
    "lora_linear": Rule(compute=(0, 1, 4), adapters=(2, 3)),                      # x, W, A, B, bias
    "lora_gated_mlp": Rule(compute=(0, 1, 4, 7), adapters=(2, 3, 5, 6, 8, 9)),    # x, (W, A, B) × 3
    "linear_cross_entropy": Rule(compute=(0, 1, 3), adapters=(4, 5)),             # hidden, W, labels, bias, A, B
    "qlinear_cross_entropy": Rule(compute=(0, 6), adapters=(7, 8)),              # hidden, packed, …, labels, bias, A, B
    "qlora_linear": Rule(compute=(0, 7), adapters=(5, 6)),                        # x, packed, …, A, B, bias
    "quantized_linear": Rule(compute=(0, 5)),                                     # x, packed, …, bias
    "qlora_gated_mlp": Rule(compute=(0,), adapters=(8, 9, 10, 11, 12, 13)),       # x, packed × 3, …, (A, B) × 3
    "lora_grouped_linear": Rule(compute=(0, 1, 4), adapters=(2, 3)),              # x, [W], [A], [B], [biases]
    "qlora_grouped_linear": Rule(compute=(0, 7), adapters=(5, 6)),                # x, [packed], …, [A], [B], [biases]
    "rms_norm": Rule(compute=()),       # norms: nothing cast, run in the input's dtype (torch keeps norms fp32)
    "layer_norm": Rule(compute=()),
}
# Run as they are called, with autocast off: their dtypes were chosen by the forward.
BACKWARD_OPS = ("lora_linear_backward", "lora_gated_mlp_backward", "lora_grouped_linear_backward",
                "linear_cross_entropy_backward", "qlinear_cross_entropy_backward",
                "qlora_linear_backward", "quantized_linear_dgrad", "qlora_gated_mlp_backward",
                "qlora_grouped_linear_backward", "rms_norm_backward",
                "layer_norm_backward")
# The C++ kernels of lowcost._C, called inside the ops' bodies (where autocast is off) on exact dtypes.
KERNEL_OPS = ("lora_down", "lora_down_grouped", "lora_up", "lora_dx_da", "lora_dx_da_grouped", "lora_grad_pass",
              "philox_dropout", "philox_dropout_pair_", "dequant_gemm", "dequant_gemm_dgrad", "gated_act_mul",
              "gated_act_mul_backward", "softmax_xent_rows")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``'s type, or None when autocast is off there."""
    kind = device.type
    if kind not in DEVICE_KEYS or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _lower(t, low: torch.dtype):
    """A compute operand in the autocast dtype (float64, integer tensors and non-tensors unchanged). The copy of
    a lowcost norm's tagged output is tagged too (``normed_input.cast_input``): its consumer keeps the norm's
    tensors, not the copy."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in (low, torch.float64):
        return t
    return cast_input(t, low)


def _adapter(t, low: torch.dtype):
    """An adapter: float32 (and float64) kept, another low dtype cast to the autocast dtype."""
    if not isinstance(t, Tensor) or t.dtype in (torch.float32, torch.float64):
        return t
    return _lower(t, low)


def autocast_operands(compute: Sequence, adapters: Sequence = ()) -> tuple[tuple, tuple]:
    """(compute, adapters) as the autocast rule gives them to the op; unchanged when autocast is off for
    the first operand's device (non-tensors pass through, so the wrappers' own checks still report them)."""
    first = compute[0] if compute else None
    low = autocast_dtype(first.device) if isinstance(first, Tensor) else None
    if low is None:
        return tuple(compute), tuple(adapters)
    return tuple(_lower(t, low) for t in compute), tuple(_adapter(t, low) for t in adapters)


def autocast_projections(x, params: Sequence) -> tuple:
    """(x, params) of the fused gated MLPs, params = (W, A, B) per projection: x and each W a compute
    operand (a ``QuantizedWeight`` passes through), each A and B an adapter."""
    (x, *weights), adapters = autocast_operands((x, *params[0::3]), [t for i, t in enumerate(params) if i % 3])
    return x, tuple(t for w, i in zip(weights, range(0, len(adapters), 2)) for t in (w, *adapters[i:i + 2]))


def autocast_loss_dtype(hidden) -> Optional[torch.dtype]:
    """float32 when autocast is on for ``hidden``'s device (torch's autocast returns cross_entropy in
    float32), None otherwise (the caller's default applies)."""
    if not isinstance(hidden, Tensor) or hidden.dtype == torch.float64 or autocast_dtype(hidden.device) is None:
        return None
    return torch.float32


def _cast_args(args: tuple, rule: Rule, low: torch.dtype) -> list:
    out = list(args)
    for indices, cast in ((rule.compute, _lower), (rule.adapters, _adapter)):
        for i in indices:   # a list operand (the grouped projections' weights, adapters, biases): each element
            out[i] = [cast(t, low) for t in out[i]] if isinstance(out[i], (list, tuple)) else cast(out[i], low)
    return out


def _kernel(op, device_type: str, rule: Optional[Rule]):
    """The autocast kernel of ``op`` on ``device_type``: cast by ``rule`` (None: no cast), run autocast off."""
    def kernel(_keyset, *args, **kwargs):
        if rule is not None:
            args = _cast_args(args, rule, torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return kernel


_LIBRARY: Optional[torch.library.Library] = None


def register() -> None:
    """Registers the rules on the dispatcher (once; ``lowcost.ops`` calls it after defining the ops)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("lowcost", "IMPL")
    ops = [(name, rule) for name, rule in RULES.items()] + [(name, None) for name in BACKWARD_OPS]
    for name, rule in ops:
        op = getattr(torch.ops.lowcost, name).default
        for device_type, key in DEVICE_KEYS.items():
            library.impl(name, _kernel(op, device_type, rule), key, with_keyset=True)
    _LIBRARY = library
