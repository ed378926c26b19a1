"""A normed tensor that consumers save as (norm input, statistics) instead of itself: the "norm" fusion's mechanism.

``lowcost.ops.rms_norm`` and ``lowcost.ops.layer_norm`` tag their output y with a ``NormSource``: the norm's
input x and what rebuilds y from it. A lowcost LoRA op that needs its input for backward (for dA = duᵀ(D⊙y),
and in the fused MLP for the gate/up adapters) calls ``pack_input(y)`` in its ``setup_context``. For a
tagged y it gets the source's tensors to save; x (and RMSNorm's rstd) are what the norm's own backward keeps
anyway, so the (M, H) normed tensor costs nothing. ``unpack_input`` rebuilds y in backward bit-identically
to the forward:

    RMSNorm  ("rms:llama" / "rms:gemma")  saves (x, rstd, w)    y = ``lowcost.reference.rms_norm.normed``
    LayerNorm ("layer")                    saves (x, w, b)       y = ``torch.native_layer_norm`` again

(the RMSNorm rebuild runs the forward's own operations on the same rstd; the LayerNorm rebuild runs the same
deterministic kernel on the same input).

Where y is rebuilt. Every consumer on the Triton backend (``lora_linear``, ``lora_grouped_linear``, their
quantized forms ``qlora_linear`` / ``qlora_grouped_linear``, and the fused ``lora_gated_mlp`` /
``qlora_gated_mlp`` for their gate and up adapters) takes ``backward_input`` with ``in_kernel`` set, which uses
``kernel_rebuild_source`` for an RMSNorm's y (both forms; the norm's input and weight of one dtype, or
autocast's fp16/bf16 copy of an fp32 norm's output; for ``lora_linear`` only when its base weight needs no
gradient): its backward op gets (x, rstd, w) as optional norm arguments, and the kernels that read y (for
dA = duᵀ(D⊙y): the LoRA-linear x-pass, the grouped dA pass) rebuild each y tile in their loads from the x tile,
rstd[rows] and w[cols] (``lowcost.kernels.norm_tile``: the same operations and roundings as ``normed``, so dA
is bit for bit the one from y). No (M, H) normed tensor exists in that backward at all. Everywhere else y is
rebuilt in torch, by ``_rebuild`` (before the consumer's backward op, or inside it through ``kernel_input`` when
the op got the norm arguments but runs no such kernel: the torch and cuda backends, the grouped ops' M = 0 or
K = 0 path): LayerNorm (kept in torch), a norm weight whose dtype differs from the input's (exact in a kernel
too, but one more compiled variant), and a ``lora_linear`` whose base weight trains (dW = gᵀy needs y
itself).

Under ``torch.autocast`` the norm runs in its input's dtype (fp32) and the consumer's autocast rule
(``lowcost.ops.autocast``) casts y to the autocast dtype D, which makes a new tensor. ``cast_input`` makes that
copy and tags it too, with the same source and ``Rebuild.cast_to = D``: the consumer rebuilds y and casts it
again, which is bit-identical to the copy because the cast is deterministic. So each consumer (q, k and v cast
separately) keeps only the norm's tensors, shared storages that the norm's own backward keeps anyway, and no
copy at all. Only an untouched norm output is tagged through a cast (never a copy of a copy).

A y without a tag, or one whose source changed after the norm ran (a version counter moved: an in-place
write to y, x or a norm parameter; for autocast's copy also to the norm output it was cast from, while that
lives), is saved as itself. So the fusion only ever changes what is kept, never a result. Under
``torch.compile`` no tag is set (Dynamo would trace the attribute write) and consumers save y; under
``no_grad`` / ``inference_mode`` nothing is saved and no tag is set.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from lowcost.reference.rms_norm import normed

Tensor = torch.Tensor
_ATTR = "_lowcost_norm_source"


@dataclass(frozen=True)
class Rebuild:
    """How a consumer rebuilds its input from the tensors it saved."""
    kind: str        # "rms:llama" | "rms:gemma" | "layer"
    eps: float       # LayerNorm's eps (RMSNorm's is inside the saved rstd)
    count: int       # how many saved tensors
    cast_to: Optional[torch.dtype] = None   # autocast's copy: the rebuilt tensor is then cast to this dtype


@dataclass(frozen=True)
class NormSource:
    """What rebuilds a normed tensor y: ``tensors`` (x first) and ``how``."""
    tensors: tuple
    how: Rebuild
    versions: tuple      # the version counters of y and of ``tensors`` when y was made
    # autocast's copy: a weak reference to the norm output y was cast from (weak: a consumer that keeps the copy
    # itself must not keep that fp32 tensor alive too) and that output's version counter at the cast
    cast_from: Optional[weakref.ref] = None
    cast_from_version: Optional[int] = None


def _versions(y: Tensor, tensors: Sequence[Optional[Tensor]]) -> tuple:
    return (y._version,) + tuple(t._version if t is not None else None for t in tensors)


def _cast_from_written(source: NormSource) -> bool:
    """Whether the norm output autocast's copy was cast from has been written in place since the cast (a freed
    one cannot have been)."""
    parent = source.cast_from() if source.cast_from is not None else None
    return parent is not None and parent._version != source.cast_from_version


def _taggable(y: Tensor) -> bool:
    """Whether a tag on y pays and is safe: y requires grad (else its producer saved nothing, and keeping the
    source alive through the tag would cost more than y), grad mode is on, y is not an inference tensor (which
    has no version counter), and Dynamo is not tracing (it would trace the attribute write)."""
    return not (torch.compiler.is_compiling() or not torch.is_grad_enabled() or y.is_inference()
                or not y.requires_grad)


def tag(y: Tensor, tensors: tuple, kind: str, eps: float = 0.0) -> Tensor:
    """Mark y (a norm's output, returned as is) as rebuildable from ``tensors`` by ``kind`` (where ``_taggable``)."""
    if _taggable(y):
        setattr(y, _ATTR, NormSource(tensors, Rebuild(kind, float(eps), len(tensors)), _versions(y, tensors)))
    return y


def cast_input(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``y.to(dtype)``, autocast's cast of a consumer's input. A copy of a tagged, untouched norm output is tagged
    "rebuild the source, then cast to ``dtype``" (where ``_taggable``); anything else is returned untagged.
    The copy's tag is void once the copy, the norm output it came from or the source is written in place."""
    out = y.to(dtype)
    if out is y or not _taggable(out):
        return out
    source = source_of(y)
    if source is None or source.how.cast_to is not None:
        return out
    setattr(out, _ATTR, NormSource(source.tensors, replace(source.how, cast_to=dtype), _versions(out, source.tensors),
                                   weakref.ref(y), y._version))
    return out


def source_of(y: Tensor) -> Optional[NormSource]:
    """y's ``NormSource`` when it still describes y exactly (nothing written in place since), else None."""
    source = getattr(y, _ATTR, None)
    if source is None or _versions(y, source.tensors) != source.versions or _cast_from_written(source):
        return None
    return source


def pack_input(y: Tensor) -> tuple[tuple, Optional[Rebuild]]:
    """(tensors a consumer op saves for its input y, how to rebuild it, or None for y itself)."""
    source = source_of(y)
    if source is None:
        return (y,), None
    return source.tensors, source.how


def unpack_input(saved: Sequence[Optional[Tensor]], how: Optional[Rebuild]) -> tuple[Tensor, tuple]:
    """(the consumer's input, the rest of its saved tensors) from ``ctx.saved_tensors``, whose first entries are
    what ``pack_input`` gave it to save. Read ``ctx.saved_tensors`` once: a recomputed tensor is freed then."""
    count = 1 if how is None else how.count
    mine, rest = saved[:count], tuple(saved[count:])
    if how is None:
        return mine[0], rest
    y = _rebuild(mine, how)
    return (y if how.cast_to is None else y.to(how.cast_to)), rest


# What a kernel rebuilds in its tile loads (kernels/norm_tile.py): an RMSNorm whose input and weight share a dtype
# (its output's), or autocast's 16-bit copy of an fp32 one. (Mixed input / weight dtypes would be exact too, but
# each would be one more compiled kernel variant; those rare cases keep the torch rebuild.)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_rebuild_source(saved: Sequence[Optional[Tensor]], how: Optional[Rebuild]
                          ) -> Optional[tuple[tuple, str, tuple]]:
    """((x, rstd, w), form, the rest of the saved tensors) when the consumer's input is an RMSNorm output that a
    kernel rebuilds bit for bit in its loads (``lowcost.kernels.norm_tile``, the Triton backend), else None
    (no tag, LayerNorm, or dtypes whose rebuild only torch reproduces: ``unpack_input`` then)."""
    if how is None or not how.kind.startswith("rms:"):
        return None
    (x, stat, weight), rest = saved[:3], tuple(saved[3:])
    casts = (None, x.dtype) + ((torch.float16, torch.bfloat16) if x.dtype == torch.float32 else ())
    exact = (x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype and stat.dtype == torch.float32
             and how.cast_to in casts)
    return ((x, stat, weight), how.kind.split(":")[1], rest) if exact else None


def backward_input(saved: Sequence[Optional[Tensor]], how: Optional[Rebuild], in_kernel: bool
                   ) -> tuple[Tensor, tuple, tuple]:
    """(x for a consumer's backward op, its norm arguments (norm_rstd, norm_weight, norm_form), the rest of the
    saved tensors) from ``ctx.saved_tensors``. With ``in_kernel`` (the consumer's kernel rebuilds its input in
    its loads: the Triton backend, no dW asked for) an input that ``kernel_rebuild_source`` takes stays
    (norm input, rstd, w); otherwise it is rebuilt here in torch (``unpack_input``) and the norm arguments are
    (None, None, "")."""
    source = kernel_rebuild_source(saved, how) if in_kernel else None
    if source is None:
        x, rest = unpack_input(saved, how)
        return x, (None, None, ""), rest
    (x, stat, weight), form, rest = source
    return x, (stat, weight, form), rest


def kernel_input(x2: Tensor, norm_rstd: Optional[Tensor], norm_weight: Optional[Tensor], norm_form: str,
                 dtype: torch.dtype, in_kernel: bool) -> tuple[Tensor, dict]:
    """Inside a backward op that got ``backward_input``'s norm arguments: (the 2-D input to hand its kernels or
    reference, the kernels' ``norm`` keyword). Without ``norm_form``: (x2, {}). With it, x2 (M, K) is the
    RMSNorm's input and rstd (..., 1) its statistics: ``in_kernel`` gives (x2, {"norm": (rstd (M,), w, form)})
    for a kernel that rebuilds the op's input in its loads, else the op's input is rebuilt here in ``dtype``
    (the backward's gradient dtype: the norm's, or autocast's copy's)."""
    if not norm_form:
        return x2, {}
    if in_kernel:
        return x2, {"norm": (norm_rstd.reshape(-1), norm_weight, norm_form)}
    mine = (x2, norm_rstd.reshape(-1, 1), norm_weight)
    return _rebuild(mine, Rebuild(f"rms:{norm_form}", 0.0, len(mine))).to(dtype), {}


def _rebuild(mine: Sequence[Optional[Tensor]], how: Rebuild) -> Tensor:
    """The norm's output, bit for bit, from its saved tensors: every torch rebuild of a consumer's input runs here."""
    if how.kind == "layer":
        x, weight, bias = mine
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, how.eps)[0]
    x, stat, weight = mine
    return normed(x, stat, weight, how.kind.split(":")[1])
