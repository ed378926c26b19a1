"""``lowcost.checkpoint``: our own recompute function, per-block policies, offload and a budget planner.

    lowcost.checkpoint(fn, *args, **kwargs)    # drop-in for torch.utils.checkpoint(..., use_reentrant=False)
    report = apply_checkpointing(model, CheckpointConfig(policy="selective"))
    report = apply_checkpointing(model, CheckpointConfig(budget="6GiB"), profile_step=lambda: loss_of(model))
    remove_checkpointing(model)

See ``function.py`` for how recompute works, ``inputs.py`` for what is kept of the inputs and their in-place
checks, ``state.py`` for the RNG/autocast/device state replayed, ``options.py`` for torch's options,
``compiled.py`` for ``torch.compile``, ``policies.py`` for the policies, and ``selective.py``, ``offload.py``
and ``planner.py`` for the selective, offload and budget mechanisms.
"""
from lowcost.checkpoint.apply import CheckpointReport, apply_checkpointing, checkpointing_of, remove_checkpointing
from lowcost.checkpoint.config import CheckpointConfig, parse_budget
from lowcost.checkpoint.counting import RecomputeCounter
from lowcost.checkpoint.function import CheckpointMismatchError, checkpoint, checkpoint_with, recomputing
from lowcost.checkpoint.planner import BudgetError
from lowcost.checkpoint.policies import POLICIES, Decision, decide
from lowcost.checkpoint.tracking import track

__all__ = ["checkpoint", "checkpoint_with", "recomputing", "CheckpointMismatchError", "CheckpointConfig",
           "parse_budget", "apply_checkpointing", "remove_checkpointing", "checkpointing_of", "CheckpointReport",
           "BudgetError", "POLICIES", "Decision", "decide", "track", "RecomputeCounter"]


class _CallableModule(type(__import__("sys"))):
    """Makes ``import lowcost.checkpoint as ck; ck(fn, *args)`` work while the package stays a package."""

    def __call__(self, fn, *args, **kwargs):
        return checkpoint(fn, *args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule


class _Entry:
    """What ``lowcost.checkpoint`` is on the top package: the function when called, the package otherwise.

    Not a module object, so that ``torch.compile`` traces ``lowcost.checkpoint(fn, x)`` through ``__call__``
    into ``checkpoint`` (and from there torch's checkpoint operator) instead of breaking the graph on a call to
    a module; attribute access (``lowcost.checkpoint.CheckpointConfig``) goes to the package.
    """

    def __init__(self, package):
        object.__setattr__(self, "_package", package)
        object.__setattr__(self, "__doc__", package.__doc__)

    def __call__(self, fn, *args, **kwargs):
        return checkpoint(fn, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._package, name)

    def __setattr__(self, name, value):
        setattr(self._package, name, value)

    def __dir__(self):
        return dir(self._package)

    def __repr__(self):
        return f"<lowcost.checkpoint: callable package {self._package.__file__}>"


entry = _Entry(__import__("sys").modules[__name__])
