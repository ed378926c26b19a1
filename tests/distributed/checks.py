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


def update_errors(directory: Path, expected: dict, initial: dict) -> dict[str, float]:
    """Per adapter: the error of the saved update against the expected one, relative to the expected update,
    after discounting one fp32 spacing of the stored values.

    An update is read back as final − initial, and each final value was rounded once when stored: that alone
    can differ by one spacing of the parameter's own magnitude between two runs whose updates agree to far
    better (measured: a lora_A of magnitude 0.14 updated by 2.2e-5 differed by 7.5e-9, half a spacing, which
    is 3.4e-4 of its update). What exceeds that spacing is the runs' own disagreement."""
    saved = saved_adapters(directory)
    assert set(saved) == {peft_key(n) for n in expected}, "saved keys differ from the model's adapters"
    errors = {}
    for name, want in expected.items():
        got = saved[peft_key(name)].double()
        spacing = torch.finfo(torch.float32).eps * max(got.abs().max().item(), want.double().abs().max().item())
        update = (want.double() - initial[name].double()).abs().max().item()
        excess = max((got - want.double()).abs().max().item() - spacing, 0.0)
        errors[name] = excess / max(update, 1e-30)
    return errors


def assert_equal_updates(directory: Path, expected: dict, initial: dict, tol: float = FP32) -> None:
    errors = update_errors(directory, expected, initial)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{directory.name}: {worst} update differs by {errors[worst]:.3g} (> {tol:g})"


def assert_differ(directory: Path, other: dict, initial: dict, at_least: float) -> None:
    errors = delta_errors(directory, other, initial)
    assert min(errors.values()) >= at_least, f"{directory.name}: some update equals the other run's: {errors}"
