"""The demo's CPU peak meter (``AllocatorPeak``): exact on a known allocation sequence, the same on a repeat."""
from __future__ import annotations

import torch

from lowcost.cli._measure import AllocatorPeak, PeakMemory, peak_meter

MIB = 2**20


def _sequence(held: list) -> None:
    """Peaks at 3 MiB above the start: 1 + 2 live, then 1 freed and 2 + 0.5 live, then all freed but a 0.5."""
    a = torch.empty(MIB, dtype=torch.uint8)
    b = torch.empty(2 * MIB, dtype=torch.uint8)
    del a
    c = torch.empty(MIB // 2, dtype=torch.uint8)
    del b
    held.append(c)


def test_peak_of_a_known_sequence_is_exact_and_repeats():
    for _ in range(2):
        held = []
        with AllocatorPeak() as peak:
            _sequence(held)
        assert peak.bytes == 3 * MIB
        assert peak.events == 5       # three allocations and two frees: c outlives the block


def test_frees_of_earlier_tensors_are_not_subtracted():
    """A tensor made before the block and freed inside it is not recorded (the profiler has no size for it),
    so the peak is what the block's own tensors held: 3 MiB, not 3 - 4."""
    earlier = [torch.empty(4 * MIB, dtype=torch.uint8)]
    with AllocatorPeak() as peak:
        earlier.clear()
        held = [torch.empty(3 * MIB, dtype=torch.uint8)]
    assert peak.bytes == 3 * MIB and peak.events == 1 and held


def test_training_step_peak_counts_saved_activations():
    """One backward of y = sin(x·2).sum(): the forward keeps x·2 (for sin's backward) while sin's output exists,
    and backward then makes grad tensors; the peak is a multiple of the tensor size and the same on a repeat."""
    x = torch.randn(256, 256, requires_grad=True)
    peaks = []
    for _ in range(2):
        x.grad = None
        with AllocatorPeak() as peak:
            (x * 2).sin().sum().backward()
        peaks.append(peak.bytes)
    assert peaks[0] == peaks[1] >= 3 * x.numel() * 4


def test_peak_meter_picks_the_allocator_on_cpu():
    assert isinstance(peak_meter(torch.device("cpu")), AllocatorPeak)
    assert isinstance(peak_meter(torch.device("cuda")), PeakMemory)
