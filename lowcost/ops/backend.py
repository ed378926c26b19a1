"""The one place that picks a backend: explicit argument > ``LOWCOST_BACKEND`` > best available.

Backends (each a module with ``forward`` and ``backward`` over 2-D operands, docs/lora_linear_spec.md):
- ``torch``:  ``lowcost.reference`` (pure torch; dropout regenerated with the C++ kernel when built).
- ``triton``: ``lowcost.kernels`` (fused Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``:   the CUDA C++ kernels of ``lowcost._C`` composed with cuBLAS GEMMs (CUDA tensors only).
Best available: on a GPU ``triton`` (the fullest fusion), then ``cuda``, then ``torch``; on CPU ``torch``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from lowcost._extension import has_kernel

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LOWCOST_BACKEND"
TRITON_MAX_RANK = 128  # kernels/lora_linear.py MAX_RANK: the u and g-pass kernels keep r in registers


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


CUDA_MIN_CAPABILITY = (8, 0)  # the skinny kernels use bf16 mma.sync m16n8k16 and cp.async (sm_80+)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_kernels_usable(device: torch.device) -> bool:
    return (device.type == "cuda" and has_kernel("lora_down", "CUDA")
            and _capability(device) >= CUDA_MIN_CAPABILITY)


def unavailable_reason(name: str, device: torch.device, rank: int) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at LoRA rank ``rank``, or None when it can."""
    if name == "triton" and not triton_usable(device):
        if not triton_importable():
            return "triton is not installed"
        return f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 (tensors are on {device})"
    if name == "triton" and rank > TRITON_MAX_RANK:
        return f"the Triton kernels support r <= {TRITON_MAX_RANK}, got r={rank}"
    if name == "cuda" and not cuda_kernels_usable(device):
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors (tensors are on {device})"
        if not has_kernel("lora_down", "CUDA"):
            return "lowcost._C was built without CUDA kernels (rebuild with a CUDA toolkit and a CUDA torch)"
        major, minor = _capability(device)
        return (f"the CUDA kernels need compute capability >= 8.0 (bf16 mma.sync, cp.async); "
                f"{device} has {major}.{minor}")
    return None


def requested_backend(requested: str | None) -> tuple[str, str | None]:
    """(source, name) of an explicit backend choice: the argument ``requested``, else ``LOWCOST_BACKEND``; name is
    None when neither is set. The source ("backend" or the variable's name) is what error messages cite; a
    name outside ``BACKENDS`` is a ValueError."""
    source, name = "backend", requested
    if name is None and os.environ.get(ENV_VAR):
        source, name = ENV_VAR, os.environ[ENV_VAR]
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return source, name


def resolve_backend(requested: str | None, device: torch.device, rank: int = 1) -> str:
    """Name of the backend to run on ``device`` for LoRA rank ``rank``; raises ValueError naming the
    source (argument or environment variable) of a choice that cannot run."""
    source, name = requested_backend(requested)
    if name is None:
        for candidate in (("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)):
            if unavailable_reason(candidate, device, rank) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(name, device, rank)
    if reason is not None:
        raise ValueError(f"{source}={name!r} is not available: {reason}")
    return name


def backend_module(name: str) -> ModuleType:
    """The implementation module of a resolved backend name (imported on first use)."""
    return importlib.import_module(f"lowcost.ops._{name}_backend")
