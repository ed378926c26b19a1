"""Run in a fresh process: the resident-memory growth of one real CPU training step (the planner's check).

    python tests/plan/rss_step.py '<json: {"shape": ..., "lora": bool, "policy": ..., "quantize": ...}>'  → JSON

Method. The parent starts this script with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``; fixing it also stops glibc from raising it after frees), so every tensor of
64 KiB or more is its own mapping, resident from its first write and returned to the kernel when freed:
RSS then follows the live tensors instead of whatever the heap kept. One thread (no per-thread kernel
buffers). One whole step (forward, backward, AdamW update, ``zero_grad(set_to_none=True)``) runs first,
so that AdamW's state, lazily built kernels and imports are part of the baseline; then ``malloc_trim``,
the baseline RSS, a reset of the kernel's peak counter (``echo 5 > /proc/self/clear_refs`` resets VmHWM),
the measured step, and VmHWM. Printed: the baseline, the peak and their difference (bytes).
"""
from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _step(model, ids, optimizer) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(spec: dict) -> dict:
    import lowcost
    from lowcost.checkpoint import CheckpointConfig
    from lowcost.plan.build import patch
    from plan_shapes import SHAPES, config_of, real_model

    torch.set_num_threads(1)
    config, batch, seq = SHAPES[spec["shape"]] if "config" not in spec else (spec["config"], spec["batch"], spec["seq"])
    lora = lowcost.LoRAConfig(r=8, alpha=16, dropout=0.05) if spec["lora"] else None
    checkpoint = CheckpointConfig(policy=spec["policy"]) if spec.get("policy") else None
    model = real_model(config_of(config))
    if spec.get("quantize"):   # the frozen base quantized as the planner does (lowcost.quantize, all-linear)
        from lowcost.plan.quantized import quantize_base
        quantize_base(model, spec["quantize"])
    model = patch(model, lora, checkpoint)
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _step(model, ids, optimizer)
    gc.collect()
    gc.disable()   # as the planner: no collection of reference cycles inside the step
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    _step(model, ids, optimizer)
    peak = _status("VmHWM")
    return {"baseline": baseline, "peak": peak, "delta": peak - baseline}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
