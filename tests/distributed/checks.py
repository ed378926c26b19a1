"""Assertions shared by the DDP and FSDP2 test modules."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from dist_cases import peft_key, relative_error
from helpers import TOLERANCE
import torch

FP32 = TOLERANCE[torch.float32]


def saved_adapters(directory: Path) -> dict:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def delta_errors(directory: Path, expected: dict, initial: dict) -> dict[str, float]:
    """Per adapter: relative error of the saved update (final - initial) against the expected update.

    Updates, not values: B starts at zero and A at its init, so an error in a small update would hide
    behind the init in a comparison of values."""
    saved = saved_adapters(directory)
    assert set(saved) == {peft_key(n) for n in expected}, "saved keys differ from the model's adapters"
    return {n: relative_error(saved[peft_key(n)] - initial[n], expected[n] - initial[n]) for n in expected}


def assert_equal_updates(directory: Path, expected: dict, initial: dict, tol: float = FP32) -> None:
    errors = delta_errors(directory, expected, initial)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{directory.name}: {worst} update differs by {errors[worst]:.3g} (> {tol:g})"


def assert_differ(directory: Path, other: dict, initial: dict, at_least: float) -> None:
    errors = delta_errors(directory, other, initial)
    assert min(errors.values()) >= at_least, f"{directory.name}: some update equals the other run's: {errors}"
