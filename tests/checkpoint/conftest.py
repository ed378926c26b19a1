"""Fixtures for the checkpoint tests; model builders live in ckpt_models.py."""
import pytest
import torch


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
