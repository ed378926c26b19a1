"""Fixtures for the checkpoint tests; model builders live in ckpt_models.py."""
import pytest
import torch


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


class Impl:
    """One checkpoint implementation under test: called like torch.utils.checkpoint.checkpoint(fn, *args, **kw)
    with use_reentrant=False. ``name`` is "torch" or "lowcost" (for the few expectations that differ)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, fn, *args, **kwargs):
        if self.name == "torch":
            import torch.utils.checkpoint as tuc
            kwargs.setdefault("use_reentrant", False)
            return tuc.checkpoint(fn, *args, **kwargs)
        import lowcost
        return lowcost.checkpoint(fn, *args, **kwargs)

    def __repr__(self):
        return self.name


@pytest.fixture(params=["torch", "lowcost"])
def ck(request):
    """torch.utils.checkpoint (non-reentrant) and lowcost.checkpoint, side by side."""
    return Impl(request.param)
