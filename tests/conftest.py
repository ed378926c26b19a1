"""Test setup: Triton runs under its interpreter on a CPU-only machine.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``lowcost.kernels`` is imported, so it is set here at conftest import time.
"""
import os
import sys

import pytest


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports themselves
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run benchmarks/device/run.sh on one")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
