"""One training step, traced: the bytes it keeps and the peak it reaches, from the real code on any tensors.

``trace_step(model, input_ids)`` runs ``loss = model(input_ids, labels=input_ids).loss; loss.backward()`` under

- ``lowcost.checkpoint.track(hook=True)`` while forward runs: the storages autograd saves (outside lowcost
  frames) plus what lowcost frames keep (inputs, selective cache, offload host copies), each storage once,
  parameters excluded, attributed to the block running at the time or to ``None`` (outside the blocks).
  This is the accounting ``benchmarks/bench_checkpoint.py`` and ``bench_offload.py`` use;
- ``LiveBytes`` for forward and backward: the peak of the bytes held by op outputs, plus the workspace the
  running kernel takes inside itself (``workspace.py``); what was live at the peak is split into saved
  activations, gradients and the rest (the transient: logits' gradient, backward temporaries, workspace);
- optionally ``flops.flop_counter()``: the FLOPs of the step, recompute included.

The same function runs on fake tensors (the planner) and on real CPU tensors (the tests that check the
planner against a measured run): nothing in it depends on which.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from lowcost.checkpoint import track
from lowcost.plan.fake import LiveBytes, storage_key
from lowcost.plan.flops import flop_counter
from lowcost.plan.workspace import kernel_workspace


@dataclass
class StepTrace:
    """What one forward + backward held (bytes), parameters excluded.

    saved_blocks / saved_outside: kept for backward at the end of forward, inside the blocks / outside
    them (embedding output, final norm, logits, loss); host_offload: offloaded copies (host memory, left
    out of the device figures unless traced with ``host_is_device``); grads: the trainable parameters'
    gradients after backward; peak: the most bytes held at once during the step, split into what was then
    saved for backward (peak_saved), gradients (peak_grads) and the rest (peak_transient, which includes
    peak_workspace, the running kernel's internal workspace); flops: of the whole step (0 if not counted).
    """
    saved_blocks: int
    saved_outside: int
    host_offload: int
    grads: int
    peak: int
    peak_saved: int
    peak_grads: int
    peak_transient: int
    peak_workspace: int
    peak_op: str
    flops: int = 0
    per_block: dict = field(default_factory=dict)

    @property
    def saved(self) -> int:
        return self.saved_blocks + self.saved_outside


def _offloaded(tracker) -> set:
    return {ptr for ptr, (_, _, kind, _) in tracker.storages.items() if kind == "offload"}


def _grad_storages(params) -> dict[int, int]:
    return {storage_key(p.grad): p.grad.untyped_storage().nbytes() for p in params
            if p.requires_grad and p.grad is not None}


def _refs(meter: LiveBytes, keys) -> dict:
    """key → the meter's weak reference to the storage now live under that key."""
    return {key: meter.live[key][0] for key in keys if key in meter.live}


def _held_at_peak(meter: LiveBytes, refs: dict) -> int:
    """Bytes of ``refs``' storages (the very ones, not later storages at a reused address) live at the peak."""
    return sum(n for key, (ref, n) in meter.at_peak.items() if refs.get(key) is ref)


def trace_step(model: nn.Module, input_ids: torch.Tensor, host_is_device: bool = False,
               count_flops: bool = False) -> StepTrace:
    """Forward + backward of a causal LM on ``input_ids`` (labels = inputs), traced; leaves ``.grad`` set.

    ``host_is_device``: count offloaded host copies as device memory (a CPU run, where they are the same
    memory); by default they are left out of the peak (a GPU plan) and reported as ``host_offload``.
    """
    params = list(model.parameters())
    weights = params + list(model.buffers())   # not activations (a quantized base's codes: buffers its ops save)
    trackers: list = []   # the tracker, once forward has started (the meter reads its offloaded copies)
    ignore = None if host_is_device else (lambda: _offloaded(trackers[0]) if trackers else ())
    meter = LiveBytes(ignore=ignore, workspace=kernel_workspace)
    counter = flop_counter() if count_flops else contextlib.nullcontext()
    with counter, meter:
        with track(weights, hook=True) as kept:
            trackers.append(kept)
            loss = model(input_ids=input_ids, labels=input_ids).loss
        saved_refs = _refs(meter, kept.storages)
        loss.backward()
        del loss
    per_label: dict = {}
    for nbytes, label, kind, _ in kept.storages.values():
        if kind != "offload" or host_is_device:
            per_label[label] = per_label.get(label, 0) + nbytes
    outside = per_label.pop(None, 0)
    grads = _grad_storages(params)
    peak_saved = _held_at_peak(meter, saved_refs)
    peak_grads = _held_at_peak(meter, _refs(meter, grads))
    return StepTrace(saved_blocks=sum(per_label.values()), saved_outside=outside,
                     host_offload=kept.bytes(kinds=["offload"]), grads=sum(grads.values()), peak=meter.peak,
                     peak_saved=peak_saved, peak_grads=peak_grads,
                     peak_transient=meter.peak - peak_saved - peak_grads, peak_workspace=meter.peak_workspace,
                     peak_op=meter.peak_op, flops=counter.get_total_flops() if count_flops else 0,
                     per_block=per_label)
