"""benchmarks/device/bench_kernels.py runs end to end without a GPU (--dry-run: tiny shapes under the Triton
interpreter), so the device script's per-kernel timing is known to work before a GPU is lent."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_every_launch(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "device" / "bench_kernels.py"), "--dry-run", "--dropouts",
           "0.05", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "kernels.csv") as handle:
        rows = list(csv.DictReader(handle))
    kernels = {row["kernel"] for row in rows}
    assert {"fwd_u", "fwd_y", "bwd_g", "bwd_dx", "bwd_x", "all launches (fwd+bwd)"} <= kernels
    assert all(float(row["ms"]) > 0 and float(row["torch_ms"]) > 0 for row in rows)
