"""One benchmark harness: timing with spread, exact saved-activation bytes, output checks and results rows.

Each benchmark script supplies providers (name → a setup function returning a zero-argument step), checks
every provider's outputs against a reference with ``check_providers`` before anything is timed (a
benchmark of a wrong kernel is not a result: a mismatch raises ``ProviderMismatch`` and the script writes
nothing), and calls ``time_*``/``append_rows``. Rows carry hardware, versions and the git sha so that
results from different machines can sit in one file. ``LOWCOST_BENCH_RESULTS`` (or ``set_results_dir``)
sends the files somewhere else than benchmarks/results/ (``lowcost bench --quick`` uses a scratch folder).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(os.environ.get("LOWCOST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def set_results_dir(path) -> Path:
    """Where ``append_rows`` and the scripts' plots go from now on."""
    global RESULTS_DIR
    RESULTS_DIR = Path(path)
    return RESULTS_DIR


class ProviderMismatch(AssertionError):
    """A provider's output disagrees with the reference: it is refused, nothing is timed or written."""


def run_script(main: Callable[[], object]) -> None:
    """A benchmark script's entry point: a refused provider is one line on stderr and exit status 3."""
    import sys
    try:
        code = main()
    except ProviderMismatch as exc:
        print(f"{Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        code = 3
    sys.exit(code or 0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (in float64; 0 for two empty tensors)."""
    expected = expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    scale = float(expected.abs().max()) or 1.0
    return float((actual.detach().double() - expected).abs().max()) / scale


def check_providers(reference: dict, outputs: dict, tolerance: float, what: str = "") -> dict:
    """Compares each provider's named outputs with the reference's; returns provider → worst error.

    Args:
        reference: output name → tensor (e.g. {"y": …, "dx": …}), ideally computed in float64.
        outputs: provider → {output name → tensor}; every name of ``reference`` must be present.
        tolerance: the largest accepted ``relative_error``.
    Raises:
        ProviderMismatch naming the provider, the output and the error when one exceeds ``tolerance``.
    """
    worst = {}
    for provider, got in outputs.items():
        errors = {}
        for name, expected in reference.items():
            if name not in got:
                raise ProviderMismatch(f"{what}provider {provider!r} gave no {name!r} to check")
            if tuple(got[name].shape) != tuple(expected.shape):
                raise ProviderMismatch(f"{what}provider {provider!r}: {name} has shape {tuple(got[name].shape)}, "
                                       f"the reference {tuple(expected.shape)}")
            errors[name] = relative_error(got[name], expected)
        name, error = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
        if not error <= tolerance:   # also catches NaN
            raise ProviderMismatch(f"{what}provider {provider!r} disagrees with the reference: {name} off by "
                                   f"{error:.3g} (relative, tolerance {tolerance:g}); refused, nothing timed")
        worst[provider] = error
    return worst


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
              min_seconds: float = 0.0) -> dict:
    """Median and 20th/80th percentiles of the step's wall time in milliseconds (device-synchronised)."""
    for _ in range(warmup):
        step()
    _sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        step()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return _summary(samples)


def time_interleaved(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                     repeats: int = 10) -> dict[str, dict]:
    """Like ``time_step`` for several providers at once, run round-robin (one sample of each per round),
    so that drift in the machine's speed (frequency, other load) hits every provider alike and the
    ratios between them stay fair."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(values) for name, values in samples.items()}


def _summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return {"median_ms": statistics.median(samples), "p20_ms": pick(0.2), "p80_ms": pick(0.8),
            "repeats": len(samples)}


def saved_activation_bytes(forward: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded.

    Counts what ``saved_tensors_hooks`` sees (each storage once, whatever views of it are saved). Custom
    autograd code that keeps tensors elsewhere (ctx attributes, closures) must be added by the caller; the
    lowcost ops keep none there (only Python floats and strings on ctx).
    """
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def append_rows(filename: str, rows: list[dict]) -> Path:
    """Appends rows (same keys) to benchmarks/results/<filename>, writing the header on first use."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / filename
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "git": git_sha(),
             "hardware": hardware(), "torch": torch.__version__}
    rows = [{**stamp, **row} for row in rows]
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def append_rows_to(out, filename: str, rows: list[dict]) -> Path:
    """``append_rows`` into the directory ``out`` when given (a device run's $OUT), else benchmarks/results/."""
    if out:
        set_results_dir(out)
    return append_rows(filename, rows)


def device_for_run(dry_run: bool):
    """The CUDA device; the CPU for a dry run on a machine without one; None (saying why on stderr) otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if dry_run:
        return torch.device("cpu")
    print("error: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
    return None
