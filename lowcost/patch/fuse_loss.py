"""Fusion pass "loss": a causal LM's forward with labels computes its loss with
``lowcost.ops.linear_cross_entropy`` and returns ``logits=None``; the (tokens × vocab) logits never exist.

The patched forward (an instance attribute shadowing the class's, removed by ``unapply``) does what the
transformers causal-LM forward does for these families: decoder (``model.model``) → last hidden state →
head → ``ForCausalLMLoss`` (labels shifted left with ignore_index padding, or ``shift_labels``; "mean", or
"sum" / ``num_items_in_batch``; loss in float32), with Gemma's ``final_logit_softcapping`` applied inside
the op. Without labels, with ``logits_to_keep``, or with ``return_logits=True`` it runs the original
forward unchanged (logits as usual).

The head may be a frozen or trainable ``nn.Linear`` (a tied embedding included: the op reads the same
weight), a frozen ``QuantizedLinear`` (NF4, int8, GGUF blocks: the op dequantizes W inside the head's GEMMs;
a GGUF's quantized output or tied-embedding weight) or a fused ``LoRALinear`` over either (its dropout seed
drawn as its own forward would draw it; its backend is the op's: a backend that cannot run here or has no
kernel for the weight's format is refused with the reason). Families
outside ``LOSS_FAMILIES``, MoE variants (their forward adds a router loss), models whose forward is
already replaced, and any other head are refused with the reason.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowcost._families import detect_family
from lowcost.nn.lora_linear import LoRALinear
from lowcost.nn.quantized import QuantizedLinear
from lowcost.ops._quant_backends import QUANT_SUPPORT
from lowcost.ops.backend import unavailable_reason
from lowcost.ops.linear_cross_entropy import linear_cross_entropy
from lowcost.reference.quant import QuantizedWeight

LOSS_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def loss_problem(model: nn.Module) -> str:
    """Why the loss of ``model`` cannot be fused ("" when it can)."""
    family = detect_family(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if family.name not in LOSS_FAMILIES:
        return f"family {family.name!r}: the fused loss knows the causal-LM forward of {LOSS_FAMILIES} only"
    if model_type in MOE_TYPES:
        return f"model_type {model_type!r} adds a router loss in its forward"
    if not type(model).__name__.endswith("ForCausalLM"):
        return f"{type(model).__name__} is not a *ForCausalLM model"
    if "forward" in model.__dict__:
        return "the model's forward is already replaced on the instance"
    if not isinstance(getattr(model, "model", None), nn.Module) or not isinstance(getattr(model, "lm_head", None),
                                                                                  nn.Module):
        return "no decoder (model.model) and head (model.lm_head) pair"
    head = model.lm_head
    if isinstance(head, LoRALinear):
        if head.fan_in_fan_out:
            return "lm_head is a LoRALinear the fused loss does not take (Conv1D)"
        if head.quantized:
            return _quantized_head_problem(head)
        if head.backend == "cuda":
            return _cuda_head_problem(head)
    elif isinstance(head, QuantizedLinear):
        return _quantized_head_problem(head)
    elif type(head) is not nn.Linear:
        return (f"lm_head is a {type(head).__name__} (the fused loss takes nn.Linear, a QuantizedLinear or a fused "
                "LoRALinear)")
    return ""


def _quantized_head_problem(head: nn.Module) -> str:
    """Why the fused loss cannot run a head over a ``QuantizedWeight`` ("" when it can): its backend must take
    the weight's format and run on the weight's device (a meta-device model: only the format is checked)."""
    weight, requested = head.weight, head.backend
    if requested is None:
        return ""
    if weight.scheme not in QUANT_SUPPORT[requested]:
        return f"lm_head asks for backend={requested!r}, which has no kernel for a {weight.scheme!r} weight"
    device = weight.device
    rank = head.lora_A.shape[0] if isinstance(head, LoRALinear) and head.running_adapters() else 1
    why = None if device.type == "meta" else unavailable_reason(requested, device, rank)
    return f"lm_head asks for backend={requested!r}, which cannot run here: {why}" if why else ""


def _cuda_head_problem(head: LoRALinear) -> str:
    """Why the fused loss cannot run a backend='cuda' LoRA head ("" when it can): its row pass is lowcost._C's CUDA
    kernel (CUDA tensors, sm_80+, a CUDA build) and takes fp32/fp16/bf16. A meta-device model (lowcost plan) runs
    later on a device we cannot see: only the dtype is checked."""
    if head.weight.dtype == torch.float64:
        return "lm_head asks for backend='cuda' with float64 weights (the cuda kernels take fp32/fp16/bf16)"
    device = head.weight.device
    why = None if device.type == "meta" else unavailable_reason("cuda", device, head.lora_A.shape[0])
    return f"lm_head asks for backend='cuda', which cannot run here: {why}" if why else ""


def _head_fusable(head: nn.Module) -> bool:
    """A LoRA head is fused when it runs at most one adapter (several active adapters: original forward)."""
    return not isinstance(head, LoRALinear) or len(head.running_adapters()) <= 1


def _head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, reduction: str,
               ignore_index: int, softcap: Optional[float]) -> torch.Tensor:
    """The op on the head's parameters (a LoRA head: its adapter, dropout and a seed drawn as it would)."""
    if isinstance(head, LoRALinear) and head.running_adapters():
        f = head.factors(head.running_adapters()[0])
        p = f.dropout if head.training else 0.0
        return linear_cross_entropy(hidden, head.base_weight(), labels, head.bias, ignore_index, reduction,
                                    softcap=softcap, lora_a=f.lora_A, lora_b=f.lora_B, lora_scale=f.scaling,
                                    lora_dropout=p, backend=head.backend, loss_dtype=torch.float32)
    weight = head.base_weight() if isinstance(head, LoRALinear) else head.weight
    backend = getattr(head, "backend", None) if isinstance(weight, QuantizedWeight) else None
    return linear_cross_entropy(hidden, weight, labels, head.bias, ignore_index, reduction, softcap=softcap,
                                backend=backend, loss_dtype=torch.float32)


def _output_class():
    """(``CausalLMOutputWithPast``, the names of its fields other than loss and logits), read once outside
    any compiled region (dataclass introspection breaks a torch.compile graph)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    return CausalLMOutputWithPast, tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                                         if f.name not in ("loss", "logits"))


def make_fused_forward(model: nn.Module):
    """The forward installed on ``model`` (bound to it): see the module docstring."""
    original = type(model).forward
    names = [n for n in inspect.signature(original).parameters if n != "self"]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    output_cls, passed_on = _output_class()

    def forward(*args, labels=None, return_logits: bool = False, **kwargs):
        keep = kwargs.get("logits_to_keep", 0)
        if labels is None or return_logits or not (isinstance(keep, int) and keep == 0) \
                or not _head_fusable(model.lm_head):
            return original(model, *args, labels=labels, **kwargs)
        kwargs.update(zip(names, args))
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = model.model(**kwargs)
        hidden = outputs[0]
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        reduction = "sum" if num_items is not None else "mean"
        loss = _head_loss(model.lm_head, hidden, shift_labels, reduction, ignore_index, softcap)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        values = {name: getattr(outputs, name, None) for name in passed_on}
        return output_cls(loss=loss, logits=None, **{k: v for k, v in values.items() if v is not None})

    forward.__signature__ = _signature_with_return_logits(original.__get__(model))
    forward.lowcost_fused_loss = True
    return forward


def _signature_with_return_logits(bound) -> inspect.Signature:
    """The original forward's signature plus ``return_logits``: callers that read it (the HF Trainer keeps
    only the dataset columns the forward names) see the same parameters as before."""
    sig = inspect.signature(bound)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=False)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [extra] + params[at:])


def install_fused_loss(model: nn.Module) -> None:
    model.forward = make_fused_forward(model)


def has_fused_loss(model: nn.Module) -> bool:
    """Whether ``install_fused_loss`` replaced ``model``'s forward."""
    return getattr(model.__dict__.get("forward"), "lowcost_fused_loss", False)


def remove_fused_loss(model: nn.Module) -> None:
    model.__dict__.pop("forward", None)
