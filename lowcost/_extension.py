"""Loads the compiled extension ``lowcost._C`` if it was built; says so once if it was not.

``lowcost._C`` registers the ``torch.ops.lowcost.*`` primitives (C++ CPU kernels always, CUDA kernels when
built with a CUDA toolkit). Nothing here fails: a missing extension means the pure-torch / Triton paths.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_LOAD_ERROR: str | None = None

try:
    importlib.import_module("lowcost._C")  # registers the ops with the dispatcher
except ImportError as error:  # not built, or built against another torch
    _LOAD_ERROR = str(error)
    warnings.warn(f"lowcost: compiled extension lowcost._C not available ({error}); "
                  "using the pure-torch and Triton paths only", RuntimeWarning, stacklevel=2)


def extension_loaded() -> bool:
    return _LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``lowcost::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not extension_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowcost::{op}", dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def device_dispatch_key(device: torch.device) -> str:
    return "CUDA" if device.type == "cuda" else "CPU"
