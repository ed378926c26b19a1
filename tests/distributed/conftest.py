"""Fixtures of the distributed tests: single-process references, computed once per session.

The distributed runs themselves are launched once per test module (torchrun, two gloo processes on the
CPU; see launch.py) and every test of the module checks one fact of that run.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_cases, launch

from dist_cases import initial_adapters, reference_run  # noqa: E402

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")


@pytest.fixture(scope="session")
def initial():
    return initial_adapters()


@pytest.fixture(scope="session")
def reference():
    """Two ranks' worth of training in one process, each rank's rows with its own dropout stream."""
    return reference_run(2)


@pytest.fixture(scope="session")
def reference_same_masks():
    """The same, but every rank drawing rank 0's stream: what the run would give if masks did not differ."""
    return reference_run(2, same_masks=True)


@pytest.fixture(scope="session")
def reference_bf16():
    return reference_run(2, param_dtype=torch.bfloat16)
