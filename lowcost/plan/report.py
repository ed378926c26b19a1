"""``plan()``: every setup's estimate with its GPU choice and time estimate, as a table or JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowcost.api import LoRAConfig
from lowcost.plan import gpus as gpu_table
from lowcost.plan.workspace import TRITON_LOSS_ROWS_PER_SM
from lowcost.plan.estimate import Estimate, Setup, estimate, standard_setups


@dataclass
class Row:
    """One setup: its estimate, the cheapest GPU that holds it, and (if given) the user's GPU."""
    estimate: Estimate
    cheapest: Optional[gpu_table.GPU]
    chosen: Optional[gpu_table.GPU] = None
    selected: bool = False

    def at_peak(self) -> dict:
        """The peak split into categories that add up to it."""
        e = self.estimate
        if e.step_peak >= e.update_peak:
            saved, grads = e.peak_saved, e.peak_grads
            transient = e.step_peak - saved - grads
        else:
            saved, grads, transient = 0, e.grads, e.update_peak - e.grads
        return {"weights": e.weights, "optimizer": e.optimizer, "saved_activations": saved, "gradients": grads,
                "transient": transient}


@dataclass
class Plan:
    model: str
    batch: int
    seq: int
    dtype: torch.dtype
    rows: list[Row]
    headroom: float
    utilization: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "batch": self.batch, "seq_len": self.seq, "dtype": str(self.dtype).split(".")[-1],
                "headroom": self.headroom, "utilization": self.utilization, "notes": self.notes,
                "setups": [_row_dict(row, self) for row in self.rows]}

    def __str__(self) -> str:
        return format_plan(self)


def _gpu_dict(gpu, e: Estimate, plan: "Plan") -> Optional[dict]:
    if gpu is None:
        return None
    seconds = gpu_table.step_seconds(gpu, e.flops, plan.utilization)
    return {"name": gpu.name, "fits": gpu_table.fits(gpu, e.peak_on(gpu.sms), plan.headroom),
            "peak_bytes_on_gpu": e.peak_on(gpu.sms),
            "step_seconds_estimate": seconds, "usd_per_1k_steps_estimate": seconds * gpu.usd_per_hour / 3.6}


def _row_dict(row: Row, plan: Plan) -> dict:
    e = row.estimate
    return {"setup": e.setup.name, "selected": row.selected, "parameters": e.parameters,
            "trainable_parameters": e.trainable, "peak_bytes": e.peak, "at_peak_bytes": row.at_peak(),
            "quantize": e.setup.quantize, "weights_bytes": e.weights, "quantized_weights_bytes": e.quantized_weights,
            "gradients_bytes": e.grads, "optimizer_bytes": e.optimizer,
            "saved_activation_bytes": {"blocks": e.saved_blocks, "outside_blocks_logits_loss": e.saved_outside,
                                       "total": e.saved},
            "offloaded_host_bytes": e.host_offload, "kernel_workspace_at_peak_bytes": e.peak_workspace,
            "flops_per_step": e.flops, "traced_depths": list(e.depths),
            "cheapest_gpu": _gpu_dict(row.cheapest, e, plan), "your_gpu": _gpu_dict(row.chosen, e, plan)}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


_HEAD = ("setup", "trainable", "weights", "optimizer", "kept for bwd", "at peak: saved", "grads", "transient",
         "peak", "cheapest GPU that fits", "est. s/step", "est. $/1k steps")


def _table_row(row: Row, plan: "Plan") -> tuple:
    e, parts = row.estimate, row.at_peak()
    gpu = row.chosen or row.cheapest
    fit = gpu is not None and gpu_table.fits(gpu, e.peak_on(gpu.sms), plan.headroom)
    seconds = gpu_table.step_seconds(gpu, e.flops, plan.utilization) if gpu else None
    where = "none in the table" if gpu is None else gpu.name + ("" if fit else " (does NOT fit)")
    return (("* " if row.selected else "  ") + e.setup.name, _count(e.trainable), _size(parts["weights"]),
            _size(parts["optimizer"]), _size(e.saved), _size(parts["saved_activations"]),
            _size(parts["gradients"]), _size(parts["transient"]), _size(e.peak), where,
            "-" if seconds is None else f"{seconds:.3g}",
            "-" if seconds is None else f"{seconds * gpu.usd_per_hour / 3.6:.3g}")


def format_plan(plan: "Plan") -> str:
    head = _HEAD if not any(r.chosen for r in plan.rows) else _HEAD[:9] + ("your GPU",) + _HEAD[10:]
    rows = [head] + [_table_row(row, plan) for row in plan.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    lines = [f"lowcost plan: {plan.model}, batch {plan.batch} x {plan.seq} tokens, "
             f"{str(plan.dtype).split('.')[-1]} weights, AdamW"]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i in (0, 9) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    lines.append("peak = weights + optimizer + what the step holds at its worst moment (activations still saved "
                 "for backward, gradients so far, transient tensors and kernel workspace); 'kept for bwd' = "
                 "activations saved at the end of forward.")
    lines.append(f"Fits: peak <= {1 - plan.headroom:.0%} of the GPU's memory. Time and cost are ESTIMATES: the "
                 f"step's FLOPs (recompute included) at {plan.utilization:.0%} of the table's bf16 peak.")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _loss_chunk_notes(rows: list[Row]) -> list[str]:
    """What the Triton loss's GPU-sized chunk adds on the GPU each fused-loss row is fitted to, one note per GPU
    (in the order the GPUs first appear), naming the rows it concerns."""
    rows_by_gpu: dict[str, list[Row]] = {}
    for row in rows:
        gpu = row.chosen or row.cheapest
        if gpu is not None and row.estimate.peak_on(gpu.sms) > row.estimate.peak:
            rows_by_gpu.setdefault(gpu.name, []).append(row)
    notes = []
    for fitted in rows_by_gpu.values():
        gpu = fitted[0].chosen or fitted[0].cheapest
        extra = max(row.estimate.peak_on(gpu.sms) - row.estimate.peak for row in fitted)
        names = ", ".join(row.estimate.setup.name for row in fitted)
        notes.append(f"on {gpu.name} the fused loss's Triton chunk ({TRITON_LOSS_ROWS_PER_SM} rows per SM x "
                     f"{gpu.sms} SMs) holds up to {_size(extra)} more than 'peak' ({names}); the fit counts it")
    return notes


def plan(config, model_name: str, batch: int, seq: int, dtype: torch.dtype, lora: LoRAConfig,
         checkpoint: Optional[str] = None, k: int = 2, table=None, gpu: Optional[str] = None,
         headroom: float = 0.1, utilization: float = 0.4, exact: bool = False, progress=None,
         quantize: Optional[str] = None) -> Plan:
    """Estimates every standard setup (``estimate.standard_setups``; ``quantize`` "nf4", "nf4-dq" or "int8"
    adds LoRA on a quantized base) and picks GPUs from ``table``."""
    table = table if table is not None else gpu_table.load_table()
    chosen = gpu_table.find(table, gpu) if gpu else None
    lora_name = f"{quantize} LoRA" if quantize else "LoRA"
    selected = f"{lora_name} + {checkpoint}" if checkpoint not in (None, "none") else lora_name
    rows = []
    for setup in standard_setups(lora, checkpoint, k, quantize):
        if progress is not None:
            progress(setup)
        e = estimate(config, setup, batch, seq, dtype, exact=exact)
        rows.append(Row(e, gpu_table.cheapest_fit(table, lambda g, e=e: e.peak_on(g.sms), headroom), chosen,
                        setup.name == selected))
    notes = []
    if any(r.estimate.host_offload for r in rows):
        host = max(r.estimate.host_offload for r in rows)
        notes.append(f"offload keeps {_size(host)} of block inputs in host (CPU) memory, outside the GPU figures")
    notes += _loss_chunk_notes(rows)
    if quantize:
        e = next(r.estimate for r in rows if r.estimate.setup.quantize)
        notes.append(f"{quantize} rows: the linear layers but the output head quantized ({_size(e.quantized_weights)} "
                     f"of codes + scales in 'weights'); the torch path's dequantization workspace (one block of "
                     f"rows) is in 'transient' and its FLOPs in the time estimate")
    return Plan(model_name, batch, seq, dtype, rows, headroom, utilization, notes)


__all__ = ["plan", "Plan", "Row", "Setup", "format_plan"]
